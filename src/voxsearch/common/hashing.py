"""The two hashes a scan has, and what each is for.

`file_sha256`: the bytes of the files a scan was read from. Cheap (no decoding), so ingest uses it to
skip inputs it has already catalogued; it changes when a file is re-compressed or re-exported.

`content_sha256`: the decoded voxels and spacing, in the readers' canonical form (float32, RAS). The same
scan has the same one whether it comes as NIfTI, as a DICOM folder or zip, or re-compressed, so it is what
recognises an uploaded scan that is already in the catalog, and what decides that a series was re-embedded
for nothing.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable

import numpy as np

_CHUNK = 1 << 20


def _open_binary(path) -> BinaryIO:
    return open(path, "rb")


def sha256_files(paths: Iterable[Any], open_file: Callable[[Any], BinaryIO] = _open_binary) -> str:
    """sha256 of the files' bytes one after another, read in chunks; `open_file` opens each entry
    (e.g. `zipfile.ZipFile.open` for the members of a zip)."""
    digest = hashlib.sha256()
    for path in paths:
        with open_file(path) as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    return sha256_files([path])


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content_sha256(array: np.ndarray, spacing) -> str:
    """sha256 of a volume as the readers give it: the (X, Y, Z) RAS voxels as float32, then the spacing
    rounded to 0.1 µm (DICOM and NIfTI headers state one spacing with different float noise)."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(array, dtype=np.float32).tobytes())
    digest.update(np.asarray(spacing, dtype=np.float64).round(4).tobytes())
    return digest.hexdigest()
