"""Planted bad inputs for the phantom archive: each must end as an errors-table row, never a crash."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np

from voxsearch.ingest.synth_writers import write_dicom_series

# defect -> what ingest must do with it
DEFECTS = {
    "truncated_nifti": "error",
    "nan_voxels": "error",
    "not_3d": "error",
    "mixed_shape_dicom": "error",
    "corrupt_dicom": "error",
    "over_budget": "error",
    "missing_report": "warning",
}


def write_defect(kind: str, root: Path, rel: str, rng: np.random.Generator, patient: dict) -> str:
    """Write one defective input under root/rel; returns the manifest path (relative)."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([2.0, 2.0, 4.0, 1.0])
    ct = np.full((24, 24, 12), -1000, np.int16)
    ct[4:20, 4:20, 2:10] = 40
    if kind == "truncated_nifti":
        path = path.with_name(path.name + ".nii.gz")
        nib.save(nib.Nifti1Image(ct, affine), str(path))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "nan_voxels":
        path = path.with_name(path.name + ".nii.gz")
        bad = ct.astype(np.float32)
        bad[5:8, 5:8, 5] = np.nan
        nib.save(nib.Nifti1Image(bad, affine), str(path))
    elif kind == "not_3d":
        path = path.with_name(path.name + ".nii.gz")
        nib.save(nib.Nifti1Image(ct[:, :, 0], affine), str(path))
    elif kind == "over_budget":
        # A header that claims 2048^3 voxels over a tiny payload: must be refused before reading.
        path = path.with_name(path.name + ".nii.gz")
        header = nib.Nifti1Header()
        header.set_data_shape((2048, 2048, 2048))
        header.set_data_dtype(np.int16)
        with gzip.open(path, "wb") as fh:
            fh.write(header.binaryblock + b"\0" * 4 + b"\0" * 1024)
    elif kind == "mixed_shape_dicom":
        uids = {k: f"2.25.{int(rng.integers(10**12, 10**13))}{i}" for i, k in enumerate(("study", "series", "frame"))}
        study = {"date": "2020-01-01", "accession": "ACC000", "body_part": "abdomen"}
        write_dicom_series(path, ct.astype(np.float32), affine, "CT", uids, patient, study, rng)
        odd = np.full((20, 20, 1), -1000, np.float32)
        odd_aff = affine.copy()
        odd_aff[2, 3] = 12 * 4.0
        uids2 = dict(uids)
        files = write_dicom_series(path / "extra", odd, odd_aff, "CT", {**uids2, "series": uids["series"]}, patient, study, rng)
        for f in files:
            (path / "extra" / f).rename(path / f"extra-{f}")
        (path / "extra").rmdir()
    elif kind == "corrupt_dicom":
        path.mkdir(parents=True, exist_ok=True)
        for i in range(3):
            (path / f"slice{i}.dcm").write_bytes(b"DICM" + rng.bytes(300))
    elif kind == "missing_report":
        path = path.with_name(path.name + ".nii.gz")
        nib.save(nib.Nifti1Image(ct, affine), str(path))
    else:
        raise ValueError(f"unknown defect {kind!r}; choose from {sorted(DEFECTS)}")
    return str(path.relative_to(root).as_posix())
