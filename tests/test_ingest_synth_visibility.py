"""Every planted finding must be visible in the tensor the model sees, on every modality and contrast
phase it can occur with: a lesion the preprocessing window turns into background teaches the model
that the report's words have no image behind them."""

from __future__ import annotations

import numpy as np
import pytest

from voxsearch.ingest import PreprocessConfig, preprocess_volume
from voxsearch.ingest import synth_phantom
from voxsearch.ingest.synth_vocab import CT_PHASES, LESIONS, MR_PHASES, ORGANS
from voxsearch.ingest.volume import HU, RAW, Volume

SIZE = (48, 96, 96)


def _cases():
    for body, organs in ORGANS.items():
        for organ, paired in organs.items():
            for kind, (lo, _hi, _count) in LESIONS[organ].items():
                for modality, phases in (("CT", sorted(set(CT_PHASES[body]))), ("MR", MR_PHASES)):
                    for phase in phases:
                        yield body, organ, "right" if paired else None, kind, lo, modality, phase


def _preprocessed(array, affine, modality):
    volume = Volume(array=array.copy(), affine=affine, spacing=tuple(np.abs(np.diag(affine)[:3])), modality=modality,
                    units=HU if modality == "CT" else RAW)
    # No foreground crop: noise in the air would move the crop box and misalign the volumes compared.
    return preprocess_volume(volume, PreprocessConfig(spatial_size=SIZE, crop_foreground=False))


def _render(body, modality, phase, findings, noise: bool):
    return synth_phantom.render(np.random.default_rng(5), body, modality, phase, findings, "small", noise=noise)


@pytest.mark.parametrize("body,organ,side,kind,size_mm,modality,phase", list(_cases()))
def test_each_planted_finding_changes_the_model_input_by_more_than_the_noise(
        body, organ, side, kind, size_mm, modality, phase):
    finding = {"type": kind, "organ": organ, "side": side, "size_mm": size_mm, "count": 1, "phase": phase}
    # The anatomy is drawn before any lesion and the noise last, so one seed gives the same body with
    # and without the finding, and with and without noise.
    clean, affine = _render(body, modality, phase, [], noise=False)
    lesion, _ = _render(body, modality, phase, [finding], noise=False)
    noisy, _ = _render(body, modality, phase, [], noise=True)
    a, b = _preprocessed(clean, affine, modality), _preprocessed(lesion, affine, modality)
    n = _preprocessed(noisy, affine, modality)
    changed = np.abs(b - a) > 1e-6
    assert changed.sum() > 0, f"{kind} in the {organ} ({modality}, {phase}) leaves the model input unchanged"
    noise_sd = _voxel_noise(a, n)
    contrast = float(np.abs(b - a).max())
    assert contrast > 3.0 * noise_sd, (
        f"{kind} in the {organ} ({modality}, {phase}): the lesion changes the input by at most "
        f"{contrast:.3f}, not above three times the voxel noise ({noise_sd:.3f})")


def _voxel_noise(clean: np.ndarray, noisy: np.ndarray) -> float:
    """Voxel noise in model-input units, from the high-pass residual of the noisy volume in regions where
    the clean one is flat and not clipped (MR's smooth bias field and percentile shift cancel out)."""
    from scipy.ndimage import uniform_filter

    flat = (np.abs(clean - uniform_filter(clean, 3)) < 1e-6) & (clean > 0.02) & (clean < 0.98)
    residual = noisy - uniform_filter(noisy, 3)
    assert flat.sum() > 1000
    return float(residual[flat].std() / np.sqrt(26 / 27))
