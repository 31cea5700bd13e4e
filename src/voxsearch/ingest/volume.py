"""A volume in memory: voxels in RAS order plus the geometry needed to preprocess it."""

from __future__ import annotations

from dataclasses import dataclass, field

import nibabel as nib
import numpy as np

# Intensity units a reader can hand over. The contract: CT readers apply the stored rescale
# (DICOM RescaleSlope/Intercept, NIfTI scl_slope/scl_inter) exactly once and say "HU"; windowing
# refuses anything else for CT, so no path can rescale or window twice.
HU = "HU"
RAW = "raw"  # MR signal, arbitrary units
UNIT = "unit"  # already normalised to [0, 1] (e.g. M3D .npy volumes)


@dataclass
class Volume:
    array: np.ndarray  # (X, Y, Z) float32, RAS orientation (x to the Right, y Anterior, z Superior)
    spacing: tuple  # mm along X, Y, Z
    modality: str  # "CT" | "MR"
    affine: np.ndarray | None = None  # 4x4 voxel -> RAS mm, for the RAS-ordered array
    units: str = HU
    source_orientation: str = "RAS"  # axis codes of the file as stored, before reorientation
    meta: dict = field(default_factory=dict)  # non-identifying header facts (body part, date, ...)


def orientation_code(affine: np.ndarray) -> str:
    return "".join(nib.aff2axcodes(affine))


def ras_layout(affine: np.ndarray, shape: tuple) -> tuple[np.ndarray, np.ndarray, tuple]:
    """(orientation native->RAS, RAS->native, RAS affine) for an array of `shape` with `affine`."""
    ornt = nib.orientations.io_orientation(affine)
    to_native = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), ornt)
    ras_affine = affine @ nib.orientations.inv_ornt_aff(ornt, shape)
    return ornt, to_native, ras_affine


def ras_buffer(affine: np.ndarray, shape: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An empty contiguous float32 RAS array and a view of it indexed like the native array.

    Writing the native data into the view reorients while converting, so a large scan needs one
    float32 copy instead of two (a flip on a read array would force a contiguous copy later).
    """
    ornt, to_native, ras_affine = ras_layout(affine, shape)
    ras_shape = tuple(int(shape[int(i)]) for i in np.argsort(ornt[:, 0]))
    buf = np.empty(ras_shape, dtype=np.float32)
    native_view = nib.orientations.apply_orientation(buf, to_native)
    assert native_view.shape == tuple(shape), (native_view.shape, shape)
    return buf, native_view, ras_affine


def spacing_of(affine: np.ndarray) -> tuple:
    return tuple(float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
