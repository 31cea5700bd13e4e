"""Sanity checks every reader runs, so bad volumes fail with a message that names the input."""

from __future__ import annotations

import numpy as np

from voxsearch.ingest.errors import IngestError

# 512 x 512 x 2000 slices: beyond any single clinical series; bigger is a mistake or an attack.
DEFAULT_MAX_VOXELS = 512 * 512 * 2000


def check_budget(path, shape: tuple, max_voxels: int | None) -> None:
    budget = DEFAULT_MAX_VOXELS if max_voxels is None else max_voxels
    n = int(np.prod(shape, dtype=np.int64))
    if n > budget:
        raise IngestError(f"{path}: {n} voxels {tuple(shape)} exceed the voxel budget of {budget}", stage="validate")
    if min(shape) < 2:
        raise IngestError(f"{path}: expected a 3-D volume, got shape {tuple(shape)}", stage="validate")


def check_finite(path, array: np.ndarray) -> None:
    # A float64 running sum is NaN/inf iff some voxel is (for any sane magnitude), without a
    # full-size boolean temporary.
    if not np.isfinite(np.sum(array, dtype=np.float64)):
        bad = int((~np.isfinite(array)).sum())
        raise IngestError(f"{path}: {bad} voxels are NaN or infinite", stage="validate")


def guess_modality(array: np.ndarray) -> str:
    # CT always holds air at about -1000 HU; MR signal is non-negative.
    return "CT" if float(array.min()) < -500.0 else "MR"
