"""Training-time augmentation of preprocessed volumes that keeps anatomy where it is.

Input and output are (1, D, H, W) float arrays in [0, 1] as `voxsearch.ingest.load_volume` returns.
Reports name sides ("left kidney", "right lung"), so nothing here flips or rotates the patient: a
left-right flip with a 90-degree axial turn leaves patient left on image left in only about half of
the samples and teaches the model that side words mean nothing. What varies between scanners and
visits does vary here: a few voxels of position, contrast and brightness, gamma, noise.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class VolumeAugment:
    """Seeded, checkpointable shift / intensity / gamma / noise changes."""

    def __init__(self, seed: int, max_shift: int = 2, scale: float = 0.1, offset: float = 0.05,
                 gamma: float = 0.2, noise: float = 0.02):
        self.rng = np.random.default_rng(seed)
        self.max_shift, self.scale, self.offset, self.gamma, self.noise = max_shift, scale, offset, gamma, noise

    def _shift(self, volume: np.ndarray) -> np.ndarray:
        # Translation with zero fill (air), not np.roll: wrapping would paste the body's far edge in.
        out = np.zeros_like(volume)
        src, dst = [slice(None)], [slice(None)]
        for n in volume.shape[1:]:
            s = int(self.rng.integers(-self.max_shift, self.max_shift + 1)) if n > 4 * self.max_shift else 0
            src.append(slice(max(0, -s), n - max(0, s)))
            dst.append(slice(max(0, s), n - max(0, -s)))
        out[tuple(dst)] = volume[tuple(src)]
        return out

    def __call__(self, volume: np.ndarray) -> np.ndarray:
        out = np.asarray(volume, dtype=np.float32)
        if self.max_shift:
            out = self._shift(out)
        if self.gamma:
            out = np.power(np.clip(out, 0.0, 1.0), float(np.exp(self.rng.uniform(-self.gamma, self.gamma))))
        out = out * float(1.0 + self.rng.uniform(-self.scale, self.scale)) + float(self.rng.uniform(-self.offset, self.offset))
        if self.noise:
            out = out + self.rng.normal(0.0, float(self.rng.uniform(0.0, self.noise)), size=out.shape).astype(np.float32)
        return np.ascontiguousarray(np.clip(out, 0.0, 1.0), dtype=np.float32)

    def state(self) -> dict[str, Any]:
        return self.rng.bit_generator.state

    def set_state(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state
