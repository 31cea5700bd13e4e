"""Choose a faiss index for a collection, the way autofaiss does: from its size and a memory budget.

Small collections are searched exactly. Larger ones get an inverted file (IVF) whose codes are the
most precise that fit the budget: full float32, then 8-bit scalar quantisation, then product
quantisation. PQ caps recall (about 0.2 recall@10 for PQ64 at 512-d, measured here), so a PQ choice
asks for re-ranking with the exact stored vectors.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from voxsearch.index.config import IndexConfig

ID_BYTES = 8  # faiss keeps one int64 label per vector


@dataclass(frozen=True)
class FactoryChoice:
    factory: str
    reason: str
    rerank: bool
    estimated_bytes: int


def ivf_nlist(n: int) -> int:
    """About 2*sqrt(n) lists (a power of two): lists of ~sqrt(n)/2 rows keep both the coarse
    assignment and the list scan cheap; at 1M rows that is 2048 lists of ~500 rows."""
    target = max(16, 2 * math.sqrt(max(n, 1)))
    return int(2 ** round(math.log2(target)))


HNSW_COARSE_FROM = 16_384


def ivf_prefix(nlist: int) -> str:
    """With many lists, assigning each vector to its list by brute force dominates build time
    (100M x 16k x d); an HNSW coarse quantizer makes it logarithmic, as autofaiss does."""
    return f"IVF{nlist}_HNSW32" if nlist >= HNSW_COARSE_FROM else f"IVF{nlist}"


def pq_sizes(d: int) -> list[int]:
    """Sub-quantiser counts that divide d, most precise first (d/2 bytes down to d/16 bytes)."""
    return [m for m in (d // 2, d // 4, d // 8, d // 16) if m >= 1 and d % m == 0]


def estimate_bytes(factory: str, n: int, d: int) -> int:
    """Rough RAM of an index built from `factory` holding n vectors of dimension d."""
    nlist = 0
    match = re.search(r"IVF(\d+)", factory)
    if match:
        nlist = int(match.group(1))
    if "PQ" in factory:
        m = int(re.search(r"PQ(\d+)", factory).group(1))
        per = m
    elif "SQ8" in factory:
        per = d
    elif "SQ4" in factory:
        per = (d + 1) // 2
    else:
        per = 4 * d
    hnsw = re.search(r"(?<!_)HNSW(\d+)", factory)
    if hnsw:
        per += 2 * int(hnsw.group(1)) * 4
    return n * (per + ID_BYTES) + nlist * d * 4


def choose_factory(n: int, d: int, config: IndexConfig) -> FactoryChoice:
    if config.factory:
        rerank = "PQ" in config.factory if config.rerank == "auto" else bool(config.rerank)
        return FactoryChoice(config.factory, "forced by IndexConfig.factory", rerank, estimate_bytes(config.factory, n, d))
    budget = config.memory_budget_bytes
    if n < config.flat_threshold:
        factory = "Flat"
        return FactoryChoice(factory, f"{n} rows < flat_threshold {config.flat_threshold}: exact search",
                             False, estimate_bytes(factory, n, d))
    nlist = ivf_nlist(n)
    ivf = ivf_prefix(nlist)
    for codes, label in (("Flat", "float32 codes"), ("SQ8", "8-bit scalar codes")):
        factory = f"{ivf},{codes}"
        size = estimate_bytes(factory, n, d)
        if size <= budget:
            return FactoryChoice(factory, f"{label} fit the {budget / 2**30:.1f} GiB budget ({size / 2**30:.2f} GiB)",
                                 config.rerank is True, size)
    for m in pq_sizes(d):
        factory = f"{ivf},PQ{m}x8"
        size = estimate_bytes(factory, n, d)
        if size <= budget:
            return FactoryChoice(factory, f"PQ{m} codes fit the {budget / 2**30:.1f} GiB budget ({size / 2**30:.2f} GiB); "
                                 "re-ranked with exact stored vectors", config.rerank in ("auto", True), size)
    smallest = estimate_bytes(f"{ivf},PQ{pq_sizes(d)[-1]}x8", n, d)
    raise ValueError(
        f"{n} vectors of dimension {d} need at least {smallest / 2**30:.2f} GiB even with PQ codes; "
        f"memory_budget_bytes is {budget / 2**30:.2f} GiB: raise it or shard the index (ShardedIndex)"
    )


def training_rows(factory: str, n: int) -> int:
    """Rows to train on: faiss k-means wants >= 39 points per centroid (and 256 per PQ centroid set)."""
    match = re.search(r"IVF(\d+)", factory)
    need = 40 * int(match.group(1)) if match else 0
    if "PQ" in factory:
        need = max(need, 256 * 40)
    return min(n, max(need, 10_000))
