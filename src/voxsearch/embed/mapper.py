"""The two Ray Data stages: read + preprocess one catalog row (CPU task), encode a batch (model actor).

A row that fails keeps flowing with an error message instead of a volume, so the driver writes exactly
one row, embedding or error, for every row it sent.
"""

from __future__ import annotations

import logging
from time import perf_counter

import numpy as np

from voxsearch.common.storage import ObjectPath

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 2000


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:MAX_ERROR_CHARS]


def load_row(row: dict, preprocess: dict, threads: int = 1) -> dict:
    """For `Dataset.map`: catalog row -> {"row_index", "volume" (1,D,H,W) float32, "error", "stage", timings}.

    Same steps as `voxsearch.ingest.load_volume`, called one by one to time reading and preprocessing apart.
    """
    import torch

    from voxsearch.ingest import PreprocessConfig, preprocess_volume, read_volume_row
    from voxsearch.ingest.preprocess import row_window

    # Several read tasks share a node: a fixed small torch thread count avoids oversubscribing its cores.
    torch.set_num_threads(threads)
    config = PreprocessConfig.from_dict(preprocess)
    shape = (1, *config.spatial_size)
    error, stage = "", ""
    t0, t1 = perf_counter(), None
    try:
        volume = read_volume_row(row)
        t1 = perf_counter()
        array = preprocess_volume(volume, config, window=row_window(row), name=str(row.get("source_path", "volume")))
        if array.shape != shape or array.dtype != np.float32:
            raise ValueError(f"preprocessing gave {array.dtype}{array.shape}, expected float32{shape}")
    except Exception as e:  # bad input is recorded as an error row; the run goes on
        error, stage = _error_text(e), str(getattr(e, "stage", "load"))
        # Same shape as good rows so a batch stays one tensor column; the model skips these.
        array = np.zeros(shape, np.float32)
    t2 = perf_counter()
    t1 = t2 if t1 is None else t1  # failed while reading: all of it was reading
    out = {"row_index": row["row_index"], "volume": array, "error": error, "stage": stage,
           "t_read": t1 - t0, "t_preprocess": t2 - t1}
    if "report" in row:
        out["report"] = row["report"] or ""
    return out


class BulkEncoder:
    """Actor for `Dataset.map_batches`: loads the checkpoint once, embeds catalog batches (volumes and
    reports), turning a row the model fails on into an error row. (Serving encodes requests with
    voxsearch.serve's ImageEncoder deployment.)"""

    def __init__(self, checkpoint: str | ObjectPath, with_text: bool, threads: int):
        import torch

        from voxsearch.encoders import open_checkpoint

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            torch.set_num_threads(max(1, threads))
        self.model = open_checkpoint(checkpoint).load_model(self.device, inference=True)
        self.dim = int(self.model.config.embed_dim)
        self.with_text = with_text

    def _encode(self, volumes: np.ndarray) -> np.ndarray:
        import torch

        # The model's own context: inference mode, plus bf16 autocast on CUDA.
        with self.model.inference():
            x = torch.from_numpy(np.ascontiguousarray(volumes)).to(self.device, non_blocking=True)
            return self.model.encode_image(x).float().cpu().numpy()

    def _encode_rows(self, volumes: np.ndarray, errors: np.ndarray, stages: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Batch first; if the batch fails, one volume at a time so one bad row cannot sink its neighbours."""
        try:
            return self._encode(volumes[rows])
        except Exception as batch_error:
            log.warning("batch of %d failed (%s); encoding one volume at a time", len(rows), batch_error)
        out = np.zeros((len(rows), self.dim), np.float32)
        for j, r in enumerate(rows):
            try:
                out[j] = self._encode(volumes[r : r + 1])[0]
            except Exception as e:
                errors[r], stages[r] = _error_text(e), "model"
        return out

    def __call__(self, batch: dict) -> dict:
        n = len(batch["row_index"])
        errors = batch["error"].astype(object)
        stages = batch["stage"].astype(object)
        rows = np.flatnonzero(errors == "")
        vectors = np.zeros((n, self.dim), np.float32)
        start = perf_counter()
        if rows.size:
            vectors[rows] = self._encode_rows(batch["volume"], errors, stages, rows)
        # A zero or degenerate volume can give NaN after normalisation: such a vector must not reach the index.
        bad = np.flatnonzero((errors == "") & ~np.isfinite(vectors).all(axis=1))
        for r in bad:
            errors[r], stages[r] = "model produced non-finite values for this volume", "model"
        out = {
            "row_index": batch["row_index"],
            "vector": vectors,
            "error": errors.astype(str),
            "stage": stages.astype(str),
            "t_read": batch["t_read"],
            "t_preprocess": batch["t_preprocess"],
        }
        if self.with_text:
            out.update(self._encode_reports(batch["report"], errors))
        out["t_model"] = np.full(n, (perf_counter() - start) / n)
        return out

    def _encode_reports(self, reports: np.ndarray, errors: np.ndarray) -> dict:
        text_vectors = np.zeros((len(reports), self.dim), np.float32)
        rows = np.flatnonzero([(e == "" and isinstance(r, str) and r.strip() != "") for r, e in zip(reports, errors)])
        if rows.size:
            with self.model.inference():
                text_vectors[rows] = self.model.encode_text([reports[r] for r in rows]).float().cpu().numpy()
        has_text = np.zeros(len(reports), bool)
        has_text[rows] = True
        return {"text_vector": text_vectors, "has_text": has_text}


class ReadAndEncode(BulkEncoder):
    """Actor for `Dataset.map_batches` on small CPU nodes: reads and preprocesses its batch's rows
    (`load_row`), then encodes them, all in one process whose torch threads use every core it holds,
    as a plain loop would. Volumes never cross the object store."""

    def __init__(self, checkpoint: str | ObjectPath, with_text: bool, threads: int, preprocess: dict):
        super().__init__(checkpoint, with_text, threads)
        self.preprocess = preprocess
        self.threads = max(1, threads)

    def __call__(self, batch) -> dict:
        loaded = [load_row(row, self.preprocess, self.threads) for row in batch.to_pylist()]
        stacked = {key: np.asarray([row[key] for row in loaded]) for key in loaded[0] if key != "volume"}
        stacked["volume"] = np.stack([row["volume"] for row in loaded])
        if "report" in stacked:
            stacked["report"] = np.asarray([row["report"] for row in loaded], dtype=object)
        return super().__call__(stacked)
