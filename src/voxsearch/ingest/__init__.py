"""voxsearch.ingest: archives (NIfTI, DICOM, M3D, manifests) -> de-identified Parquet catalog,
model-ready volumes, and the synthetic phantom archive.

Names resolve lazily so `import voxsearch.ingest` stays cheap (no MONAI/torch until used).
"""

from __future__ import annotations

from voxsearch.common.lazy import lazy_exports

_EXPORTS = {
    "IngestError": "errors",
    "Volume": "volume",
    "read_volume_path": "readers",
    "read_volume_row": "readers",
    "PreprocessConfig": "preprocess",
    "PRESETS": "preprocess",
    "load_volume": "preprocess",
    "preprocess_path": "preprocess",
    "preprocess_volume": "preprocess",
    "SynthConfig": "synth",
    "generate_archive": "synth",
    "render_study": "synth",
    "PhantomStudy": "synth",
    "IngestConfig": "pipeline",
    "IngestSummary": "pipeline",
    "run_ingest": "pipeline",
    "read_catalog": "catalog",
    "read_errors": "catalog",
    "CATALOG_SCHEMA_VERSION": "catalog",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, globals(), _EXPORTS)
