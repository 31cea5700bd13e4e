"""Two-view instance training: the rigid motion of the second view, and the loss that pairs views."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from voxsearch.training.augment import rigid_jitter, rigid_transform
from voxsearch.training.view_loss import view_loss


def _smooth_volume(shape, seed=0):
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    return gaussian_filter(rng.random(shape), 2).astype(np.float32)


def _rotation(angles):
    c, s = np.cos(angles), np.sin(angles)
    r_d = np.array([[1, 0, 0], [0, c[0], -s[0]], [0, s[0], c[0]]])
    r_h = np.array([[c[1], 0, s[1]], [0, 1, 0], [-s[1], 0, c[1]]])
    r_w = np.array([[c[2], -s[2], 0], [s[2], c[2], 0], [0, 0, 1]])
    return r_d @ r_h @ r_w


def test_rigid_transform_matches_scipy_on_an_anisotropic_grid():
    from scipy.ndimage import affine_transform

    volume = _smooth_volume((12, 20, 16))
    angles, shifts = np.array([0.2, -0.15, 0.1]), np.array([1.0, -2.0, 0.5])
    out = rigid_transform(torch.from_numpy(volume)[None, None], torch.tensor(angles[None], dtype=torch.float32),
                          torch.tensor(shifts[None], dtype=torch.float32))[0, 0].numpy()
    rot = _rotation(angles)
    centre = (np.array(volume.shape) - 1) / 2
    ref = affine_transform(volume, rot, offset=centre - rot @ centre + shifts, order=1, mode="constant", cval=0.0)
    inner = (slice(3, -3),) * 3  # the two differ only in how they blend the zero fill at the border
    np.testing.assert_allclose(out[inner], ref[inner], atol=1e-5)


def test_rigid_jitter_without_motion_is_identity_and_with_motion_moves_each_volume_differently():
    batch = torch.from_numpy(np.stack([_smooth_volume((16, 24, 24), s) for s in range(3)]))[:, None]
    still = rigid_jitter(batch, torch.Generator().manual_seed(0), 0.0, 0.0)
    torch.testing.assert_close(still, batch, atol=1e-5, rtol=0)
    moved = rigid_jitter(batch, torch.Generator().manual_seed(0), 5.0, 2.0)
    again = rigid_jitter(batch, torch.Generator().manual_seed(0), 5.0, 2.0)
    torch.testing.assert_close(moved, again)  # seeded
    change = (moved - batch).abs().mean(dim=(1, 2, 3, 4))
    assert (change > 1e-3).all()
    # Same draws applied to three copies of one volume give three different results.
    same = rigid_jitter(batch[:1].repeat(3, 1, 1, 1, 1), torch.Generator().manual_seed(1), 5.0, 2.0)
    assert (same[0] - same[1]).abs().mean() > 1e-3 and (same[1] - same[2]).abs().mean() > 1e-3


def test_small_motion_keeps_left_on_the_left():
    volume = torch.zeros(1, 1, 16, 32, 32)
    volume[..., 4:12, 10:22, 2:10] = 1.0  # a block on one side along W
    moved = rigid_jitter(volume.repeat(8, 1, 1, 1, 1), torch.Generator().manual_seed(3), 4.0, 2.0)
    mass = moved[..., :16].sum(dim=(1, 2, 3, 4)) / moved.sum(dim=(1, 2, 3, 4))
    assert (mass > 0.95).all()


def test_view_loss_is_low_when_views_find_each_other_and_high_when_swapped():
    gen = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(16, 32, generator=gen), dim=-1)
    b = torch.nn.functional.normalize(a + 0.05 * torch.randn(16, 32, generator=gen), dim=-1)
    matched = view_loss(a, b, 0.1)
    shuffled = view_loss(a, b[torch.roll(torch.arange(16), 1)], 0.1)
    assert float(matched) < 0.05 < math.log(16) < float(shuffled)
    # Symmetric, and it pulls matched rows together.
    torch.testing.assert_close(view_loss(a, b, 0.1), view_loss(b, a, 0.1))
    x = a.clone().requires_grad_(True)
    view_loss(x, b, 0.1).backward()
    assert float((x.grad * (b - a)).sum()) < 0  # the gradient step moves a towards b


def test_view_loss_refuses_mismatched_views():
    with pytest.raises(ValueError, match="shape"):
        view_loss(torch.zeros(4, 8), torch.zeros(3, 8), 0.1)
