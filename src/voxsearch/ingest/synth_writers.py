"""Write phantom volumes the way real archives hold them: NIfTI, DICOM series, M3D .npy."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
STORAGE_ORIENTATIONS = ("RAS", "LPS", "LAS", "RPI", "LIP", "ASR")  # ASR: stored as sagittal slabs


def reorient(array: np.ndarray, affine: np.ndarray, axcodes: str) -> tuple[np.ndarray, np.ndarray]:
    """The same voxels stored in another axis order/direction (what scanners and converters do)."""
    img = nib.Nifti1Image(array, affine)
    start = nib.orientations.io_orientation(affine)
    out = img.as_reoriented(nib.orientations.ornt_transform(start, nib.orientations.axcodes2ornt(axcodes)))
    return np.asarray(out.dataobj), out.affine


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray, modality: str, scaled: bool = False) -> None:
    """Integers as scanners export them; scaled=True stores uint16 with scl_slope/scl_inter, which
    readers must apply exactly once to get HU back."""
    if scaled:
        img = nib.Nifti1Image(array.astype(np.float32), affine)
        img.set_data_dtype(np.uint16)  # nibabel picks slope/intercept to fit the range
    else:
        dtype = np.int16 if modality == "CT" else np.uint16
        img = nib.Nifti1Image(np.round(array).astype(dtype), affine)
    img.header["descrip"] = b"voxsearch phantom"
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))  # into the archive's staging folder, which generate_archive renames whole


def write_npy(path: Path, array: np.ndarray, modality: str) -> None:
    """M3D layout: (1, D, H, W) in [0, 1], D inferior->superior, H anterior->posterior, W right->left."""
    if modality == "CT":
        unit = np.clip((array + 160.0) / 400.0, 0.0, 1.0)
    else:
        lo, hi = np.percentile(array, (0.5, 99.5))
        unit = np.clip((array - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    out = np.ascontiguousarray(unit[::-1, ::-1, :].transpose(2, 1, 0)[None], dtype=np.float32)
    np.save(path, out)


def write_dicom_series(
    folder: Path,
    array: np.ndarray,
    affine: np.ndarray,
    modality: str,
    uids: dict,
    patient: dict,
    study: dict,
    rng: np.random.Generator,
) -> list[str]:
    """Slices along the array's third axis, with geometry derived from the RAS affine.

    File names are random and InstanceNumbers follow acquisition order, so a reader has to sort by
    ImagePositionPatient. CT pixels are stored with RescaleSlope/Intercept (so HU needs the LUT).
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    ras_to_lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps = ras_to_lps @ affine
    sp = np.sqrt((lps[:3, :3] ** 2).sum(axis=0))
    row_dir, col_dir = lps[:3, 0] / sp[0], lps[:3, 1] / sp[1]
    slope, intercept = (1.0, -1024.0) if modality == "CT" else (1.0, 0.0)
    if modality == "CT" and rng.random() < 0.3:
        slope, intercept = 2.0, -2048.0
    stored = np.clip(np.round((array - intercept) / slope), 0, 65535).astype(np.uint16)
    names = []
    descending = rng.random() < 0.5
    n = array.shape[2]
    for k in range(n):
        meta = FileMetaDataset()
        sop_uid = generate_uid(entropy_srcs=[uids["series"], str(k)])
        meta.MediaStorageSOPClassUID = CT_STORAGE if modality == "CT" else MR_STORAGE
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        # Random-looking but seeded names: readers must not rely on file order.
        name = f"{hashlib.sha256(sop_uid.encode()).hexdigest()[:12]}.dcm"
        ds = FileDataset(name, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = uids["study"]
        ds.SeriesInstanceUID = uids["series"]
        ds.FrameOfReferenceUID = uids["frame"]
        ds.Modality = modality
        ds.PatientName = patient["name"]
        ds.PatientID = patient["id"]
        ds.PatientBirthDate = patient["birth_date"]
        ds.PatientSex = patient["sex"]
        ds.StudyDate = study["date"].replace("-", "")
        ds.StudyTime = "101500"
        ds.AccessionNumber = study["accession"]
        ds.BodyPartExamined = study["body_part"].upper()
        ds.StudyDescription = f"{modality} {study['body_part']}"
        ds.SeriesNumber = 2
        ds.InstanceNumber = (n - k) if descending else (k + 1)
        pos = lps @ np.array([0.0, 0.0, k, 1.0])
        ds.ImagePositionPatient = [f"{v:.4f}" for v in pos[:3]]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
        # PixelSpacing is (between rows, between columns); rows advance along the array's 2nd axis.
        ds.PixelSpacing = [f"{sp[1]:.4f}", f"{sp[0]:.4f}"]
        ds.SliceThickness = f"{sp[2]:.4f}"
        ds.Rows, ds.Columns = int(array.shape[1]), int(array.shape[0])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        ds.save_as(str(folder / name), enforce_file_format=True)
        names.append(name)
    return names


def fake_patient(rng: np.random.Generator, index: int) -> dict:
    """Planted identifiers: obviously fake but shaped like real ones, so leaks are detectable."""
    first = ["ALVA", "BORIS", "CLEO", "DARIO", "EDDA", "FINN", "GRETA", "HUGO", "ILSE", "JONAS"]
    last = ["QUIRKSON", "VALDERRAMA", "OKONKWO", "LINDQVIST", "MORAVEC", "TANAKAWA", "ZELLWEGER", "HALVORSEN"]
    birth = dt.date(1935, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365 * 65)))
    return {
        "name": f"{last[int(rng.integers(len(last)))]}^{first[int(rng.integers(len(first)))]}{index:03d}",
        "id": f"PID{int(rng.integers(10**7, 10**8))}",
        "birth_date": birth.strftime("%Y%m%d"),
        "sex": "F" if rng.random() < 0.5 else "M",
    }
