"""FAISS inner-product search, range search and spherical k-means over unit vectors.

Thin functions over numpy arrays, in the manner of ``faiss.contrib``.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from .errors import FilterkitError


@dataclass(frozen=True)
class SearchResult:
    scores: np.ndarray  # [Q, k] cosine similarities, best first
    ids: np.ndarray  # [Q, min(k, N)] row numbers in the indexed vectors


def build_index(vectors: np.ndarray) -> faiss.Index:
    """An exact inner-product index over ``vectors`` [N, D] (unit rows -> cosine)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise FilterkitError(f"expected vectors [N, D], got shape {vectors.shape}")
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return index


def search(index: faiss.Index, queries: np.ndarray, k: int = 10) -> SearchResult:
    """The ``k`` nearest indexed vectors of each query by inner product."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != index.d:
        raise FilterkitError(
            f"dimension mismatch: queries have shape {queries.shape}, the index holds {index.d}-d vectors"
        )
    if k < 1:
        raise FilterkitError(f"k must be at least 1, got {k}")
    scores, ids = index.search(queries, min(k, max(index.ntotal, 1)))
    return SearchResult(scores=scores, ids=ids)


def spherical_kmeans(vectors: np.ndarray, k: int, seed: int = 0, niter: int = 25) -> np.ndarray:
    """``k`` unit-norm prototypes of unit vectors (faiss.Kmeans, spherical)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if not 1 <= k <= len(vectors):
        raise FilterkitError(f"k-means with k={k} needs between 1 and {len(vectors)} (the number of vectors)")
    kmeans = faiss.Kmeans(vectors.shape[1], k, niter=niter, seed=seed, spherical=True,
                          min_points_per_centroid=1, max_points_per_centroid=1 << 30)
    kmeans.train(vectors)
    centroids = kmeans.centroids
    return centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)


def range_pairs(vectors: np.ndarray, threshold: float, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs (i < j) with inner product >= ``threshold``, as arrays (i, j, similarity).

    Queries run in chunks through FAISS range search, so memory grows with the number of
    pairs found, never with N x N.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = build_index(vectors)
    rows, cols, sims = [], [], []
    for start in range(0, len(vectors), chunk):
        lims, dist, ids = index.range_search(vectors[start:start + chunk], float(threshold))
        counts = np.diff(lims.astype(np.int64))
        i = np.repeat(np.arange(start, start + len(counts)), counts)
        keep = ids > i  # each pair once, no self-pairs
        rows.append(i[keep])
        cols.append(ids[keep])
        sims.append(dist[keep])
    if not rows:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, np.empty(0, dtype=np.float32)
    return np.concatenate(rows), np.concatenate(cols).astype(np.int64), np.concatenate(sims)
