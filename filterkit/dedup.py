"""Exact and near duplicates: identical bytes by content hash, near copies by cosine similarity
(FAISS range search), grouped with union-find; each group keeps its best image.

The keeper of a group is the largest resolution, then the larger file, then the first path.

    >>> groups = find_duplicates("./photos", Encoder.load("models/x"), threshold=0.95)
    >>> [(g.keep, [d.path for d in g.duplicates]) for g in groups]
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import FilterkitError
from .index import range_pairs


@dataclass(frozen=True)
class Duplicate:
    path: Path
    score: float  # cosine similarity to the kept image (1.0 for identical bytes)
    exact: bool  # identical bytes


@dataclass(frozen=True)
class DuplicateGroup:
    keep: Path
    duplicates: list[Duplicate]

    def to_dict(self) -> dict:
        return {"keep": str(self.keep),
                "duplicates": [{"path": str(d.path), "score": round(d.score, 6), "exact": d.exact}
                               for d in self.duplicates]}


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def group_indices(n: int, pairs: tuple[np.ndarray, np.ndarray]) -> list[list[int]]:
    """Connected components (of size >= 2) of the graph on ``n`` nodes with edges ``pairs``."""
    uf = _UnionFind(n)
    for a, b in zip(*pairs):
        uf.union(int(a), int(b))
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(uf.find(i), []).append(i)
    return [members for members in groups.values() if len(members) > 1]


def _pixels(path: Path) -> int:
    try:
        with Image.open(path) as im:
            return im.size[0] * im.size[1]
    except Exception:  # unreadable now: rank it last
        return -1


def keeper_order(paths: list[Path]) -> list[int]:
    """Indices of ``paths`` from best to worst keeper: resolution, then file size, then path."""
    def key(i: int):
        try:
            size = os.path.getsize(paths[i])
        except OSError:
            size = -1
        return (-_pixels(paths[i]), -size, str(paths[i]))
    return sorted(range(len(paths)), key=key)


def duplicate_groups(paths: list[Path], hashes: list[str], vectors: np.ndarray,
                     threshold: float) -> list[DuplicateGroup]:
    """Groups of exact (same hash) and near (cosine >= threshold) duplicates, sorted by keeper."""
    if len(paths) != len(vectors) or len(paths) != len(hashes):
        raise FilterkitError("paths, hashes and vectors must have the same length")
    if not -1.0 <= threshold <= 1.0:
        raise FilterkitError(f"a cosine threshold lies in [-1, 1], got {threshold}")
    rows, cols, _ = range_pairs(vectors, threshold) if len(vectors) else (np.empty(0), np.empty(0), None)
    first_of_hash: dict[str, int] = {}
    exact_rows, exact_cols = [], []
    for i, h in enumerate(hashes):
        if h in first_of_hash:
            exact_rows.append(first_of_hash[h])
            exact_cols.append(i)
        else:
            first_of_hash[h] = i
    pairs = (np.concatenate([rows, exact_rows]).astype(np.int64), np.concatenate([cols, exact_cols]).astype(np.int64))
    groups = []
    for members in group_indices(len(paths), pairs):
        order = keeper_order([paths[i] for i in members])
        keep = members[order[0]]
        dups = [Duplicate(paths[i], 1.0 if hashes[i] == hashes[keep] else float(vectors[i] @ vectors[keep]),
                          hashes[i] == hashes[keep])
                for i in (members[j] for j in order[1:])]
        groups.append(DuplicateGroup(paths[keep], dups))
    return sorted(groups, key=lambda g: str(g.keep))


def find_duplicates(folder: str | os.PathLike, encoder, threshold: float | None = None, cache=None,
                    batch_size: int = 64, workers: int | None = None, progress: bool = False):
    """Embed ``folder`` (through the cache) and group its duplicates.

    ``threshold=None`` uses the dedup threshold calibrated into the model directory.
    Returns (groups, skipped images).
    """
    from .cache import EmbeddingCache
    from .pipeline import embed_folder

    if threshold is None:
        threshold = (encoder.meta.get("thresholds") or {}).get("dedup")
        if threshold is None:
            raise FilterkitError("this model has no calibrated dedup threshold: pass --threshold "
                                 "(cosine, e.g. 0.95) or calibrate the model first")
    store = cache if cache is not None else EmbeddingCache()
    try:
        found = embed_folder(folder, encoder, store, batch_size, workers, progress)
    finally:
        if cache is None:
            store.close()
    return duplicate_groups(found.paths, found.hashes, found.vectors, float(threshold)), found.skipped
