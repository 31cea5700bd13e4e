"""Pick the reader for a path or a catalog row."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

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


def read_volume_path(
    path, modality: str | None = None, files: list[str] | None = None, max_voxels: int | None = None, fmt: str | None = None
) -> Volume:
    """A Volume (RAS, HU for CT) from a NIfTI/.npy file or a folder/zip holding one DICOM series."""
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
