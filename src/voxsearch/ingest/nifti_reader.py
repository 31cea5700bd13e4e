"""NIfTI (.nii / .nii.gz) volumes through nibabel, reoriented to RAS while being converted."""

from __future__ import annotations

import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from voxsearch.ingest.errors import IngestError
from voxsearch.ingest.volume import HU, RAW, Volume, orientation_code, ras_buffer, spacing_of
from voxsearch.ingest.checks import check_budget, check_finite, guess_modality


def read_nifti(path: Path, modality: str | None = None, max_voxels: int | None = None) -> Volume:
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for a bad header
        raise IngestError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise IngestError(f"{path}: expected a 3-D volume, got shape {tuple(img.shape)}", stage="validate")
    check_budget(path, shape, max_voxels)
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise IngestError(f"{path}: degenerate voxel-to-world affine in the header", stage="validate")
    proxy = img.dataobj
    try:
        raw = np.asarray(proxy.get_unscaled()).reshape(shape)
    except (EOFError, OSError, ValueError, zlib.error) as exc:
        raise IngestError(f"{path}: voxel data is truncated or corrupt ({type(exc).__name__}: {exc})") from exc
    buf, native_view, ras_affine = ras_buffer(affine, shape)
    native_view[...] = raw
    del raw
    # The header scaling is the one and only intensity rescale (HU for CT); see volume.HU.
    slope, inter = float(getattr(proxy, "slope", 1.0)), float(getattr(proxy, "inter", 0.0))
    if slope != 1.0:
        buf *= np.float32(slope)
    if inter != 0.0:
        buf += np.float32(inter)
    check_finite(path, buf)
    modality = modality or guess_modality(buf)
    return Volume(
        array=buf,
        spacing=spacing_of(ras_affine),
        modality=modality,
        affine=ras_affine,
        units=HU if modality == "CT" else RAW,
        source_orientation=orientation_code(affine),
    )
