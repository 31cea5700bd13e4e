"""M3D-style .npy volumes: (1, D, H, W) or (D, H, W) arrays without geometry, usually in [0, 1]."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from voxsearch.ingest.checks import check_budget, check_finite, guess_modality
from voxsearch.ingest.errors import IngestError
from voxsearch.ingest.volume import HU, RAW, UNIT, Volume


def read_npy(path: Path, modality: str | None = None, max_voxels: int | None = None) -> Volume:
    try:
        arr = np.load(str(path), mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise IngestError(f"{path}: not a readable .npy array ({type(exc).__name__}: {exc})") from exc
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise IngestError(f"{path}: expected a 3-D volume (D, H, W), got shape {arr.shape}", stage="validate")
    check_budget(path, arr.shape, max_voxels)
    if not np.issubdtype(arr.dtype, np.number):
        raise IngestError(f"{path}: array dtype {arr.dtype} is not numeric", stage="validate")
    # M3D arrays are in the model layout (D, H, W) = (inferior->superior, anterior->posterior,
    # right->left); undo it to get RAS (x, y, z) so preprocessing maps it back unchanged.
    volume = np.ascontiguousarray(np.asarray(arr).transpose(2, 1, 0)[::-1, ::-1, :], dtype=np.float32)
    check_finite(path, volume)
    lo, hi = float(volume.min()), float(volume.max())
    if lo >= 0.0 and hi <= 1.0:
        units, modality = UNIT, modality or "CT"  # M3D-Cap is CT, already windowed
    else:
        modality = modality or guess_modality(volume)
        units = HU if modality == "CT" else RAW
    return Volume(
        array=volume,
        spacing=(1.0, 1.0, 1.0),  # unknown: npy carries no geometry
        modality=modality,
        affine=np.eye(4),
        units=units,
        source_orientation="UNKNOWN",
    )
