"""Writers used by the ingest tests: independent of voxsearch's own synth writers on purpose,
so a reader and a writer cannot share one misunderstanding of the geometry."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

PLANTED = {"PatientName": "ZZTESTOVA^HELGA^MARIE", "PatientID": "MRN-55501234", "PatientBirthDate": "19480229"}


def phantom_hu(shape=(20, 24, 12), seed=0) -> np.ndarray:
    """An asymmetric int16 HU volume: air, a body block, and a bright marker in one corner."""
    rng = np.random.default_rng(seed)
    a = np.full(shape, -1000, np.int16)
    a[3:-3, 4:-4, 2:-2] = 40
    a[4:8, 5:9, 3:5] = 300  # marker near low x, low y, low z: any flip moves it
    a += rng.integers(-5, 6, size=shape).astype(np.int16)
    return a


def write_axial_dicom(folder: Path, native: np.ndarray, spacing=(0.7, 0.8, 2.5), origin=(10.0, -20.0, 30.0),
                      slope=1.0, intercept=-1024.0, shuffle_seed=1, uid="1.2.826.0.1.3680043.2.1125.1",
                      modality="CT", identifiers=PLANTED) -> list[str]:
    """native[c, r, k] = pixel (row r, column c) of slice k; standard axial LPS geometry."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(shuffle_seed)
    order = rng.permutation(native.shape[2])
    names = []
    for k in range(native.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = f"{uid}.{k + 1}"
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset("x", {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = uid + ".100", uid, modality
        for key, value in identifiers.items():
            setattr(ds, key, value)
        ds.InstanceNumber = int(order[k]) + 1  # deliberately useless for sorting
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + spacing[2] * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [spacing[1], spacing[0]]  # (between rows, between columns)
        ds.SliceThickness = spacing[2]
        ds.Rows, ds.Columns = native.shape[1], native.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        stored = np.round((native[:, :, k].astype(np.float64) - intercept) / slope).astype(np.int16)
        ds.PixelData = np.ascontiguousarray(stored.T).tobytes()
        name = f"f{int(order[k]):03d}_{rng.integers(1e6)}.dcm"
        ds.save_as(str(folder / name), enforce_file_format=True)
        names.append(name)
    return names


def lps_axial_affine(spacing=(0.7, 0.8, 2.5), origin=(10.0, -20.0, 30.0)) -> np.ndarray:
    """The RAS-world affine of the same native array written by write_axial_dicom."""
    aff = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    aff[:3, 3] = [-origin[0], -origin[1], origin[2]]
    return aff


def save_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path
