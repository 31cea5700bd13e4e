"""Retrieval scores from embeddings: recall@K both ways (Med3DVLM protocol) and finding precision@K.

Pure numpy so the same code scores a training epoch, `voxsearch eval retrieval` and the benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

RECALL_KS = (1, 5, 10)


def eval_sizes(n_available: int, ns: Iterable[int]) -> list[int]:
    """The protocol's N values that the split can fill; the whole split when it is smaller than all."""
    sizes = sorted({int(n) for n in ns if 0 < int(n) <= n_available})
    if not sizes and n_available > 0:
        sizes = [n_available]
    return sizes


def _ranks_of_matches(sims: np.ndarray) -> np.ndarray:
    """Rank (0 = best) of the diagonal entry in each row; ties count against the model."""
    diag = np.diag(sims)[:, None]
    return (sims > diag).sum(axis=1) + ((sims == diag).sum(axis=1) - 1)


def recall_at_k(img: np.ndarray, txt: np.ndarray, ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """R@K for image->text and text->image over N matched pairs (row i of each is a pair)."""
    if img.shape != txt.shape:
        raise ValueError(f"image and text embeddings differ in shape: {img.shape} vs {txt.shape}")
    sims = img.astype(np.float64) @ txt.astype(np.float64).T
    out: dict[str, float] = {}
    for name, matrix in (("i2t", sims), ("t2i", sims.T)):
        ranks = _ranks_of_matches(matrix)
        for k in ks:
            out[f"{name}_R@{k}"] = float((ranks < k).mean())
    return out


def recall_chance(n: int, ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """Expected R@K of a random ranking of N candidates."""
    return {f"R@{k}": min(k, n) / n for k in ks}


def protocol_recall(img: np.ndarray, txt: np.ndarray, ns: Iterable[int]) -> dict[str, dict[str, float]]:
    """Med3DVLM protocol: scores on the first N pairs for each N that the split can fill."""
    results = {}
    for n in eval_sizes(len(img), ns):
        scores = recall_at_k(img[:n], txt[:n])
        scores.update({f"chance_{k}": v for k, v in recall_chance(n).items()})
        results[str(n)] = scores
    return results


@dataclass(frozen=True)
class FindingQuery:
    """A finding-level question: studies with a finding of this type in this organ (and side)."""

    type: str
    organ: str
    side: str | None = None

    def text(self) -> str:
        where = f"{self.side} {self.organ}" if self.side else self.organ
        return f"{self.type} in the {where}."

    def matches(self, finding: dict) -> bool:
        if str(finding.get("type", "")).lower() != self.type.lower():
            return False
        if str(finding.get("organ", "")).lower() != self.organ.lower():
            return False
        return self.side is None or str(finding.get("side") or "").lower() == self.side.lower()


def finding_queries(findings: Sequence[list[dict]], min_relevant: int = 1) -> list[FindingQuery]:
    """Every (type, organ) pair present in the split, most frequent first (ties by name)."""
    counts: dict[FindingQuery, int] = {}
    for study in findings:
        for q in {FindingQuery(str(f.get("type")), str(f.get("organ"))) for f in study
                  if f.get("type") and f.get("organ")}:
            counts[q] = counts.get(q, 0) + 1
    return [q for q, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0].type, kv[0].organ))
            if c >= min_relevant]


def finding_precision(img: np.ndarray, query_emb: np.ndarray, queries: Sequence[FindingQuery],
                      findings: Sequence[list[dict]], k: int = 10) -> dict[str, float]:
    """Mean precision@k over finding queries, and its chance level (the share of relevant studies).

    A study is relevant to a query when its ground-truth findings match the query; its paired report
    plays no part, so this measures retrieval by meaning, not by memorised captions.
    """
    if not queries:
        return {f"P@{k}": float("nan"), f"chance_P@{k}": float("nan"), "queries": 0}
    relevant = np.array([[any(q.matches(f) for f in study) for study in findings] for q in queries])
    k_eff = min(k, img.shape[0])
    sims = query_emb.astype(np.float64) @ img.astype(np.float64).T
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k_eff]
    precision = np.take_along_axis(relevant, top, axis=1).mean(axis=1)
    chance = relevant.mean(axis=1)
    return {f"P@{k}": float(precision.mean()), f"chance_P@{k}": float(chance.mean()), "queries": len(queries)}
