"""Volume -> model input: a named MONAI dictionary-transform pipeline with a recorded contract.

Output: float32 (1, D, H, W) in [0, 1]; D runs inferior->superior, H anterior->posterior and
W patient-right->patient-left (the radiological slice layout M3D-style PNG stacks use).
CT is windowed from HU (the readers rescale to HU exactly once; the window refuses input that
is not HU or that looks already normalised); MR is normalised by percentiles.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from voxsearch.ingest import monai_lean
from voxsearch.ingest.errors import IngestError
from voxsearch.ingest.volume import HU, RAW, UNIT, Volume

# Bump when the pipeline's arithmetic changes: it is part of PreprocessConfig.id.
PIPELINE_VERSION = 1
CONTRACT = {
    "input": "Volume from voxsearch.ingest readers: RAS voxel order; CT in HU after exactly one rescale "
    "(DICOM RescaleSlope/Intercept or NIfTI scl_slope/scl_inter, applied by the reader); MR raw signal; "
    "already-normalised [0,1] arrays (M3D .npy) pass through unwindowed",
    "steps": ["Orientation RAS", "Spacing (optional)", "CT window or MR percentiles -> [0,1]", "foreground crop",
              "resize (trilinear)", "to (C, D, H, W) radiological layout"],
    "output": "float32 (1, D, H, W) in [0, 1]; D inferior->superior, H anterior->posterior, W right->left",
}


@dataclass(frozen=True)
class PreprocessConfig:
    spatial_size: tuple = (128, 256, 256)  # (D, H, W), Med3DVLM; M3D uses (32, 256, 256)
    target_spacing: tuple | None = None  # mm (x, y, z) to resample to before resizing; None keeps it
    ct_window: tuple = (40.0, 400.0)  # (level, width) HU: soft tissue; a catalog row may override it
    mr_percentiles: tuple = (0.5, 99.5)
    crop_foreground: bool = True
    foreground_threshold: float = 0.05  # on the [0,1] scale: above it is body, not air/background

    def __post_init__(self):
        object.__setattr__(self, "spatial_size", tuple(int(v) for v in self.spatial_size))
        if self.target_spacing is not None:
            object.__setattr__(self, "target_spacing", tuple(float(v) for v in self.target_spacing))
        object.__setattr__(self, "ct_window", tuple(float(v) for v in self.ct_window))
        object.__setattr__(self, "mr_percentiles", tuple(float(v) for v in self.mr_percentiles))
        if len(self.spatial_size) != 3 or min(self.spatial_size) < 1:
            raise ValueError(f"spatial_size must be 3 positive ints (D, H, W), got {self.spatial_size}")
        if self.ct_window[1] <= 0:
            raise ValueError(f"ct_window width must be positive, got {self.ct_window}")

    def fields(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @property
    def id(self) -> str:
        blob = json.dumps({"v": PIPELINE_VERSION, **self.fields()}, sort_keys=True, default=list)
        return "pp-" + hashlib.sha256(blob.encode()).hexdigest()[:12]

    def to_dict(self) -> dict:
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.fields().items()}
        return {**d, "id": self.id, "pipeline_version": PIPELINE_VERSION, "contract": CONTRACT}

    @classmethod
    def from_dict(cls, d: Mapping) -> "PreprocessConfig":
        version = d.get("pipeline_version", PIPELINE_VERSION)
        if version != PIPELINE_VERSION:
            raise ValueError(f"preprocessing pipeline version {version} differs from this code's {PIPELINE_VERSION}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


PRESETS = {"med3dvlm": PreprocessConfig(), "m3d": PreprocessConfig(spatial_size=(32, 256, 256))}


def _transforms():
    """MONAI imports cost seconds; keep them out of module import (CLI start, Ray task pickling)."""
    import torch

    monai_lean.load()
    from monai.transforms import CropForeground, MapTransform

    class ToUnitIntensityd(MapTransform):
        """CT window (per-study override in data["window"]) or MR percentiles, in place, once."""

        def __init__(self, keys, config: PreprocessConfig):
            super().__init__(keys)
            self.config = config

        def __call__(self, data):
            d = dict(data)
            units, modality, name = d["units"], d["modality"], d.get("name", "volume")
            for key in self.key_iterator(d):
                img = d[key]
                if units == UNIT:
                    pass  # already [0, 1]: windowing again would distort it
                elif modality == "CT":
                    if units != HU:
                        raise IngestError(f"{name}: CT input must be in HU, got units {units!r}", stage="preprocess")
                    lo_v, hi_v = float(img.min()), float(img.max())
                    if lo_v >= 0.0 and hi_v <= 1.0:
                        raise IngestError(
                            f"{name}: CT values lie in [0, 1], not HU: already windowed or rescaled; refusing to "
                            "rescale twice (mark it as normalised instead)", stage="preprocess")
                    level, width = d.get("window") or self.config.ct_window
                    lo = level - width / 2.0
                    img.sub_(lo).div_(width).clamp_(0.0, 1.0)
                elif units == RAW:
                    flat = img.detach().cpu().numpy().reshape(-1)
                    # Percentiles on a fixed stride sample: exact enough, deterministic, and no
                    # full-size sort of a 300-slice volume.
                    step = max(1, flat.size // 4_000_000)
                    lo, hi = np.percentile(flat[::step], self.config.mr_percentiles)
                    img.sub_(float(lo)).div_(max(float(hi - lo), 1e-6)).clamp_(0.0, 1.0)
                else:
                    raise IngestError(f"{name}: unsupported intensity units {units!r}", stage="preprocess")
                d[key] = img
            d["units"] = UNIT
            return d

    class CropBodyd(MapTransform):
        """Foreground crop that leaves a volume alone when nothing is above threshold."""

        def __init__(self, keys, threshold: float):
            super().__init__(keys)
            self.threshold = threshold

        def __call__(self, data):
            d = dict(data)
            for key in self.key_iterator(d):
                img = d[key]
                mask = img > self.threshold
                if bool(mask.any()):
                    d[key] = CropForeground(select_fn=_AboveThreshold(self.threshold), allow_smaller=True)(img)
            return d

    return ToUnitIntensityd, CropBodyd, torch


class _AboveThreshold:
    # A class, not a lambda, so pipelines pickle into Ray workers.
    def __init__(self, threshold: float):
        self.threshold = threshold

    def __call__(self, x):
        return x > self.threshold


@lru_cache(maxsize=8)
def build_pipeline(config: PreprocessConfig):
    import numpy as _np

    monai_lean.load()
    from monai.transforms import Compose, Orientationd, Resized, Spacingd

    ToUnitIntensityd, CropBodyd, _ = _transforms()
    steps = [Orientationd(keys="image", axcodes="RAS", labels=None)]
    if config.target_spacing is not None:
        steps.append(Spacingd(keys="image", pixdim=config.target_spacing, mode="bilinear", dtype=_np.float32))
    steps.append(ToUnitIntensityd(keys="image", config=config))
    if config.crop_foreground:
        steps.append(CropBodyd(keys="image", threshold=config.foreground_threshold))
    d, h, w = config.spatial_size
    # MONAI works in (C, X, Y, Z); the model wants (C, D, H, W) = (C, z, -y, -x).
    steps.append(Resized(keys="image", spatial_size=(w, h, d), mode="trilinear", align_corners=False))
    return Compose(steps)


def preprocess_volume(volume: Volume, config: PreprocessConfig, window=None, name: str = "volume",
                      consume: bool = False) -> np.ndarray:
    """consume=True lets the pipeline work in place on volume.array (no second full-size copy:
    the difference between ~0.5 and ~0.8 GB for a 512x512x300 CT); the volume is garbage after."""
    import torch

    monai_lean.load()
    from monai.data import MetaTensor

    if volume.array.ndim != 3:
        raise IngestError(f"{name}: expected a 3-D volume, got shape {volume.array.shape}", stage="preprocess")
    array = volume.array if consume and volume.array.dtype == np.float32 else np.array(volume.array, dtype=np.float32)
    image = MetaTensor(torch.from_numpy(array)[None], affine=torch.from_numpy(np.asarray(volume.affine, np.float64)))
    data = {"image": image, "units": volume.units, "modality": volume.modality, "name": name,
            "window": tuple(float(v) for v in window) if window is not None else None}
    try:
        out = build_pipeline(config)(data)["image"]
    except IngestError:
        raise
    except Exception as exc:  # MONAI wraps errors in RuntimeError chains; surface ours, name the input
        cause = exc
        while cause.__cause__ is not None and not isinstance(cause, IngestError):
            cause = cause.__cause__
        if isinstance(cause, IngestError):
            raise cause from None
        raise IngestError(f"{name}: preprocessing failed ({type(cause).__name__}: {cause})", stage="preprocess") from exc
    tensor = out.as_tensor() if hasattr(out, "as_tensor") else out
    tensor = tensor.permute(0, 3, 2, 1).flip(2, 3).clamp_(0.0, 1.0)
    return np.ascontiguousarray(tensor.numpy(), dtype=np.float32)


def row_window(row: Mapping):
    level, width = row.get("window_center"), row.get("window_width")
    if level is None or width is None or (isinstance(level, float) and np.isnan(level)):
        return None
    return float(level), float(width)


def load_volume(row: Mapping, config: PreprocessConfig) -> np.ndarray:
    """Model input (1, D, H, W) float32 in [0, 1] for a catalog row. Deterministic."""
    from voxsearch.ingest.readers import read_volume_row

    volume = read_volume_row(row)
    return preprocess_volume(volume, config, window=row_window(row), name=str(row.get("source_path", "volume")),
                             consume=True)


def preprocess_path(path, config: PreprocessConfig, modality: str | None = None, window=None) -> np.ndarray:
    """Model input from a NIfTI/.npy file or a folder/zip with one DICOM series (uploads)."""
    from voxsearch.ingest.readers import read_volume_path

    return preprocess_volume(read_volume_path(path, modality=modality), config, window=window, name=str(path),
                             consume=True)
