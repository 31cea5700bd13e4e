"""A rank's share of the training pairs, cached on the worker's local disk once per run.

Ray Data's streaming split hands blocks to ranks in an order that varies between runs, so a seed did
not fix a run, and every epoch re-read (and local-shuffled a 32-row window of) the object store. Here the
driver assigns each study to a rank by its place in series_id order; each rank reads the dataset once,
keeps its studies in a float16 memmap on local disk (no shared file system is assumed), and then draws
a full permutation every epoch from (seed, epoch). The same seed gives the same run, on any cluster.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def assign_ranks(series_ids, world: int) -> dict[str, int]:
    """series_id -> rank, round-robin over sorted ids: shares differ by at most one study."""
    return {sid: i % world for i, sid in enumerate(sorted(str(s) for s in series_ids))}


@dataclass
class ShardCache:
    volumes: np.ndarray  # (n, 1, D, H, W) float16 memmap
    series_id: np.ndarray
    report: np.ndarray
    rows: list[dict]  # metadata per study (findings, report, modality, body_part) for labels and groups
    directory: Path

    def __len__(self) -> int:
        return len(self.series_id)

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([int(seed), int(epoch), 0x5EED]).permutation(len(self))

    def close(self) -> None:
        self.volumes = None
        shutil.rmtree(self.directory, ignore_errors=True)


def build_shard_cache(batches, owner: dict[str, int], rank: int, volume_shape: tuple,
                      cache_root: str | None = None) -> ShardCache:
    """Read ``batches`` (numpy dicts of preprocessed pairs) once; keep this rank's studies in series_id order."""
    mine = sorted(sid for sid, r in owner.items() if r == rank)
    position = {sid: i for i, sid in enumerate(mine)}
    directory = Path(tempfile.mkdtemp(prefix=f"voxsearch-train-rank{rank}-", dir=cache_root))
    volumes = np.lib.format.open_memmap(directory / "volumes.npy", mode="w+", dtype=np.float16,
                                        shape=(len(mine), *volume_shape))
    filled = np.zeros(len(mine), dtype=bool)
    rows: list[dict | None] = [None] * len(mine)
    for batch in batches:
        for j, sid in enumerate(batch["series_id"]):
            i = position.get(str(sid))
            if i is None or filled[i]:
                continue
            volumes[i] = batch["volume"][j]
            filled[i] = True
            rows[i] = {k: (batch[k][j] if k in batch else None)
                       for k in ("report", "findings", "modality", "body_part")}
    if not filled.all():
        missing = [mine[i] for i in np.flatnonzero(~filled)[:3]]
        shutil.rmtree(directory, ignore_errors=True)
        raise RuntimeError(f"rank {rank}: {int((~filled).sum())} assigned studies never arrived (e.g. {missing})")
    volumes.flush()
    log.info("rank %d cached %d studies (%.1f MB) in %s", rank, len(mine), volumes.nbytes / 1e6, directory)
    return ShardCache(volumes=volumes, series_id=np.array(mine, dtype=object),
                      report=np.array([str(r["report"] or "") for r in rows], dtype=object),
                      rows=[dict(r) for r in rows], directory=directory)


def text_features(raw_model, reports, batch_size: int = 64):
    """Pooled features of a frozen text tower for every report, computed once (not every step)."""
    import torch

    from voxsearch.training.text import token_counter, truncate_report

    count_tokens, budget = token_counter(raw_model.text), raw_model.text.config.max_length
    out = []
    with torch.inference_mode():
        for s in range(0, len(reports), batch_size):
            chunk = [truncate_report(str(r), count_tokens, budget) for r in reports[s:s + batch_size]]
            tokens = raw_model.text.tokenize(chunk)
            out.append(raw_model.text(tokens["input_ids"].to(raw_model.device),
                                      tokens["attention_mask"].to(raw_model.device)).float())
    return torch.cat(out) if out else torch.zeros(0, raw_model.text.hidden_size)


def worker_cache_root() -> str | None:
    return os.environ.get("VOXSEARCH_TRAIN_CACHE") or None
