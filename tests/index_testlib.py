"""Clustered random unit vectors: the stand-in for scan embeddings in index benchmarks and tests
(recall on unstructured random high-dimensional data is meaningless: every point is equidistant)."""

from __future__ import annotations

import numpy as np


def clustered_vectors(n: int, d: int, n_clusters: int, seed: int = 0, noise: float = 0.8,
                      chunk: int = 100_000) -> np.ndarray:
    """Unit vectors around random centres with uneven cluster sizes; with noise 0.8 cluster-mates have
    cosine ~0.6 and strangers ~0."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = rng.dirichlet(np.full(n_clusters, 2.0))
    out = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        assign = rng.choice(n_clusters, size=m, p=weights)
        block = centres[assign] + rng.standard_normal((m, d), dtype=np.float32) * np.float32(noise / np.sqrt(d))
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start:start + m] = block
    return out
