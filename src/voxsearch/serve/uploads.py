"""Uploaded scans: receive within limits, recognise the format, unpack zips safely, check voxel counts and
decoded sizes from headers, and let only a few uploads be decoded at once.

Everything here runs before any volume is decoded, so a hostile or broken upload costs at most the bytes
the limits allow. Messages never repeat the client's file name: names of scans often carry a patient's
name. Errors carry an HTTP status so the API can answer 4xx without knowing the cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import shutil
import stat
import struct
import tempfile
import threading
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import AsyncIterator, BinaryIO

from voxsearch.serve.config import Limits

CHUNK = 1 << 20
NIFTI_HEADER_SIZES = (348, 540)
# Enough for a NIfTI-2 header (540 bytes) and the 4-byte extension flag after it.
NIFTI_HEAD_READ = 544
# Trailing bytes a .nii.gz may hold past its declared voxel data: nothing reads them, so a little is let be.
NIFTI_GZ_SLACK = 64 * 1024


class UploadError(Exception):
    """An upload the server refuses; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class DecodeSlots:
    """At most `slots` uploads validated and decoded at once in one replica, each holding up to
    ~max_voxels x 4 bytes. One more waits up to `wait_s` for a slot (a burst of uploads is answered
    rather than refused), then is refused (503, Retry-After). The wait is bounded, and so is the number
    of waiting requests (the ingress's max_ongoing_requests), so waiting holds no unbounded memory.
    """

    RETRY_AFTER_S = 5
    POLL_S = 0.05

    def __init__(self, slots: int, wait_s: float = 0.0):
        # A thread semaphore, taken without blocking: the replica's event loop never stalls on it.
        self._free = threading.BoundedSemaphore(slots)
        self.wait_s = wait_s

    @contextlib.asynccontextmanager
    async def claim(self):
        deadline = time.monotonic() + self.wait_s
        while not self._free.acquire(blocking=False):
            if time.monotonic() >= deadline:
                raise UploadError(
                    503, "the server is decoding as many uploads as it can; retry in a few seconds",
                    headers={"Retry-After": str(self.RETRY_AFTER_S)},
                )
            await asyncio.sleep(self.POLL_S)
        try:
            yield
        finally:
            self._free.release()


@dataclass
class ReceivedUpload:
    """An upload on local disk, ready to read; `path` is a NIfTI file or a folder of DICOM files."""

    workdir: Path
    path: Path
    kind: str  # "nifti" | "dicom-zip"
    size_bytes: int
    voxels: int

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def describe(kind: str, size_bytes: int) -> str:
    """How errors name an upload: its kind and size, never its client-side file name."""
    return f"the uploaded {kind} ({size_bytes / 1e6:.1f} MB)"


async def save_upload(source: AsyncIterator[bytes] | BinaryIO, limits: Limits, tmp_root: str | None = None) -> tuple[Path, Path, int]:
    """Copy an upload to a fresh private temp folder, refusing it once it passes `max_upload_bytes`.

    Returns (workdir, file path, size). The caller owns `workdir` and must delete it.
    """
    workdir = Path(tempfile.mkdtemp(prefix="voxsearch-upload-", dir=tmp_root))
    target = workdir / "upload.bin"
    size = 0
    try:
        with open(target, "wb") as out:
            if hasattr(source, "read"):
                while True:
                    chunk = source.read(CHUNK)
                    if hasattr(chunk, "__await__"):
                        chunk = await chunk
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > limits.max_upload_bytes:
                        raise _too_large(limits)
                    out.write(chunk)
            else:
                async for chunk in source:
                    size += len(chunk)
                    if size > limits.max_upload_bytes:
                        raise _too_large(limits)
                    out.write(chunk)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    if size == 0:
        shutil.rmtree(workdir, ignore_errors=True)
        raise UploadError(400, "the uploaded file is empty")
    return workdir, target, size


def _too_large(limits: Limits) -> UploadError:
    return UploadError(413, f"upload exceeds the limit of {limits.max_upload_bytes / 1e6:.0f} MB")


def sniff(path: Path) -> str:
    """Recognise the upload from its bytes (never its name): 'nifti', 'nifti-gz', 'zip' or 'dicom'."""
    with open(path, "rb") as fh:
        head = fh.read(NIFTI_HEAD_READ)
    if head[:2] == b"\x1f\x8b":
        return "nifti-gz"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if len(head) >= 4:
        le, be = struct.unpack("<i", head[:4])[0], struct.unpack(">i", head[:4])[0]
        if le in NIFTI_HEADER_SIZES or be in NIFTI_HEADER_SIZES:
            return "nifti"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    raise UploadError(
        415, "unsupported file type: upload a NIfTI volume (.nii or .nii.gz) or a zip of one DICOM series"
    )


def check_nifti(path: Path, gz: bool, limits: Limits, size_bytes: int) -> tuple[Path, int]:
    """Validate a NIfTI upload from its header before any voxel is decoded; returns a plain .nii file and
    its voxel count.

    The header's shape and data type say how many bytes the voxels take, and that is checked against the
    limits before anything else is read. A .nii.gz is then inflated to disk a chunk at a time and never
    past what its header declares, so neither a gzip bomb nor a header that understates the data costs
    more than the limit; the plain file also lets the decoder map the voxels rather than hold them twice.
    """
    what = describe("NIfTI" + (".gz" if gz else ""), size_bytes)
    named = path.with_name("upload.nii")
    if not gz:
        with open(path, "rb") as fh:
            voxels, declared = _check_nifti_header(fh.read(NIFTI_HEAD_READ), what, limits, gz)
        if size_bytes < declared:
            raise UploadError(422, f"{what} is truncated: its header needs {declared:,} bytes, got {size_bytes:,}")
        path.rename(named)
        return named, voxels
    with gzip.open(path, "rb") as src:
        try:
            head = src.read(NIFTI_HEAD_READ)
        except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
            raise UploadError(422, f"{what} is not a readable gzip stream ({exc.__class__.__name__})") from None
        voxels, declared = _check_nifti_header(head, what, limits, gz)
        _inflate(src, head, named, declared, what)
    path.unlink()  # keep one copy of the data on disk
    return named, voxels


def _check_nifti_header(head: bytes, what: str, limits: Limits, gz: bool) -> tuple[int, int]:
    """(voxels, bytes up to the end of the voxel data) from the fixed-size NIfTI-1/2 header in `head`."""
    import nibabel as nib

    sizes = {struct.unpack("<i", head[:4])[0], struct.unpack(">i", head[:4])[0]} if len(head) >= 4 else set()
    klass = next((k for k in (nib.Nifti1Header, nib.Nifti2Header) if k.template_dtype.itemsize in sizes), None)
    if klass is None:
        raise UploadError(415, f"{what} is gzip-compressed but holds no NIfTI header" if gz
                          else f"{what} holds no NIfTI header")
    size = klass.template_dtype.itemsize
    if len(head) < size:
        raise UploadError(422, f"{what} is truncated: it ends inside its {size}-byte NIfTI header")
    try:
        header = klass(head[:size], check=True)
        shape = tuple(int(s) for s in header.get_data_shape())
        dtype = header.get_data_dtype()
        offset = int(header.get_data_offset())
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for broken headers
        raise UploadError(422, f"{what} has an invalid NIfTI header ({exc.__class__.__name__})") from None
    spatial = shape[:3]
    extra = shape[3:]
    if len(spatial) < 3 or any(s < 2 for s in spatial):
        raise UploadError(422, f"{what} is not a 3D volume (shape {list(shape)}); a 3D scan is needed")
    if any(s > 1 for s in extra):
        raise UploadError(422, f"{what} is a 4D series (shape {list(shape)}); upload one 3D volume")
    voxels = spatial[0] * spatial[1] * spatial[2]
    if voxels > limits.max_voxels:
        raise UploadError(
            413, f"{what} has {voxels:,} voxels (shape {list(spatial)}), over the limit of {limits.max_voxels:,}"
        )
    declared = max(offset, 0) + voxels * dtype.itemsize
    if declared > limits.max_decoded_bytes:
        raise UploadError(
            413, f"{what} declares {declared / 1e6:,.0f} MB of image data ({dtype.name}, shape {list(spatial)}), "
                 f"over the limit of {limits.max_decoded_bytes / 1e6:,.0f} MB"
        )
    return voxels, declared


def _inflate(src: BinaryIO, head: bytes, target: Path, declared: int, what: str) -> None:
    """Write `head` and the rest of the gzip stream `src` to `target`, refusing a stream that ends before
    `declared` bytes or runs on past them (by more than NIFTI_GZ_SLACK)."""
    written = len(head)
    with open(target, "wb") as out:
        out.write(head)
        while True:
            try:
                chunk = src.read(CHUNK)  # gzip inflates at most CHUNK bytes per read
            except (OSError, EOFError, zlib.error) as exc:
                raise UploadError(
                    422, f"{what} could not be read: its gzip stream is corrupt or cut short ({exc.__class__.__name__})"
                ) from None
            if not chunk:
                break
            written += len(chunk)
            if written > declared + NIFTI_GZ_SLACK:
                raise UploadError(
                    413, f"{what} inflates to more than the {declared / 1e6:,.0f} MB its header declares (gzip bomb?)"
                )
            out.write(chunk)
    if written < declared:
        raise UploadError(
            422, f"{what} is truncated: its header needs {declared:,} bytes, it inflates to {written:,}"
        )


def _unsafe_member(name: str) -> bool:
    if "\\" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return True
    return any(part == ".." for part in PurePosixPath(name).parts)


def extract_zip(path: Path, dest: Path, limits: Limits, size_bytes: int) -> int:
    """Unpack a zip of DICOM files into `dest` under flat generated names; returns the number of files.

    Checked before any byte is inflated: entry count, absolute or '..' paths, symlinks, encryption,
    total declared size and the compression ratio of each entry and of the whole archive (zip bombs).
    The inflated bytes are counted again while writing and may not pass the declared total, because
    the sizes a hostile zip declares can lie.
    """
    what = describe("zip", size_bytes)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise UploadError(422, f"{what} is not a valid zip archive ({exc.__class__.__name__})") from None
    with archive:
        infos = archive.infolist()
        if len(infos) > limits.max_zip_entries:
            raise UploadError(413, f"{what} has {len(infos)} entries, over the limit of {limits.max_zip_entries}")
        files = []
        declared = 0
        compressed = 0
        for info in infos:
            if _unsafe_member(info.filename):
                raise UploadError(400, f"{what} contains an entry with an unsafe path (absolute or '..'); refused")
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise UploadError(400, f"{what} contains a symbolic link; refused")
            if info.flag_bits & 0x1:
                raise UploadError(422, f"{what} is encrypted; upload an unencrypted zip")
            if info.is_dir() or _ignorable(info.filename):
                continue
            declared += info.file_size
            compressed += info.compress_size
            ratio = info.file_size / max(info.compress_size, 1)
            if info.file_size > CHUNK and ratio > limits.max_zip_ratio:
                raise UploadError(
                    413, f"{what} has an entry compressed {ratio:.0f}:1, over {limits.max_zip_ratio:.0f}:1 (zip bomb?)"
                )
            files.append(info)
        # Many entries each under the per-entry floor add up to a bomb just the same.
        ratio = declared / max(compressed, 1)
        if declared > CHUNK and ratio > limits.max_zip_ratio:
            raise UploadError(
                413, f"{what} is compressed {ratio:.0f}:1 overall, over {limits.max_zip_ratio:.0f}:1 (zip bomb?)"
            )
        if declared > limits.max_zip_uncompressed_bytes:
            raise UploadError(
                413, f"{what} inflates to {declared / 1e6:.0f} MB, over {limits.max_zip_uncompressed_bytes / 1e6:.0f} MB"
            )
        if not files:
            raise UploadError(422, f"{what} holds no files")
        dest.mkdir(parents=True, exist_ok=True)
        written = 0
        for i, info in enumerate(files):
            target = dest / f"{i:06d}.dcm"
            try:
                with archive.open(info) as src, open(target, "wb") as out:
                    while True:
                        chunk = src.read(CHUNK)
                        if not chunk:
                            break
                        written += len(chunk)
                        if written > declared:
                            raise UploadError(413, f"{what} inflates past its declared size; refused")
                        out.write(chunk)
            except UploadError:
                raise
            except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError, zlib.error) as exc:
                raise UploadError(422, f"{what} is corrupt: entry {i + 1} cannot be read ({exc.__class__.__name__})") from None
    return len(files)


def _ignorable(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return any(p == "__MACOSX" for p in parts) or parts[-1] in (".DS_Store", "Thumbs.db", "DICOMDIR")


def check_dicom_folder(folder: Path, limits: Limits, what: str) -> int:
    """Count the voxels and pixel bytes of the DICOM files in `folder` from headers only (rows x columns x
    frames x samples x bits allocated: compressed pixel data decodes to that however small the file);
    refuse non-DICOM content."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    voxels = 0
    pixel_bytes = 0
    n_dicom = 0
    for file in sorted(folder.iterdir()):
        try:
            ds = pydicom.dcmread(str(file), stop_before_pixels=True)
            rows, cols = int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0)
            frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
            samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
            bits = int(getattr(ds, "BitsAllocated", 16) or 16)
        except (InvalidDicomError, Exception):  # noqa: BLE001 - any unreadable header: not an image file
            rows = cols = 0
        if rows <= 0 or cols <= 0:
            file.unlink()  # stray non-DICOM files (readme, viewer, DICOMDIR) are dropped, not fatal
            continue
        voxels += rows * cols * max(frames, 1)
        pixel_bytes += rows * cols * max(frames, 1) * max(samples, 1) * ((max(bits, 1) + 7) // 8)
        n_dicom += 1
        if voxels > limits.max_voxels:
            raise UploadError(413, f"{what} has more than {limits.max_voxels:,} voxels; refused")
        if pixel_bytes > limits.max_decoded_bytes:
            raise UploadError(
                413, f"{what} declares more than {limits.max_decoded_bytes / 1e6:,.0f} MB of pixel data; refused"
            )
    if n_dicom == 0:
        raise UploadError(422, f"{what} holds no DICOM image files")
    if n_dicom < 2 and voxels < 64**3:
        raise UploadError(422, f"{what} holds a single 2D DICOM image; a 3D series is needed")
    return voxels


def prepare_upload(workdir: Path, path: Path, size_bytes: int, limits: Limits) -> ReceivedUpload:
    """Turn a saved upload into a validated NIfTI file or DICOM folder, or raise UploadError."""
    kind = sniff(path)
    if kind == "dicom":
        raise UploadError(
            422, f"{describe('DICOM file', size_bytes)} is a single slice; upload the whole series as one zip"
        )
    if kind in ("nifti", "nifti-gz"):
        named, voxels = check_nifti(path, kind == "nifti-gz", limits, size_bytes)
        return ReceivedUpload(workdir, named, "nifti", size_bytes, voxels)
    folder = workdir / "series"
    extract_zip(path, folder, limits, size_bytes)
    path.unlink()  # the zip is no longer needed; keep only one copy of the data on disk
    voxels = check_dicom_folder(folder, limits, describe("zip", size_bytes))
    return ReceivedUpload(workdir, folder, "dicom-zip", size_bytes, voxels)
