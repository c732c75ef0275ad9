"""Clustering with spherical k-means prototypes, and pruning by prototype distance.

Each image gets its cluster and its cosine distance to the cluster's prototype: the
self-supervised-prototype difficulty of Sorscher et al. 2022 ("Beyond neural scaling laws"),
where far-from-prototype images are "hard" and near ones "easy". Keeping the hardest
fraction suits large data sets, keeping the easiest suits small ones (their finding).

    >>> c = cluster_vectors(vectors, k=50)
    >>> keep = select_fraction(c.distance, 0.7, keep="hard")
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import FilterkitError
from .index import search, build_index, spherical_kmeans


@dataclass(frozen=True)
class Clustering:
    prototypes: np.ndarray  # [K, D] unit rows
    assignment: np.ndarray  # [N] cluster of each vector
    distance: np.ndarray  # [N] 1 - cosine to its prototype

    def sizes(self) -> np.ndarray:
        return np.bincount(self.assignment, minlength=len(self.prototypes))


def cluster_vectors(vectors: np.ndarray, k: int, seed: int = 0) -> Clustering:
    prototypes = spherical_kmeans(vectors, k, seed=seed)
    found = search(build_index(prototypes), vectors, 1)
    return Clustering(prototypes, found.ids[:, 0].astype(np.int64), (1.0 - found.scores[:, 0]).astype(np.float32))


def select_fraction(distance: np.ndarray, fraction: float, keep: str = "hard") -> np.ndarray:
    """Boolean mask keeping ``round(fraction * N)`` images: the farthest from their prototype
    (``hard``) or the nearest (``easy``); ties broken by position."""
    if not 0.0 < fraction <= 1.0:
        raise FilterkitError(f"--keep-fraction must be in (0, 1], got {fraction}")
    if keep not in ("hard", "easy"):
        raise FilterkitError(f"--keep must be 'hard' or 'easy', got {keep!r}")
    n_keep = int(round(fraction * len(distance)))
    order = np.argsort(-distance if keep == "hard" else distance, kind="stable")
    mask = np.zeros(len(distance), dtype=bool)
    mask[order[:n_keep]] = True
    return mask
