"""Training-time augmentation of preprocessed volumes, as Med3DVLM (after M3D) does it, with MONAI.

Input and output are (1, D, H, W) float arrays in [0, 1] as `voxsearch.ingest.load_volume` returns:
the axial plane is (H, W), so the 90-degree rotation turns about the depth axis and never mixes
slices with in-plane pixels of a different spacing.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class VolumeAugment:
    """Seeded, checkpointable random rotation/flips/intensity changes."""

    def __init__(self, seed: int):
        from monai.transforms import Compose, RandFlip, RandRotate90, RandScaleIntensity, RandShiftIntensity

        self._compose = Compose(
            [
                RandRotate90(prob=0.5, max_k=3, spatial_axes=(1, 2)),
                RandFlip(prob=0.1, spatial_axis=0),
                RandFlip(prob=0.1, spatial_axis=1),
                RandFlip(prob=0.1, spatial_axis=2),
                RandScaleIntensity(factors=0.1, prob=0.5),
                RandShiftIntensity(offsets=0.1, prob=0.5),
            ]
        )
        self._compose.set_random_state(seed=seed)

    def __call__(self, volume: np.ndarray) -> np.ndarray:
        out = self._compose(volume)
        out = out.numpy() if hasattr(out, "numpy") else np.asarray(out)
        # Rotations of a non-square plane change its shape; the batch needs one shape, so rotate by
        # 180 degrees at most in that case (still a valid axial-plane rotation).
        if out.shape != volume.shape:
            out = np.rot90(out, k=1, axes=(2, 3))
        return np.ascontiguousarray(out, dtype=np.float32)

    def state(self) -> list[Any]:
        return [t.R.get_state() for t in self._compose.transforms]

    def set_state(self, states: list[Any]) -> None:
        for t, s in zip(self._compose.transforms, states):
            t.R.set_state(s)
