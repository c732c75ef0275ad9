"""FAISS inner-product search, range search and spherical k-means over unit vectors.

Thin functions over numpy arrays, in the manner of ``faiss.contrib``. The index type follows
the collection's size: exact (``IndexFlatIP``) up to ``EXACT_MAX``, IVF beyond it, with
nlist = 4·sqrt(N) coarse cells trained on a sample and ``nprobe`` raised until recall@10 on a
sample of the indexed vectors reaches ``target_recall`` of exact search. IVF indexes are
worth keeping: ``cached_index`` stores them in a folder next to the embedding cache, keyed
by the exact list of vectors they hold.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from .errors import FilterkitError
from .fsutil import atomic_write_bytes

# Above this many vectors, all-pairs work (dedup: one range search per vector) is faster on
# an IVF index than exact; measured by benchmarks/scale.py (see benchmarks/README.md).
EXACT_MAX = 20_000
TRAIN_POINTS_PER_LIST = 64  # k-means sample per coarse cell (FAISS warns below 39)
_ADD_CHUNK = 1 << 16
KEEP_INDEXES = 4  # IVF index files kept next to a cache


@dataclass(frozen=True)
class SearchResult:
    scores: np.ndarray  # [Q, k] cosine similarities, best first
    ids: np.ndarray  # [Q, min(k, N)] row numbers in the indexed vectors


def index_kind(n: int) -> str:
    return "flat" if n <= EXACT_MAX else "ivf"


def default_nlist(n: int) -> int:
    """Coarse cells of an IVF index over ``n`` vectors: 4·sqrt(n), fewer where that would
    leave under ``TRAIN_POINTS_PER_LIST`` training points per cell."""
    return max(1, min(round(4 * math.sqrt(n)), n // TRAIN_POINTS_PER_LIST or 1))


def sample_rows(n: int, count: int, seed: int) -> np.ndarray:
    """``count`` distinct row numbers of ``n`` (all if fewer), sorted: the k-means training
    sample and the nprobe tuning queries."""
    return np.sort(np.random.default_rng(seed).choice(n, min(n, count), replace=False))


def content_key(model_id: str, hashes: Sequence[str]) -> str:
    """The key ``cached_index`` files an index under: the model and the ordered content
    sha256s of the indexed vectors (row i of the index is ``hashes[i]``)."""
    return f"{model_id}:{','.join(hashes)}"


def build_index(vectors: np.ndarray, kind: str = "auto", target_recall: float = 0.99,
                seed: int = 0) -> faiss.Index:
    """An inner-product index over ``vectors`` [N, D] (unit rows -> cosine).

    ``kind``: ``flat`` (exact), ``ivf``, or ``auto`` (flat up to ``EXACT_MAX`` vectors).
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise FilterkitError(f"expected vectors [N, D], got shape {vectors.shape}")
    kind = index_kind(len(vectors)) if kind == "auto" else kind
    if kind == "flat":
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        return index
    if kind != "ivf":
        raise FilterkitError(f"unknown index kind {kind!r}; choose auto, flat or ivf")
    n, d = vectors.shape
    nlist = default_nlist(n)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.train(vectors[sample_rows(n, TRAIN_POINTS_PER_LIST * nlist, seed)])
    for start in range(0, n, _ADD_CHUNK):
        index.add(vectors[start:start + _ADD_CHUNK])
    index.nprobe = tune_nprobe(index, vectors, target_recall, seed=seed)
    return index


def recall_by_score(approx: np.ndarray, exact: np.ndarray, eps: float = 1e-5) -> float:
    """recall@k judged by score: an approximate hit counts when it scores at least the exact
    k-th neighbour. Identical vectors (copies of one photo) tie, so comparing ids would call
    an equally good neighbour a miss."""
    kth = exact[:, -1:]
    return float(np.mean(approx >= kth - eps))


def tune_nprobe(index: faiss.IndexIVF, vectors: np.ndarray, target_recall: float = 0.99, k: int = 10,
                queries: int = 256, seed: int = 0) -> int:
    """The smallest power-of-two ``nprobe`` whose recall@k, on indexed vectors used as
    queries, reaches ``target_recall`` of exact search (``faiss.knn``: no second copy)."""
    q = vectors[sample_rows(len(vectors), queries, seed + 1)]
    k = min(k, len(vectors))
    return smallest_nprobe(index, q, exact_top_scores(q, [vectors], k), target_recall)[0]


def exact_top_scores(queries: np.ndarray, chunks: Iterable[np.ndarray], k: int) -> np.ndarray:
    """Exact top-``k`` inner products [Q, k] of ``queries`` against the vectors, given in
    chunks (merged chunk by chunk, so the vectors need not fit in memory at once)."""
    best = np.full((len(queries), k), -np.inf, dtype=np.float32)
    for vectors in chunks:
        scores, _ = faiss.knn(queries, vectors, min(k, len(vectors)), metric=faiss.METRIC_INNER_PRODUCT)
        best = -np.sort(-np.hstack([best, scores]), axis=1)[:, :k]
    return best


def smallest_nprobe(index: faiss.IndexIVF, queries: np.ndarray, exact_scores: np.ndarray,
                    target_recall: float) -> tuple[int, float]:
    """(nprobe, its recall): nprobe doubled from 1 until recall@k, against the exact top-k
    scores of ``queries``, reaches ``target_recall`` (or every list is probed)."""
    nprobe = 1
    while True:
        index.nprobe = nprobe
        approx, _ = index.search(queries, exact_scores.shape[1])
        recall = recall_by_score(approx, exact_scores)
        if recall >= target_recall or nprobe >= index.nlist:
            return nprobe, recall
        nprobe = min(2 * nprobe, index.nlist)


def cached_index(vectors: np.ndarray, key: str, folder: str | os.PathLike | None,
                 kind: str = "auto") -> faiss.Index:
    """``build_index``, reusing an IVF index saved in ``folder`` under exactly this ``key``
    (``content_key(model_id, hashes)`` of the vectors' model and ordered content ids).
    Exact indexes are rebuilt instead: that is as fast as reading them."""
    kind = index_kind(len(vectors)) if kind == "auto" else kind
    if folder is None or kind == "flat":
        return build_index(vectors, kind)
    path = Path(folder) / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.{kind}.faiss"
    if path.is_file():
        try:
            index = faiss.deserialize_index(np.fromfile(path, dtype=np.uint8))
            if index.ntotal == len(vectors) and index.d == vectors.shape[1]:
                return index
        except RuntimeError:
            pass  # damaged: rebuild and replace it
    index = build_index(vectors, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, faiss.serialize_index(index).tobytes())
    # Each new folder content makes a new file: keep the most recently built few, not all.
    saved = sorted(Path(folder).glob("*.faiss"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    for old in saved[KEEP_INDEXES:]:
        old.unlink(missing_ok=True)
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
    # FAISS trains on a sample of 256 points per centroid: bounded time at any N.
    kmeans = faiss.Kmeans(vectors.shape[1], k, niter=niter, seed=seed, spherical=True,
                          min_points_per_centroid=1, max_points_per_centroid=256)
    kmeans.train(vectors)
    centroids = kmeans.centroids
    return centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)


def range_pairs(vectors: np.ndarray, threshold: float, chunk: int = 4096,
                index: faiss.Index | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs (i < j) with inner product >= ``threshold``, as arrays (i, j, similarity).

    Queries run in chunks through FAISS range search, so memory grows with the number of
    pairs found, never with N x N. Past ``EXACT_MAX`` vectors the index is IVF, so a pair
    whose two vectors fall in cells that no probe visits is missed (benchmarks/scale.py
    measures the recall of planted near-duplicate pairs).
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = build_index(vectors) if index is None else index
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
