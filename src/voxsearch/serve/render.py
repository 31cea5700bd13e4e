"""Slices of a volume as PNG: the three mid-planes for thumbnails, any slice for scrolling.

Input is an (X, Y, Z) RAS array (HU for CT). Display follows the radiological convention: the patient's
right on the image's left, anterior and superior up; pixels are resampled to square millimetres so
anisotropic scans do not look squashed.
"""

from __future__ import annotations

import io

import numpy as np

PLANES = ("axial", "coronal", "sagittal")
# Named CT windows (level, width) in HU.
CT_WINDOWS = {"soft": (40.0, 400.0), "lung": (-600.0, 1500.0), "bone": (400.0, 1800.0), "brain": (40.0, 80.0)}


class RenderError(ValueError):
    pass


def slice_count(shape: tuple[int, ...], plane: str) -> int:
    axis = _axis(plane)
    return int(shape[axis])


def _axis(plane: str) -> int:
    try:
        return {"sagittal": 0, "coronal": 1, "axial": 2}[plane]
    except KeyError:
        raise RenderError(f"unknown plane '{plane}'; use one of {', '.join(PLANES)}") from None


def intensity_range(volume: np.ndarray, modality: str, window: str | None = None) -> tuple[float, float]:
    """The grey-level range to display: a named CT window, else robust percentiles (MR, or CT without HU)."""
    if modality == "CT" and (window or "soft") in CT_WINDOWS:
        level, width = CT_WINDOWS[window or "soft"]
        return level - width / 2, level + width / 2
    if window and window not in CT_WINDOWS:
        raise RenderError(f"unknown window '{window}'; use one of {', '.join(CT_WINDOWS)}")
    sample = volume[:: max(1, volume.shape[0] // 64), :: max(1, volume.shape[1] // 64), :: max(1, volume.shape[2] // 64)]
    lo, hi = np.percentile(sample, (0.5, 99.5))
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def plane_image(volume: np.ndarray, spacing, plane: str, index: int | None = None) -> tuple[np.ndarray, tuple[float, float]]:
    """One slice as a 2-D array (rows top->bottom) plus its (row, col) pixel size in mm."""
    axis = _axis(plane)
    n = volume.shape[axis]
    i = n // 2 if index is None else int(index)
    if not 0 <= i < n:
        raise RenderError(f"slice {i} is out of range for the {plane} plane (0..{n - 1})")
    sx, sy, sz = (float(s) for s in spacing[:3])
    if plane == "axial":
        img = volume[:, :, i].T  # rows = y (posterior -> anterior), cols = x (left -> right)
        img = img[::-1, ::-1]  # anterior up, patient right on the left
        px = (sy, sx)
    elif plane == "coronal":
        img = volume[:, i, :].T  # rows = z, cols = x
        img = img[::-1, ::-1]  # superior up, patient right on the left
        px = (sz, sx)
    else:
        img = volume[i, :, :].T  # rows = z, cols = y
        img = img[::-1, ::-1]  # superior up, anterior on the left
        px = (sz, sy)
    return np.ascontiguousarray(img), px


def to_png(img: np.ndarray, pixel_mm: tuple[float, float], lo: float, hi: float, max_side: int = 256) -> bytes:
    from PIL import Image

    grey = np.clip((img.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)
    pil = Image.fromarray((grey * 255).astype(np.uint8), mode="L")
    h_mm, w_mm = img.shape[0] * pixel_mm[0], img.shape[1] * pixel_mm[1]
    scale = max_side / max(h_mm, w_mm)
    size = (max(1, round(w_mm * scale)), max(1, round(h_mm * scale)))
    pil = pil.resize(size, Image.BILINEAR)
    buf = io.BytesIO()
    pil.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def render_slice(volume: np.ndarray, spacing, modality: str, plane: str, index: int | None = None,
                 window: str | None = None, max_side: int = 256, value_range: tuple[float, float] | None = None) -> bytes:
    img, px = plane_image(volume, spacing, plane, index)
    lo, hi = value_range or intensity_range(volume, modality, window)
    return to_png(img, px, lo, hi, max_side)
