"""DICOM series (a folder or a zip of slice files) through pydicom.

Slices are grouped by SeriesInstanceUID, ordered by ImagePositionPatient projected on the slice
normal (file names and InstanceNumber are not trusted), converted to HU with the per-slice
RescaleSlope/Intercept, and placed in a RAS-ordered array with geometry from the headers.
Header identifiers are read only so they can be hashed (deid.py) and scrubbed from messages.
"""

from __future__ import annotations

import io
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from voxsearch.ingest.checks import check_budget, check_finite
from voxsearch.ingest.deid import DICOM_IDENTIFIER_KEYWORDS
from voxsearch.ingest.errors import IngestError
from voxsearch.ingest.volume import HU, RAW, Volume, orientation_code, ras_buffer, spacing_of

log = logging.getLogger(__name__)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
SUPPORTED_MODALITIES = ("CT", "MR")


@dataclass
class SeriesInfo:
    """What discovery learns about one series from its headers (nothing here is stored raw)."""

    source: Path  # the folder or zip holding it
    files: list[str]  # member names relative to `source`
    series_uid: str
    study_uid: str
    modality: str
    body_part: str | None
    study_date: str | None
    identifiers: dict = field(default_factory=dict)  # PatientID/Name/BirthDate: hash or scrub only


class _Source:
    """Uniform access to slice files in a folder or a zip archive."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._zip = None
        if self.path.is_file():
            if not zipfile.is_zipfile(self.path):
                raise IngestError(f"{self.path}: neither a folder nor a zip of DICOM files")
            self._zip = zipfile.ZipFile(self.path)
        elif not self.path.is_dir():
            raise IngestError(f"{self.path}: no such folder or zip")

    def names(self) -> list[str]:
        if self._zip is not None:
            return sorted(n for n in self._zip.namelist() if not n.endswith("/"))
        return sorted(str(p.relative_to(self.path)) for p in self.path.rglob("*") if p.is_file())

    def read(self, name: str, headers_only: bool):
        fp = io.BytesIO(self._zip.read(name)) if self._zip is not None else str(self.path / name)
        return pydicom.dcmread(fp, stop_before_pixels=headers_only)

    def close(self):
        if self._zip is not None:
            self._zip.close()


def _text(ds, keyword: str) -> str | None:
    value = ds.get(keyword)
    return None if value in (None, "") else str(value)


def scan_series(path: Path) -> tuple[list[SeriesInfo], list[tuple[str, str]]]:
    """All series under a folder/zip, plus (member, reason) for files that are not readable DICOM."""
    src = _Source(path)
    groups: dict[str, SeriesInfo] = {}
    bad: list[tuple[str, str]] = []
    try:
        for name in src.names():
            try:
                ds = src.read(name, headers_only=True)
            except InvalidDicomError:
                if name.lower().endswith(".dcm"):
                    bad.append((name, "not a valid DICOM file (no DICM preamble or header)"))
                continue  # other non-DICOM files (reports, READMEs) are expected beside slices
            except Exception as exc:
                bad.append((name, f"unreadable DICOM header ({type(exc).__name__})"))
                continue
            uid = _text(ds, "SeriesInstanceUID")
            if uid is None:
                bad.append((name, "DICOM file without SeriesInstanceUID"))
                continue
            info = groups.get(uid)
            if info is None:
                info = groups[uid] = SeriesInfo(
                    source=Path(path),
                    files=[],
                    series_uid=uid,
                    study_uid=_text(ds, "StudyInstanceUID") or uid,
                    modality=(_text(ds, "Modality") or "").upper(),
                    body_part=_text(ds, "BodyPartExamined"),
                    study_date=_text(ds, "StudyDate"),
                    identifiers={
                        # multi-valued ones joined by DICOM's own delimiter, which scrub splits on
                        k: "\\".join(map(str, v)) if isinstance(v := ds.get(k), MultiValue) else _text(ds, k)
                        for k in DICOM_IDENTIFIER_KEYWORDS
                    },
                )
            info.files.append(name)
    finally:
        src.close()
    return list(groups.values()), bad


def _geometry(path, headers) -> tuple[np.ndarray, np.ndarray, float]:
    """(slice order, LPS affine of the ordered stack, slice spacing) from the position headers."""
    try:
        iop = np.array([float(v) for v in headers[0].ImageOrientationPatient], dtype=np.float64)
        positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers], dtype=np.float64)
        row_sp, col_sp = (float(v) for v in headers[0].PixelSpacing)
    except (AttributeError, TypeError, ValueError) as exc:
        raise IngestError(f"{path}: slices lack usable ImagePositionPatient/ImageOrientationPatient/PixelSpacing") from exc
    for h in headers[1:]:
        if not np.allclose([float(v) for v in h.ImageOrientationPatient], iop, atol=1e-4):
            raise IngestError(f"{path}: slices of one series have different ImageOrientationPatient", stage="validate")
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    gaps = np.diff(along[order])
    if len(gaps) and gaps.min() < 1e-3:
        raise IngestError(f"{path}: two slices share one position (duplicate or mixed series)", stage="validate")
    spacing = float(np.median(gaps)) if len(gaps) else float(getattr(headers[0], "SliceThickness", 1.0) or 1.0)
    if len(gaps) and np.abs(gaps - spacing).max() > 0.1 * spacing + 0.01:
        raise IngestError(
            f"{path}: irregular slice spacing ({gaps.min():.3g}..{gaps.max():.3g} mm): missing slices?", stage="validate"
        )
    affine = np.eye(4)
    # Columns of the pixel array advance along the row direction, rows along the column direction.
    affine[:3, 0] = row_dir * col_sp
    affine[:3, 1] = col_dir * row_sp
    affine[:3, 2] = normal * spacing
    affine[:3, 3] = positions[order[0]]
    return order, affine, spacing


def read_dicom(path: Path, files: list[str] | None = None, max_voxels: int | None = None) -> Volume:
    """One series from a folder or zip; `files` picks the series when the source holds several."""
    path = Path(path)
    if files is None:
        series, bad = scan_series(path)
        if not series:
            detail = f" ({len(bad)} unreadable .dcm files)" if bad else ""
            raise IngestError(f"{path}: no DICOM series found{detail}")
        if len(series) > 1:
            raise IngestError(f"{path}: holds {len(series)} DICOM series; expected exactly one")
        files = series[0].files
    src = _Source(path)
    try:
        try:
            headers = [src.read(n, headers_only=True) for n in files]
        except Exception as exc:
            raise IngestError(f"{path}: unreadable DICOM header ({type(exc).__name__})") from exc
        modality = (_text(headers[0], "Modality") or "").upper()
        if modality not in SUPPORTED_MODALITIES:
            raise IngestError(f"{path}: modality {modality or 'missing'} is not supported (CT or MR)", stage="validate")
        shapes = {(int(h.Rows), int(h.Columns)) for h in headers}
        if len(shapes) != 1:
            raise IngestError(f"{path}: slices of mixed size {sorted(shapes)} in one series", stage="validate")
        rows, cols = shapes.pop()
        order, lps_affine, _ = _geometry(path, headers)
        native_shape = (cols, rows, len(files))
        check_budget(path, native_shape, max_voxels)
        ras_world = LPS_TO_RAS @ lps_affine
        buf, native_view, ras_affine = ras_buffer(ras_world, native_shape)
        for k, idx in enumerate(order):
            try:
                ds = src.read(files[idx], headers_only=False)
                pixels = ds.pixel_array
            except Exception as exc:
                raise IngestError(f"{path}: slice {k} has truncated or undecodable pixel data ({type(exc).__name__})") from exc
            if pixels.shape != (rows, cols):
                raise IngestError(f"{path}: slice {k} pixel data is {pixels.shape}, header says {(rows, cols)}", stage="validate")
            # Modality LUT: the one rescale to HU. Applied per slice since scanners may vary it.
            slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
            inter = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
            target = native_view[:, :, k]
            target[...] = pixels.T
            if slope != 1.0:
                target *= np.float32(slope)
            if inter != 0.0:
                target += np.float32(inter)
    finally:
        src.close()
    check_finite(path, buf)
    return Volume(
        array=buf,
        spacing=spacing_of(ras_affine),
        modality=modality,
        affine=ras_affine,
        units=HU if modality == "CT" else RAW,
        source_orientation=orientation_code(ras_world),
        meta={"body_part": _text(headers[0], "BodyPartExamined"), "study_date": _text(headers[0], "StudyDate")},
    )
