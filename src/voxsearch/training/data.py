"""From the catalog to Ray datasets of preprocessed (volume, report) pairs.

Decoding and preprocessing a scan costs far more than a training step on it, so each split is
preprocessed once by a Ray Data actor pool (`voxsearch.ingest.load_volume`, the same function the
embedding job uses) and materialised in the object store; epochs then only read and augment.
Volumes are kept as float16: values in [0, 1] lose nothing that matters and the store holds twice
as many studies before spilling to disk.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

log = logging.getLogger(__name__)

PAIR_COLUMNS = ("series_id", "split", "report", "findings", "modality", "body_part", "volume")


def load_catalog(catalog: Path | str | pa.Table) -> pa.Table:
    if isinstance(catalog, pa.Table):
        return catalog
    from voxsearch.common.storage import location
    from voxsearch.ingest import read_catalog

    # A folder, or an s3:// / gs:// URI (Path would fold its "//" into a local folder "s3:").
    path = location(catalog)
    if not path.exists():
        raise FileNotFoundError(f"catalog not found: {path}")
    return read_catalog(path)


def split_rows(catalog: pa.Table, split: str, limit: int | None = None) -> pa.Table:
    """Rows of one split that have a report, in a stable order (series_id), optionally the first `limit`."""
    for column in ("split", "series_id", "report"):
        if column not in catalog.column_names:
            raise ValueError(f"catalog has no {column!r} column; is it a voxsearch catalog?")
    mask = pc.and_(pc.equal(catalog.column("split"), split),
                   pc.greater(pc.utf8_length(pc.fill_null(catalog.column("report"), "")), 0))
    table = catalog.filter(mask)
    table = table.take(pc.sort_indices(table, sort_keys=[("series_id", "ascending")]))
    if limit is not None:
        table = table.slice(0, limit)
    return table


class PreprocessPairs:
    """Ray Data callable: catalog rows -> volume tensors; a scan that fails is logged and dropped."""

    def __init__(self, preprocess: dict[str, Any]):
        from voxsearch.ingest import PreprocessConfig

        self.config = PreprocessConfig.from_dict(preprocess)
        self.expected = (1, *tuple(self.config.spatial_size))

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        from voxsearch.ingest import load_volume

        out: dict[str, list] = {k: [] for k in PAIR_COLUMNS}
        for row in batch.to_pylist():
            try:
                volume = load_volume(row, self.config)
                if tuple(volume.shape) != self.expected:
                    raise ValueError(f"preprocessed shape {tuple(volume.shape)} != {self.expected}")
            except Exception as exc:  # one bad scan must not stop a training run
                log.warning("skipping series %s: %s", row.get("series_id"), exc)
                continue
            out["series_id"].append(row["series_id"])
            out["split"].append(row["split"])
            out["report"].append(row.get("report") or "")
            out["findings"].append(row.get("findings") or "")
            out["modality"].append(row.get("modality") or "")
            out["body_part"].append(row.get("body_part") or "")
            out["volume"].append(volume.astype(np.float16))
        volumes = np.stack(out.pop("volume")) if out["volume"] else np.zeros((0, *self.expected), dtype=np.float16)
        return {**{k: np.array(v, dtype=object) for k, v in out.items()}, "volume": volumes}


def preprocessed_dataset(rows: pa.Table, preprocess: dict[str, Any], workers: int = 2,
                         batch_size: int = 4, label: str = "split"):
    """A materialised Ray dataset of preprocessed pairs; logs how many scans failed."""
    import ray

    if rows.num_rows == 0:
        raise ValueError(f"no {label} studies with a report in the catalog")
    # Several small blocks let the actor pool share the rows; slicing here (not repartition())
    # schedules no extra task that could wait behind actors holding every CPU.
    n_blocks = max(1, min(rows.num_rows, 4 * workers))
    bounds = np.linspace(0, rows.num_rows, n_blocks + 1).astype(int)
    ds = ray.data.from_arrow([rows.slice(a, b - a) for a, b in zip(bounds[:-1], bounds[1:]) if b > a])
    ds = ds.map_batches(
        PreprocessPairs,
        fn_constructor_args=(preprocess,),
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=max(1, min(workers, rows.num_rows))),
    ).materialize()
    kept = ds.count()
    if kept < rows.num_rows:
        log.warning("%s: %d of %d studies failed preprocessing and were left out",
                    label, rows.num_rows - kept, rows.num_rows)
    if kept == 0:
        raise ValueError(f"every {label} study failed preprocessing; see the warnings above")
    return ds


def collect_pairs(ds) -> dict[str, np.ndarray]:
    """A small materialised dataset as arrays, in its stable order (for evaluation)."""
    parts = list(ds.iter_batches(batch_size=256, batch_format="numpy"))
    out = {k: np.concatenate([p[k] for p in parts]) for k in PAIR_COLUMNS}
    order = np.argsort(out["series_id"].astype(str), kind="stable")
    return {k: v[order] for k, v in out.items()}


def split_dataset(ds, split: str):
    """The rows of one split from a preprocessed dataset, materialised (before training takes the CPUs)."""
    return ds.filter(lambda row: row["split"] == split).materialize()
