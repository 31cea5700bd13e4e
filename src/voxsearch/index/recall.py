"""Measure an index's recall@k against exact search and tune its search-time knob to a target.

Queries are rows sampled at random from the indexed data; each query's own row is dropped from both
the exact and the approximate answer, so recall is not inflated by trivial self-matches.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from voxsearch.index.exact import exact_topk

SearchFn = Callable[[np.ndarray, int, dict], np.ndarray]  # (queries, k, params) -> labels (q, k)


def recall_at_k(found: np.ndarray, truth: np.ndarray, self_rows: np.ndarray, k: int) -> float:
    hits = 0
    for row, f, t in zip(self_rows, found, truth):
        f = [x for x in f if x >= 0 and x != row][:k]
        t = [x for x in t if x >= 0 and x != row][:k]
        hits += len(set(f) & set(t)) / max(len(t), 1)
    return hits / max(len(self_rows), 1)


def ground_truth(vectors: np.ndarray, alive_rows: np.ndarray, n_queries: int, k: int, seed: int):
    """(query rows, queries, exact labels with k+1 columns) for a random sample of alive rows."""
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(alive_rows, size=min(n_queries, len(alive_rows)), replace=False))
    queries = np.ascontiguousarray(vectors[picked], dtype=np.float32)
    rows = None if len(alive_rows) == vectors.shape[0] else alive_rows
    _, labels = exact_topk(queries, vectors, rows, k + 1)
    return picked, queries, labels


def tune(search: SearchFn, queries: np.ndarray, truth: np.ndarray, self_rows: np.ndarray, k: int,
         knob: str | None, candidates: list[int], target: float, fixed: dict) -> tuple[dict, float, list[dict]]:
    """Smallest candidate value of `knob` reaching `target` recall (else the best tried).

    Returns (chosen params, recall at them, the measured curve)."""
    if knob is None or not candidates:
        labels = search(queries, k + 1, dict(fixed))
        value = recall_at_k(labels, truth, self_rows, k)
        return dict(fixed), value, [{**fixed, "recall": round(value, 4)}]
    curve, best = [], None
    for value in candidates:
        params = {**fixed, knob: value}
        recall = recall_at_k(search(queries, k + 1, params), truth, self_rows, k)
        curve.append({**params, "recall": round(recall, 4)})
        if best is None or recall > best[1] + 1e-9:
            best = (params, recall)
        if recall >= target:
            return params, recall, curve
    return best[0], best[1], curve
