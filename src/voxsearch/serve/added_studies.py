"""Studies added through the API: a de-identified copy of each volume plus its catalog row.

The original upload (DICOM headers and all) is deleted after processing; what is kept is only the voxel
array and its spacing, rewritten as a plain NIfTI with no header text. Rows use the catalog's column
names so the rest of the server treats both sources alike. Every write goes to a temp file that is
fsynced before it is renamed into place (voxsearch.common.durable), under a file lock shared by all
replicas: a 201 answered before a power cut is still there after it.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
from pathlib import Path
from typing import Any

import numpy as np

from voxsearch.common.durable import atomic_write, atomic_write_parquet

SCHEMA_VERSION = 1


class AddedStudies:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.volumes = self.directory / "volumes"
        self.table_path = self.directory / "added_studies.parquet"
        self._rows: dict[str, dict[str, Any]] = {}
        self._stamp: tuple | None = None

    def _current_stamp(self) -> tuple | None:
        try:
            st = self.table_path.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def rows(self) -> dict[str, dict[str, Any]]:
        """All added rows, re-read when another replica has written since."""
        stamp = self._current_stamp()
        if stamp != self._stamp:
            import pyarrow.parquet as pq

            rows = pq.read_table(self.table_path).to_pylist() if stamp else []
            self._rows = {r["series_id"]: r for r in rows}
            self._stamp = stamp
        return self._rows

    def get(self, series_id: str) -> dict[str, Any] | None:
        return self.rows().get(series_id)

    @contextlib.contextmanager
    def _locked(self):
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def add(self, row: dict[str, Any], array: np.ndarray, spacing) -> dict[str, Any]:
        """Store the volume (X, Y, Z RAS) and its row; returns the stored row (with source_path set)."""
        import nibabel as nib
        import pyarrow as pa

        with self._locked():
            self.volumes.mkdir(parents=True, exist_ok=True)
            target = self.volumes / f"{row['series_id']}.nii.gz"
            affine = np.diag([float(spacing[0]), float(spacing[1]), float(spacing[2]), 1.0])
            image = nib.Nifti1Image(np.asarray(array, dtype=np.float32), affine)
            image.header.set_xyzt_units("mm")

            def write_volume(fh):
                # filename="" and mtime=0: the gzip header would otherwise carry the temp file's name and time.
                with gzip.GzipFile(filename="", mode="wb", fileobj=fh, mtime=0) as gz:
                    image.to_file_map({"image": nib.FileHolder(fileobj=gz)})

            atomic_write(target, write_volume)
            stored = {**row, "source_path": str(target), "source_format": "nifti", "schema_version": SCHEMA_VERSION}
            rows = dict(self.rows())
            rows[stored["series_id"]] = stored
            atomic_write_parquet(self.table_path, pa.Table.from_pylist(list(rows.values())))
            self._stamp = None
            return stored
