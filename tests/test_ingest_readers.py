"""Readers against volumes written by the tests: geometry, HU rescale, sorting, bad input."""

from __future__ import annotations

import zipfile

import nibabel as nib
import numpy as np
import pytest

from test_ingest_helpers import lps_axial_affine, phantom_hu, save_nifti, write_axial_dicom
from voxsearch.ingest import IngestError, read_volume_path, read_volume_row


def test_nifti_reoriented_to_ras_with_spacing(tmp_path):
    native = phantom_hu()
    aff = lps_axial_affine()
    vol = read_volume_path(save_nifti(tmp_path / "v.nii.gz", native, aff))
    # LPS storage: RAS means both in-plane axes reversed.
    np.testing.assert_array_equal(vol.array, native[::-1, ::-1, :].astype(np.float32))
    assert vol.spacing == pytest.approx((0.7, 0.8, 2.5))
    assert vol.modality == "CT" and vol.units == "HU" and vol.source_orientation == "LPS"
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")


def test_nifti_permuted_axes(tmp_path):
    native = phantom_hu()
    img = nib.Nifti1Image(native, np.diag([1.5, 2.0, 3.0, 1.0]))
    sag = img.as_reoriented(nib.orientations.axcodes2ornt("SPL"))  # stored as sagittal slabs
    vol = read_volume_path(save_nifti(tmp_path / "sag.nii", np.asarray(sag.dataobj), sag.affine))
    np.testing.assert_array_equal(vol.array, native.astype(np.float32))
    assert vol.spacing == pytest.approx((1.5, 2.0, 3.0))


def test_nifti_scl_slope_applied_exactly_once(tmp_path):
    hu = phantom_hu().astype(np.float32)
    img = nib.Nifti1Image(hu, np.eye(4))
    img.set_data_dtype(np.uint16)  # nibabel stores with scl_slope / scl_inter
    save = tmp_path / "scaled.nii.gz"
    nib.save(img, str(save))
    assert nib.load(str(save)).dataobj.slope != 1.0
    vol = read_volume_path(save)
    np.testing.assert_allclose(vol.array, hu, atol=0.05)


@pytest.mark.parametrize("slope,intercept", [(1.0, -1024.0), (2.0, -2048.0)])
def test_dicom_series_sorted_by_position_and_rescaled_to_hu(tmp_path, slope, intercept):
    native = phantom_hu()
    native[native % 2 == 1] -= 1  # even values survive slope 2 exactly
    write_axial_dicom(tmp_path / "s", native, slope=slope, intercept=intercept)
    vol = read_volume_path(tmp_path / "s")
    np.testing.assert_array_equal(vol.array, native[::-1, ::-1, :].astype(np.float32))
    assert vol.spacing == pytest.approx((0.7, 0.8, 2.5))
    assert vol.modality == "CT" and vol.units == "HU"
    np.testing.assert_allclose(vol.affine, read_volume_path(save_nifti(tmp_path / "n.nii", native, lps_axial_affine())).affine, atol=1e-6)


def test_dicom_zip_equals_folder(tmp_path):
    native = phantom_hu()
    names = write_axial_dicom(tmp_path / "s", native)
    with zipfile.ZipFile(tmp_path / "s.zip", "w") as zf:
        for n in names:
            zf.write(tmp_path / "s" / n, arcname=f"series/{n}")
    np.testing.assert_array_equal(read_volume_path(tmp_path / "s.zip").array, read_volume_path(tmp_path / "s").array)


def test_dicom_and_nifti_of_same_volume_give_same_tensor(tmp_path):
    from voxsearch.ingest import PreprocessConfig, preprocess_path

    native = phantom_hu()
    write_axial_dicom(tmp_path / "s", native)
    save_nifti(tmp_path / "v.nii.gz", native, lps_axial_affine())
    cfg = PreprocessConfig(spatial_size=(8, 16, 16))
    a, b = preprocess_path(tmp_path / "s", cfg), preprocess_path(tmp_path / "v.nii.gz", cfg)
    assert a.shape == (1, 8, 16, 16)
    np.testing.assert_array_equal(a, b)


def test_folder_with_two_series_is_refused_for_uploads_but_rows_pick_one(tmp_path):
    native = phantom_hu()
    write_axial_dicom(tmp_path / "mix", native, uid="1.2.3.4.1")
    write_axial_dicom(tmp_path / "mix", native[:, :, :6], uid="1.2.3.4.2", shuffle_seed=5)
    with pytest.raises(IngestError, match="2 DICOM series"):
        read_volume_path(tmp_path / "mix")
    from voxsearch.ingest.dicom_reader import scan_series

    series, bad = scan_series(tmp_path / "mix")
    assert not bad and sorted(len(s.files) for s in series) == [6, 12]
    small = next(s for s in series if len(s.files) == 6)
    vol = read_volume_row({"source_path": str(tmp_path / "mix"), "source_format": "dicom", "source_files": small.files})
    assert vol.array.shape == (20, 24, 6)


def test_dicom_missing_slice_and_mixed_shapes_fail_clearly(tmp_path):
    native = phantom_hu()
    names = write_axial_dicom(tmp_path / "gap", native)
    import pydicom

    by_pos = sorted(names, key=lambda n: float(pydicom.dcmread(tmp_path / "gap" / n).ImagePositionPatient[2]))
    (tmp_path / "gap" / by_pos[5]).unlink()
    with pytest.raises(IngestError, match="irregular slice spacing") as err:
        read_volume_path(tmp_path / "gap")
    assert str(tmp_path / "gap") in str(err.value)
    write_axial_dicom(tmp_path / "mixed", native)
    write_axial_dicom(tmp_path / "extra", native[:10, :10, :1], origin=(10.0, -20.0, 30.0 + 2.5 * 12))
    for p in (tmp_path / "extra").iterdir():
        p.rename(tmp_path / "mixed" / ("x" + p.name))
    with pytest.raises(IngestError, match="mixed size"):
        read_volume_path(tmp_path / "mixed")


def test_npy_m3d_layout_round_trips_through_preprocessing(tmp_path):
    from voxsearch.ingest import PreprocessConfig, preprocess_path

    rng = np.random.default_rng(0)
    arr = rng.random((1, 8, 16, 16)).astype(np.float32)
    np.save(tmp_path / "image.npy", arr)
    vol = read_volume_path(tmp_path / "image.npy")
    assert vol.units == "unit" and vol.array.shape == (16, 16, 8)
    out = preprocess_path(tmp_path / "image.npy", PreprocessConfig(spatial_size=(8, 16, 16), crop_foreground=False))
    np.testing.assert_allclose(out, arr, atol=1e-6)  # same layout in and out: no window, no flip


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda p: save_nifti(p / "flat.nii.gz", np.zeros((8, 8), np.int16), np.eye(4)), "3-D"),
        (lambda p: save_nifti(p / "nan.nii", np.full((6, 6, 6), np.nan, np.float32), np.eye(4)), "NaN"),
        (lambda p: _write(p / "junk.nii.gz", b"\x1f\x8b" + b"junk" * 10), "NIfTI"),
        (lambda p: _write(p / "scan.mha", b"x"), "unsupported"),
    ],
)
def test_bad_files_raise_ingest_error_naming_the_file(tmp_path, make, match):
    path = make(tmp_path)
    with pytest.raises(IngestError, match=match) as err:
        read_volume_path(path)
    assert str(path) in str(err.value)
    assert isinstance(err.value, ValueError)


def test_voxel_budget(tmp_path):
    path = save_nifti(tmp_path / "big.nii", phantom_hu(), np.eye(4))
    with pytest.raises(IngestError, match="voxel budget"):
        read_volume_path(path, max_voxels=1000)


def test_truncated_nifti(tmp_path):
    path = save_nifti(tmp_path / "t.nii.gz", phantom_hu((30, 30, 30)), np.eye(4))
    path.write_bytes(path.read_bytes()[:-2000])
    with pytest.raises(IngestError, match="truncated"):
        read_volume_path(path)
