"""FAISS inner-product search over unit vectors (cosine similarity).

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
    ids: np.ndarray  # [Q, k] row numbers in the indexed vectors, -1 where fewer than k exist


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
