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


def rigid_jitter(volumes, generator, max_degrees: float, max_shift: float):
    """Small random rotations about every axis plus shifts of up to ``max_shift`` voxels of a
    (B, 1, D, H, W) torch batch, one draw per volume: what a patient moving between two visits does,
    small enough that left stays left."""
    import math

    import torch

    b = volumes.shape[0]
    angles = (torch.rand(b, 3, generator=generator) * 2 - 1) * math.radians(max_degrees)
    shifts = (torch.rand(b, 3, generator=generator) * 2 - 1) * max_shift
    return rigid_transform(volumes, angles, shifts)


def rigid_transform(volumes, angles, shifts):
    """Resample each (1, D, H, W) volume of a batch as seen after rotating it about its centre by
    ``angles`` (B, 3) radians about the D, H and W axes and moving it by ``shifts`` (B, 3) voxels along
    them; trilinear, zero fill (air after preprocessing). Output voxel v reads input R v + t."""
    import torch
    import torch.nn.functional as F

    b = volumes.shape[0]
    cos, sin = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones(b), torch.zeros(b)
    # In (D, H, W) voxel coordinates.
    r_d = torch.stack([one, zero, zero, zero, cos[:, 0], -sin[:, 0], zero, sin[:, 0], cos[:, 0]], 1).view(b, 3, 3)
    r_h = torch.stack([cos[:, 1], zero, sin[:, 1], zero, one, zero, -sin[:, 1], zero, cos[:, 1]], 1).view(b, 3, 3)
    r_w = torch.stack([cos[:, 2], -sin[:, 2], zero, sin[:, 2], cos[:, 2], zero, zero, zero, one], 1).view(b, 3, 3)
    rot = r_d @ r_h @ r_w
    # affine_grid speaks normalised (x=W, y=H, z=D) coordinates in [-1, 1]: reverse the axes, and rotate in
    # voxel units (rotating normalised coordinates of an anisotropic grid would shear).
    flip = torch.eye(3).flip(0)
    half = (torch.tensor(volumes.shape[2:], dtype=torch.float32).flip(0) - 1).clamp_min(1) / 2
    linear = torch.diag(1 / half) @ (flip @ rot @ flip) @ torch.diag(half)
    offset = (shifts.flip(1) / half).unsqueeze(-1)
    theta = torch.cat([linear, offset], dim=2).to(volumes.dtype)
    grid = F.affine_grid(theta, list(volumes.shape), align_corners=True)
    return F.grid_sample(volumes, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
