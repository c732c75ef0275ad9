"""Clustering with spherical k-means prototypes, and pruning by prototype distance.

Each image gets its cluster and its cosine distance to the cluster's prototype: the
self-supervised-prototype difficulty of Sorscher et al. 2022 ("Beyond neural scaling laws"),
where far-from-prototype images are "hard" and near ones "easy". Keeping the hardest
fraction suits large data sets, keeping the easiest suits small ones (their finding).

    >>> c = cluster_vectors(vectors, k=50)
    >>> keep = select_fraction(c.distance, 0.7, keep="hard")
    >>> result = cluster_folder("./photos", Encoder.load(), k=50, keep_fraction=0.7)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import FilterkitError
from .images import Skip
from .index import build_index, search, spherical_kmeans

# Raw cosine: centring left k-means NMI unchanged within its spread on Imagenette and CIFAR-10,
# and whitening halved it (benchmarks/collection_quality.py).
DEFAULT_NORMALIZE = "none"


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


@dataclass
class FolderClusters:
    """A folder's images with their cluster and prototype distance; ``selected`` when a
    fraction was selected."""

    paths: list[Path]
    clustering: Clustering
    selected: np.ndarray | None = None  # [N] bool
    keep: str | None = None  # "hard" | "easy" when selected
    skipped: list[Skip] = field(default_factory=list)
    normalize: dict = field(default_factory=lambda: {"kind": "none"})  # Normalizer.to_dict() of the space

    def categories(self) -> list[tuple[Path, str]]:
        """(image, "selected" | "pruned") for file actions; empty without a selection."""
        if self.selected is None:
            return []
        return [(p, "selected" if sel else "pruned") for p, sel in zip(self.paths, self.selected)]

    def examples(self, n: int = 3) -> dict[int, list[Path]]:
        """The first ``n`` images of each cluster."""
        out: dict[int, list[Path]] = {}
        for p, c in zip(self.paths, self.clustering.assignment):
            if len(out.setdefault(int(c), [])) < n:
                out[int(c)].append(p)
        return out

    def to_dict(self) -> dict:
        c = self.clustering
        rows = [{"path": str(p), "cluster": int(a), "distance": round(float(d), 6),
                 **({"selected": bool(self.selected[i])} if self.selected is not None else {})}
                for i, (p, a, d) in enumerate(zip(self.paths, c.assignment, c.distance))]
        return {"clusters": [{"id": i, "size": int(n)} for i, n in enumerate(c.sizes())], "images": rows,
                "normalize": self.normalize, "skipped": [s.to_dict() for s in self.skipped]}


def cluster_folder(folder: str | os.PathLike, encoder, k: int, keep_fraction: float | None = None,
                   keep: str = "hard", seed: int = 0, cache=None, batch_size: int = 64,
                   workers: int | None = None, progress: bool = False,
                   follow_symlinks: bool = False, normalize: str = DEFAULT_NORMALIZE) -> FolderClusters:
    """Embed ``folder`` (through ``cache``, an open ``EmbeddingCache``; None: the default),
    cluster it into ``k`` prototypes, and select ``keep_fraction`` of it when given.
    ``normalize``: a normaliser fitted on the folder's vectors before clustering."""
    from .normalize import Normalizer
    from .pipeline import embed_folder

    found = embed_folder(folder, encoder, cache, batch_size, workers, progress, follow_symlinks=follow_symlinks)
    if len(found.paths) < k:
        raise FilterkitError(f"--k {k} is more than the {len(found.paths)} images that could be embedded: "
                             f"give --k {len(found.paths)} or fewer (a cluster needs an image at least)")
    norm = Normalizer.fit(found.vectors, normalize)
    clustering = cluster_vectors(norm(found.vectors), k, seed=seed)
    selected = select_fraction(clustering.distance, keep_fraction, keep) if keep_fraction is not None else None
    return FolderClusters(found.paths, clustering, selected, keep if selected is not None else None,
                          found.skipped, norm.to_dict())
