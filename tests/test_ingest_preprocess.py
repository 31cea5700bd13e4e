"""Preprocessing: layout, range, determinism, the HU contract, window override, real head CT."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest

from test_ingest_helpers import phantom_hu, save_nifti
from voxsearch.ingest import IngestError, PreprocessConfig, Volume, preprocess_path
from voxsearch.ingest.preprocess import PRESETS, preprocess_volume

SMALL = PreprocessConfig(spatial_size=(8, 16, 16))
CRANIUM = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")


def _ct(array, units="HU", modality="CT"):
    return Volume(array=np.asarray(array, np.float32), spacing=(1.0, 1.0, 1.0), modality=modality,
                  affine=np.eye(4), units=units)


def test_config_id_dict_round_trip_and_presets():
    cfg = PreprocessConfig(spatial_size=[32, 64, 64], ct_window=[50, 350])
    d = cfg.to_dict()
    assert d["id"] == cfg.id and d["spatial_size"] == [32, 64, 64] and "HU" in d["contract"]["input"]
    again = PreprocessConfig.from_dict(d)
    assert again == cfg and again.id == cfg.id
    assert PreprocessConfig().id != cfg.id
    assert PRESETS["m3d"].spatial_size == (32, 256, 256) and PRESETS["med3dvlm"].spatial_size == (128, 256, 256)
    with pytest.raises(ValueError, match="version"):
        PreprocessConfig.from_dict({**d, "pipeline_version": 999})


def test_output_shape_range_and_bit_for_bit_determinism(tmp_path):
    path = save_nifti(tmp_path / "v.nii.gz", phantom_hu(), np.diag([-1.0, -1.0, 2.0, 1.0]))
    a = preprocess_path(path, SMALL)
    b = preprocess_path(path, SMALL)
    assert a.dtype == np.float32 and a.shape == (1, 8, 16, 16)
    assert 0.0 <= a.min() and a.max() <= 1.0 and a.max() > 0.5
    assert a.tobytes() == b.tobytes()


def test_layout_is_radiological_d_h_w(tmp_path):
    """D runs inferior->superior, H anterior->posterior, W patient right->left."""
    arr = np.full((16, 16, 8), 40, np.int16)
    arr[12:, :, :] = 300  # patient right (RAS +x): must land at small W
    arr[:, 12:, :4] = -1000 + 1400  # anterior (+y) & inferior: small H, small D
    path = save_nifti(tmp_path / "v.nii", arr, np.eye(4))
    out = preprocess_path(path, PreprocessConfig(spatial_size=(8, 16, 16), crop_foreground=False))[0]
    assert out[:, :, :4].mean() > out[:, :, 12:].mean() + 0.3  # right side at small W
    assert out[:4, :4, 6:10].mean() > out[4:, :4, 6:10].mean()  # anterior-inferior block


def test_ct_window_and_per_study_override():
    vol = np.full((10, 10, 10), 40.0, np.float32)
    vol[0, 0, 0] = -1000.0
    default = preprocess_volume(_ct(vol), PreprocessConfig(spatial_size=(10, 10, 10), crop_foreground=False))
    assert default[0, 5, 5, 5] == pytest.approx((40 - (40 - 200)) / 400)  # soft tissue: L40 W400
    brain = preprocess_volume(_ct(vol), PreprocessConfig(spatial_size=(10, 10, 10), crop_foreground=False), window=(40, 80))
    assert brain[0, 5, 5, 5] == pytest.approx(0.5)


def test_hu_rescale_contract_refuses_already_normalised_ct():
    unit = np.random.default_rng(0).random((10, 10, 10)).astype(np.float32)
    with pytest.raises(IngestError, match="rescale twice"):
        preprocess_volume(_ct(unit), SMALL)
    with pytest.raises(IngestError, match="must be in HU"):
        preprocess_volume(_ct(unit * 1000, units="raw"), SMALL)
    # The same array declared as normalised passes through unwindowed.
    out = preprocess_volume(_ct(unit, units="unit"), PreprocessConfig(spatial_size=(10, 10, 10), crop_foreground=False))
    np.testing.assert_allclose(out[0].transpose(2, 1, 0)[::-1, ::-1, :], unit, atol=1e-6)


def test_mr_percentile_normalisation():
    rng = np.random.default_rng(1)
    mr = rng.gamma(2.0, 200.0, size=(16, 16, 16)).astype(np.float32)
    out = preprocess_volume(_ct(mr, units="raw", modality="MR"), PreprocessConfig(spatial_size=(16, 16, 16), crop_foreground=False))
    assert out.min() == 0.0 and out.max() == 1.0
    assert 0.2 < float(np.mean(out)) < 0.6


def test_foreground_crop_removes_air():
    vol = np.full((40, 40, 20), -1000.0, np.float32)
    vol[10:20, 10:20, 5:15] = 40.0
    cfg = PreprocessConfig(spatial_size=(4, 4, 4))
    assert preprocess_volume(_ct(vol), cfg).min() > 0.4  # only body left
    assert preprocess_volume(_ct(vol), PreprocessConfig(spatial_size=(4, 4, 4), crop_foreground=False)).min() == 0.0
    air = np.full((8, 8, 8), -1000.0, np.float32)  # nothing to crop to: left alone, no crash
    assert preprocess_volume(_ct(air), cfg).max() == 0.0


def test_target_spacing_resample():
    vol = np.full((20, 20, 10), 40.0, np.float32)
    vol[0] = -1000
    v = Volume(array=vol, spacing=(1.0, 1.0, 2.0), modality="CT", affine=np.diag([1.0, 1.0, 2.0, 1.0]))
    out = preprocess_volume(v, PreprocessConfig(spatial_size=(8, 8, 8), target_spacing=(2.0, 2.0, 2.0)))
    assert out.shape == (1, 8, 8, 8)


def test_synth_lesions_visible_at_small_model_size(tmp_path):
    """A phantom liver cyst must still stand out after preprocessing to (32, 64, 64)."""
    from voxsearch.ingest.synth_phantom import render

    rng = np.random.default_rng(3)
    finding = [{"type": "cyst", "organ": "liver", "side": None, "size_mm": 20, "count": 1, "phase": "portal venous"}]
    with_lesion, aff = render(np.random.default_rng(3), "abdomen", "CT", "portal venous", finding, "tiny")
    normal, _ = render(np.random.default_rng(3), "abdomen", "CT", "portal venous", [], "tiny")
    cfg = PreprocessConfig(spatial_size=(32, 64, 64))
    a = preprocess_volume(Volume(with_lesion, (1, 1, 1), "CT", aff), cfg)
    b = preprocess_volume(Volume(normal, (1, 1, 1), "CT", aff), cfg)
    # Same noise, same anatomy: the difference is the lesion, ~0.25 deep over >= a few voxels.
    diff = np.abs(a - b)
    assert diff.max() > 0.2 and (diff > 0.1).sum() >= 8
    del rng


def _cranium_nifti(tmp_path) -> Path:
    if not CRANIUM.is_file():
        pytest.skip(f"real head CT absent: {CRANIUM} (Debian package invesalius-examples)")
    with tarfile.open(CRANIUM) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("matrix.dat"))
        raw = tar.extractfile(member).read()
    m = np.frombuffer(raw, np.int16).reshape(108, 256, 256)  # (z, y, x), HU
    import nibabel as nib

    path = tmp_path / "cranium.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(m.transpose(2, 1, 0)), np.diag([0.957, 0.957, 1.5, 1.0])), str(path))
    return path


def test_real_head_ct_through_preprocessing(tmp_path):
    path = _cranium_nifti(tmp_path)
    from voxsearch.ingest import read_volume_path

    vol = read_volume_path(path)
    assert vol.modality == "CT" and vol.array.min() <= -1000 and vol.array.max() > 1000  # HU: air and bone
    out = preprocess_path(path, PreprocessConfig(spatial_size=(32, 64, 64)))
    assert out.shape == (1, 32, 64, 64) and 0.0 <= out.min() and out.max() <= 1.0
    # Brain soft tissue sits mid-window; the foreground crop removed most of the air around the head.
    assert 0.3 < float(np.median(out[out > 0])) < 0.7
    uncropped = preprocess_path(path, PreprocessConfig(spatial_size=(32, 64, 64), crop_foreground=False))
    assert float((out == 0).mean()) < float((uncropped == 0).mean())  # the head holder arc limits the crop
    assert preprocess_path(path, PreprocessConfig(spatial_size=(32, 64, 64))).tobytes() == out.tobytes()
