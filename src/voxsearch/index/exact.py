"""Exact top-k by inner product over chosen rows: the ground truth for recall, exact filtered search
and re-ranking. Works in chunks so a memory-mapped store is never copied whole into RAM."""

from __future__ import annotations

import numpy as np

CHUNK_ROWS = 65_536


def exact_topk(queries: np.ndarray, vectors: np.ndarray, rows: np.ndarray | None, k: int,
               chunk: int = CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """(scores, labels) of shape (q, k), best first; labels are row numbers, -1 where fewer than k rows."""
    nq = queries.shape[0]
    total = vectors.shape[0] if rows is None else len(rows)
    best_s = np.full((nq, k), -np.inf, dtype=np.float32)
    best_l = np.full((nq, k), -1, dtype=np.int64)
    for start in range(0, total, chunk):
        labels = np.arange(start, min(start + chunk, total)) if rows is None else rows[start:start + chunk]
        block = vectors[labels] if rows is not None else vectors[start:start + chunk]
        scores = queries @ np.asarray(block, dtype=np.float32).T
        cand_s = np.concatenate([best_s, scores], axis=1)
        cand_l = np.concatenate([best_l, np.broadcast_to(labels, scores.shape)], axis=1)
        keep = min(k, cand_s.shape[1])
        part = np.argpartition(-cand_s, keep - 1, axis=1)[:, :keep]
        best_s = np.take_along_axis(cand_s, part, axis=1)
        best_l = np.take_along_axis(cand_l, part, axis=1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    best_s = np.take_along_axis(best_s, order, axis=1)
    best_l = np.take_along_axis(best_l, order, axis=1)
    best_l[~np.isfinite(best_s)] = -1
    return best_s, best_l


def rerank(queries: np.ndarray, vectors: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact scores for each query's candidate labels (-1 = none); the best k of them."""
    nq = queries.shape[0]
    out_s = np.full((nq, k), -np.inf, dtype=np.float32)
    out_l = np.full((nq, k), -1, dtype=np.int64)
    for i in range(nq):
        labels = candidates[i][candidates[i] >= 0]
        if not len(labels):
            continue
        sorted_labels = np.unique(labels)  # sorted reads are kinder to a memory-mapped store
        scores = np.asarray(vectors[sorted_labels], dtype=np.float32) @ queries[i]
        top = np.argsort(-scores, kind="stable")[:k]
        out_s[i, :len(top)] = scores[top]
        out_l[i, :len(top)] = sorted_labels[top]
    return out_s, out_l
