"""Pick the reader for a path or a catalog row."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from voxsearch.common.storage import ObjectPath, is_uri, location
from voxsearch.ingest.errors import IngestError
from voxsearch.ingest.volume import Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def detect_format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(".npy"):
        return "npy"
    if path.is_dir() or name.endswith(".zip"):
        return "dicom"
    if name.endswith(".dcm"):
        raise IngestError(f"{path}: a single DICOM slice is not a volume; pass the series folder or a zip")
    raise IngestError(f"{path}: unsupported file type (expected .nii, .nii.gz, .npy, a DICOM folder or .zip)")


@contextmanager
def local_file(path: str | Path | ObjectPath) -> Iterator[Path]:
    """`path` itself, or a temp copy of an s3:// / gs:// object (the readers need a file: nibabel, zip);
    IngestErrors raised inside name the URI, not the copy."""
    if not is_uri(path):
        yield Path(path)
        return
    obj = location(path)
    with tempfile.TemporaryDirectory(prefix="voxsearch-volume-") as tmp:
        local = Path(tmp) / obj.name
        try:
            obj.download(local)
        except FileNotFoundError:
            raise IngestError(f"{obj}: no such object") from None
        except OSError as exc:
            raise IngestError(str(exc)) from None
        try:
            yield local
        except IngestError as exc:
            raise IngestError(str(exc).replace(str(local), obj.uri), stage=exc.stage) from None


def read_volume_path(
    path, modality: str | None = None, files: list[str] | None = None, max_voxels: int | None = None, fmt: str | None = None
) -> Volume:
    """A Volume (RAS, HU for CT) from a NIfTI/.npy file or a folder/zip holding one DICOM series; files
    (not DICOM folders) may be s3:// or gs:// objects."""
    if is_uri(path):
        with local_file(path) as local:
            return read_volume_path(local, modality=modality, files=files, max_voxels=max_voxels, fmt=fmt)
    path = Path(path)
    if not path.exists():
        raise IngestError(f"{path}: no such file or folder")
    fmt = fmt or detect_format(path)
    if fmt == "nifti":
        from voxsearch.ingest.nifti_reader import read_nifti

        return read_nifti(path, modality=modality, max_voxels=max_voxels)
    if fmt == "npy":
        from voxsearch.ingest.npy_reader import read_npy

        return read_npy(path, modality=modality, max_voxels=max_voxels)
    if fmt == "dicom":
        from voxsearch.ingest.dicom_reader import read_dicom

        volume = read_dicom(path, files=files, max_voxels=max_voxels)
        if modality and modality != volume.modality:
            raise IngestError(f"{path}: DICOM says modality {volume.modality}, expected {modality}", stage="validate")
        return volume
    raise IngestError(f"{path}: unknown source format {fmt!r}")


def read_volume_row(row: Mapping, max_voxels: int | None = None) -> Volume:
    """The Volume a catalog row points at (source_path, source_format, source_files, modality)."""
    files = row.get("source_files")
    return read_volume_path(
        row["source_path"],
        modality=row.get("modality"),
        files=list(files) if files is not None and len(files) else None,
        max_voxels=max_voxels,
        fmt=row.get("source_format"),
    )
