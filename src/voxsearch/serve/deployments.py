"""The Ray Serve deployments behind the ingress: encoders, index searcher, study store, report drafter.

Each holds one model or data structure and does CPU work in a worker thread, so a replica's event loop
keeps answering health checks and other requests while torch or faiss runs.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import numpy as np
from ray import serve

from voxsearch.serve.config import ServeConfig, ServeConfigError

log = logging.getLogger("voxsearch.serve")


class LocalDeployment:
    """A deployment's class run inside the calling replica, called like its handle: ``x.method.remote(...)``
    gives an awaitable. Used to co-locate the searcher and the study store with the ingress, where a call
    between replicas costs more CPU than the work it carries."""

    def __init__(self, instance: Any):
        self._instance = instance

    def __getattr__(self, name: str) -> "_LocalMethod":
        return _LocalMethod(getattr(self._instance, name))


class _LocalMethod:
    def __init__(self, method):
        self._method = method

    def remote(self, *args, **kwargs):
        result = self._method(*args, **kwargs)
        if asyncio.iscoroutine(result):
            return result
        done = asyncio.get_running_loop().create_future()
        done.set_result(result)
        return done


def local_deployment(deployment, *args) -> LocalDeployment:
    """An instance of a @serve.deployment class, built in this process."""
    return LocalDeployment(deployment.func_or_class(*args))


def check_before_start(config: ServeConfig) -> None:
    """What the replicas would refuse, refused before any of them starts and with the reason (a replica
    that fails in its constructor only tells Serve's logs why): an unusable checkpoint, an index of
    another model."""
    from voxsearch.encoders import open_checkpoint
    from voxsearch.index import VectorIndex
    from voxsearch.serve.index_holder import check_index_model

    try:
        checkpoint = open_checkpoint(config.checkpoint)
        index = VectorIndex.load(config.index, mmap=True, verify=False)
    except (OSError, ValueError) as exc:
        raise ServeConfigError(f"serve config: {exc}") from exc
    check_index_model(config.index, index, checkpoint.model_id)


def _torch_threads(n: int) -> None:
    import torch

    if n > 0:
        torch.set_num_threads(n)


def _load_clip(checkpoint: str):
    from voxsearch.encoders import open_checkpoint

    return open_checkpoint(checkpoint).load_model(inference=True)


@serve.deployment(name="TextEncoder")
class TextEncoder:
    """Query text -> L2-normalised embedding in the shared image-text space; batches concurrent queries."""

    def __init__(self, config: ServeConfig):
        _torch_threads(config.deployments.text_encoder.torch_threads)
        self.model = _load_clip(config.checkpoint)
        self.finding_weight = config.finding_query_weight
        self.encode.set_max_batch_size(config.batching.max_batch_size)
        self.encode.set_batch_wait_timeout_s(config.batching.batch_wait_timeout_s)

    def _run(self, texts: list[str]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model.encode_query(texts, self.finding_weight).float().cpu().numpy()

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def encode(self, texts: list[str]) -> list[np.ndarray]:
        """Search-query embeddings (finding-aware where the model has a finding head)."""
        vectors = await asyncio.to_thread(self._run, texts)
        return list(vectors)

    async def encode_query(self, text: str) -> tuple[np.ndarray, list[str]]:
        """(embedding, the finding labels the query names): the labels say why results rank as they do."""
        return await self.encode(text), self.model.query_labels(text)

    def dim(self) -> int:
        return int(self.model.config.embed_dim)


@serve.deployment(name="ImageEncoder")
class ImageEncoder:
    """Preprocessed (1, D, H, W) volumes -> embeddings; concurrent requests are batched (@serve.batch)."""

    def __init__(self, config: ServeConfig):
        _torch_threads(config.deployments.image_encoder.torch_threads)
        self.model = _load_clip(config.checkpoint)
        self.expected = tuple(int(s) for s in self.model.config.image_size)
        self.batch_sizes: list[int] = []
        self.encode.set_max_batch_size(config.batching.max_batch_size)
        self.encode.set_batch_wait_timeout_s(config.batching.batch_wait_timeout_s)

    def _run(self, volumes: list[np.ndarray]) -> np.ndarray:
        import torch

        batch = torch.from_numpy(np.stack([np.asarray(v, dtype=np.float32) for v in volumes]))
        with torch.inference_mode():
            return self.model.encode_image(batch).float().cpu().numpy()

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def encode(self, volumes: list[np.ndarray]) -> list[np.ndarray]:
        for v in volumes:
            if tuple(v.shape[-3:]) != self.expected:
                # Upstream preprocessing decides the shape; a mismatch is a server config bug, not user input.
                raise ValueError(f"volume of shape {tuple(v.shape)} does not match the model's {self.expected}")
        self.batch_sizes.append(len(volumes))
        vectors = await asyncio.to_thread(self._run, volumes)
        return list(vectors)

    def stats(self) -> dict[str, Any]:
        sizes = self.batch_sizes[-1000:]
        return {"batches": len(self.batch_sizes), "max_batch": max(sizes, default=0),
                "mean_batch": float(np.mean(sizes)) if sizes else 0.0}


@serve.deployment(name="IndexSearcher")
class IndexSearcher:
    """Holds the vector index; a poller thread swaps in a new on-disk version while searches go on."""

    def __init__(self, config: ServeConfig):
        from voxsearch.encoders import open_checkpoint
        from voxsearch.serve.index_holder import IndexHolder

        _torch_threads(config.deployments.searcher.torch_threads)
        self._stop = threading.Event()
        # Vectors of another model are not comparable with the queries this server encodes: such an index
        # is refused when the replica starts and never swapped in later.
        self.holder = IndexHolder(config.index, model_id=open_checkpoint(config.checkpoint).model_id)
        self.poll_s = config.index_poll_s
        self.poll_errors = 0
        threading.Thread(target=self._poll, name="index-poller", daemon=True).start()

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.holder.reload()
            except Exception as exc:  # noqa: BLE001 - a broken new version must not stop the live one
                self.poll_errors += 1
                log.warning("index reload failed, still serving version %s: %s", self.holder.version, exc)

    async def search(self, vectors: np.ndarray, k: int, filters: dict | None) -> list[list[dict]]:
        return await asyncio.to_thread(self.holder.search, vectors, k, filters)

    async def query(self, vector: np.ndarray | None, k: int, filters: dict | None, from_id: str | None = None,
                    exclude: str | None = None, with_vectors: bool = False) -> dict:
        """A request's whole search in one call (see IndexHolder.query): each call between deployments
        costs milliseconds of CPU, more than searching a 100,000-vector index."""
        return await asyncio.to_thread(self.holder.query, vector, k, filters, from_id=from_id, exclude=exclude,
                                       with_vectors=with_vectors)

    async def add(self, ids: list[str], vectors: np.ndarray, metadata_rows: list[dict]) -> dict:
        import pyarrow as pa

        table = pa.Table.from_pylist(metadata_rows) if metadata_rows else None
        return await asyncio.to_thread(self.holder.add, ids, vectors, table)

    async def vectors(self, ids: list[str]) -> dict[str, np.ndarray | None]:
        return await asyncio.to_thread(self.holder.vectors, ids)

    async def contains(self, ids: list[str]) -> dict[str, bool]:
        return await asyncio.to_thread(self.holder.contains, ids)

    def info(self) -> dict:
        return {**self.holder.info(), "poll_errors": self.poll_errors}

    def check_health(self) -> None:
        if self.holder.index is None:
            raise RuntimeError("no index loaded")

    def __del__(self):
        self._stop.set()


@serve.deployment(name="StudyStore")
class StudyStore:
    """Catalog metadata, reports and slice rendering (with a small cache of decoded volumes)."""

    def __init__(self, config: ServeConfig, added_dir: str):
        from voxsearch.serve.errors import scrub_library_logs
        from voxsearch.serve.studies import StudyCatalog

        scrub_library_logs()  # stored DICOM series are decoded here for slices
        _torch_threads(config.deployments.studies.torch_threads)
        self.catalog = StudyCatalog(config.catalog, added_dir, config.volume_cache, config.excerpt_chars)

    async def describe_many(self, ids: list[str]) -> dict[str, dict]:
        return self.catalog.describe_many(ids)

    async def study(self, series_id: str) -> dict | None:
        if not self.catalog.has(series_id):
            return None
        return self.catalog.public(series_id, with_report=True)

    async def reports(self, ids: list[str]) -> dict[str, str | None]:
        return self.catalog.reports(ids)

    async def has(self, series_id: str) -> bool:
        return self.catalog.has(series_id)

    async def find_content(self, sha: str) -> str | None:
        return self.catalog.find_content(sha)

    async def slices(self, series_id: str) -> dict[str, int]:
        return await asyncio.to_thread(self.catalog.slices, series_id)

    async def render(self, series_id: str, plane: str, index: int | None, window: str | None, max_side: int) -> bytes:
        return await asyncio.to_thread(self.catalog.render, series_id, plane, index, window, max_side)

    async def model_input(self, series_id: str, preprocess: dict) -> np.ndarray:
        from voxsearch.ingest import PreprocessConfig

        return await asyncio.to_thread(self.catalog.model_input, series_id, PreprocessConfig.from_dict(preprocess))

    async def add(self, row: dict, array: np.ndarray, spacing) -> dict:
        return await asyncio.to_thread(self.catalog.added.add, row, array, spacing)

    def filter_values(self) -> dict:
        return self.catalog.filter_values()

    def size(self) -> int:
        return len(self.catalog)


@serve.deployment(name="ReportDrafter")
class ReportDrafter:
    """The report model, when one is configured: drafts a report from a study's volume. (Retrieval-based
    drafts need no model; the ingress composes them from the searcher and the study store.)"""

    def __init__(self, config: ServeConfig):
        self.model = None
        if config.report_model:
            from voxsearch.reports.model import load_report_model

            _torch_threads(config.deployments.reporter.torch_threads)
            started = time.time()
            self.model = load_report_model(config.report_model)
            log.info("report model loaded in %.1fs", time.time() - started)

    def capabilities(self) -> dict:
        return {
            "generator": self.model is not None,
            "generator_preprocess": dict(self.model.preprocess) if self.model is not None else None,
            "methods": ["retrieval", "generate"] if self.model is not None else ["retrieval"],
        }

    def _image(self, volume: np.ndarray):
        import torch

        return torch.from_numpy(np.asarray(volume, dtype=np.float32))[None]

    def generate_stream(self, volume: np.ndarray, prompt: str | None, max_new_tokens: int):
        """Text pieces as the model decodes them (a Serve streaming method)."""
        import torch

        if self.model is None:
            raise RuntimeError("no report model is configured")
        with torch.inference_mode():
            yield from self.model.generate_stream(self._image(volume), prompt, max_new_tokens)
