"""IndexConfig: every knob of the vector index, with defaults sized for a 2-core laptop."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class IndexConfig:
    # A faiss index_factory string ("Flat", "IVF2048,Flat", "HNSW32,Flat", "IVF4096,PQ96x8", ...);
    # None chooses one from the collection size and memory budget (see factory.choose_factory).
    factory: str | None = None
    # RAM the index structure may use; decides between full-precision, SQ8 and PQ codes.
    memory_budget_bytes: int = 8 * 1024**3
    # "auto": search on GPU when faiss sees one (faiss-gpu installed), CPU otherwise; True forces, False never.
    use_gpu: bool | str = "auto"
    # Default probes / beam width; None lets the build tune them to reach target_recall.
    nprobe: int | None = None
    ef_search: int | None = None
    # Recall@10 vs exact search the auto-tuning aims for (measured on queries sampled from the data).
    target_recall: float = 0.97
    # Collections below this are searched exactly (IndexFlatIP): fast enough and recall 1.
    flat_threshold: int = 20_000
    # Cosine similarity: L2-normalise stored and query vectors, then inner product.
    normalize: bool = True
    # Re-rank candidates of lossy (PQ) codes with the exact stored vectors: "auto" does so for PQ.
    rerank: bool | str = "auto"
    rerank_factor: int | None = None
    # Filtered searches whose passing rows are at most this many are answered exactly.
    exact_filter_max: int = 50_000
    # Rows used to measure recall after build/compact; 0 skips the measurement.
    recall_queries: int = 200
    # Keep the original vectors (vectors.npy, memory-mapped) for exact filters, re-ranking, compact and
    # query-by-id; without them an index cannot be compacted or retrained.
    store_vectors: bool = True
    seed: int = 0
    # Vectors added per faiss call (progress bar granularity and peak temporary memory).
    add_batch_size: int = 65_536
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.use_gpu not in ("auto", True, False):
            raise ValueError(f"IndexConfig.use_gpu must be 'auto', True or False, not {self.use_gpu!r}")
        if self.rerank not in ("auto", True, False):
            raise ValueError(f"IndexConfig.rerank must be 'auto', True or False, not {self.rerank!r}")
        if not 0.0 < self.target_recall <= 1.0:
            raise ValueError(f"IndexConfig.target_recall must be in (0, 1], not {self.target_recall}")
        if self.memory_budget_bytes <= 0:
            raise ValueError("IndexConfig.memory_budget_bytes must be positive")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "IndexConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
