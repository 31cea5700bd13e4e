"""Uploads the serve tests send: zipped DICOM series with identifiers planted in their headers, and
the check that an upload is refused."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

# Raw header text planted where a number belongs; as long as the placeholder so the element length holds.
SLOPE_PLACEHOLDER = b"9.876543"


def dicom_header(rows: int, cols: int, sop_class=None, meta_only: bool = False):
    """A minimal DICOM dataset (explicit little endian) with `rows` x `cols` set."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    sop_class = sop_class or CTImageStorage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = rows, cols
    return ds


def dicom_series_zip(hu: np.ndarray, patient: tuple[str, str, str], folder: str = "", spacing=(1.0, 1.0, 2.0),
                     rescale_slope: bytes | None = None) -> bytes:
    """A zipped CT series of `hu` (columns, rows, slices; int HU) whose headers name `patient`
    (name, id, birth date). `rescale_slope` plants raw text in RescaleSlope, the kind of header value
    reader errors quote."""
    import pydicom
    from pydicom.uid import generate_uid

    cols, rows, slices = hu.shape
    series, study = generate_uid(), generate_uid()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for k in range(slices):
            ds = dicom_header(rows, cols)
            ds.PatientName, ds.PatientID, ds.PatientBirthDate = patient
            ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "CT", series, study
            ds.PixelSpacing = [float(spacing[0]), float(spacing[1])]
            ds.SliceThickness = float(spacing[2])
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.ImagePositionPatient = [0.0, 0.0, float(spacing[2]) * k]
            ds.RescaleSlope = SLOPE_PLACEHOLDER.decode() if rescale_slope else 1
            ds.RescaleIntercept = -1024
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
            ds.PixelRepresentation, ds.SamplesPerPixel = 0, 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.PixelData = (hu[:, :, k].T.astype(np.int32) + 1024).clip(0, 65535).astype(np.uint16).tobytes()
            out = io.BytesIO()
            pydicom.dcmwrite(out, ds, enforce_file_format=True)
            blob = out.getvalue()
            if rescale_slope:
                assert blob.count(SLOPE_PLACEHOLDER) == 1
                blob = blob.replace(SLOPE_PLACEHOLDER, rescale_slope)
            zf.writestr(f"{folder}/slice{k:03d}.dcm" if folder else f"slice{k:03d}.dcm", blob)
    return buf.getvalue()


def refused_upload(tmp_path, data: bytes, limits):
    """The UploadError that prepare_upload raises for `data` (fails the test when it accepts it)."""
    from voxsearch.serve.uploads import UploadError, prepare_upload

    workdir = tmp_path / "w"
    workdir.mkdir()
    path = workdir / "upload.bin"
    path.write_bytes(data)
    with pytest.raises(UploadError) as err:
        prepare_upload(workdir, path, len(data), limits)
    return err.value
