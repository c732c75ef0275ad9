"""Exact and near duplicates: identical bytes by content hash, near copies by cosine similarity
(FAISS range search), grouped with union-find; each group keeps its best image.

The keeper of a group is the largest resolution, then the larger file, then the first path.

    >>> groups = find_duplicates("./photos", Encoder.load("models/x"), threshold=0.95)
    >>> [(g.keep, [d.path for d in g.duplicates]) for g in groups]
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

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
                     threshold: float, index=None) -> list[DuplicateGroup]:
    """Groups of exact (same hash) and near (cosine >= threshold) duplicates, sorted by keeper.

    ``index``: a FAISS index over ``vectors`` to reuse (default: built for their number).
    """
    if len(paths) != len(vectors) or len(paths) != len(hashes):
        raise FilterkitError("paths, hashes and vectors must have the same length")
    if not -1.0 <= threshold <= 1.0:
        raise FilterkitError(f"a cosine threshold lies in [-1, 1], got {threshold}")
    rows, cols, _ = range_pairs(vectors, threshold, index=index) if len(vectors) else (np.empty(0), np.empty(0), None)
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
                    batch_size: int = 64, workers: int | None = None, progress: bool = False,
                    follow_symlinks: bool = False):
    """Embed ``folder`` (through the cache) and group its duplicates.

    ``threshold=None`` uses the dedup threshold calibrated into the model directory.
    Returns (groups, skipped images).
    """
    from .pipeline import embed_folder

    if threshold is None:
        threshold = (encoder.meta.get("thresholds") or {}).get("dedup")
        if threshold is None:
            raise FilterkitError("this model has no calibrated dedup threshold: pass --threshold "
                                 "(cosine, e.g. 0.95) or calibrate the model first")
    from .cache import EmbeddingCache
    from .index import cached_index

    if cache is None:
        with EmbeddingCache() as default_cache:
            return find_duplicates(folder, encoder, threshold, default_cache, batch_size, workers, progress,
                                   follow_symlinks)
    found = embed_folder(folder, encoder, cache, batch_size, workers, progress, follow_symlinks=follow_symlinks)
    index = None
    if len(found.vectors):
        index = cached_index(found.vectors, f"{encoder.model_id}:{','.join(found.hashes)}", cache.index_dir)
    return duplicate_groups(found.paths, found.hashes, found.vectors, float(threshold), index), found.skipped


def near_duplicate_variant(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A synthetic near-duplicate of ``image``: crop to 70-95 % of each side, resize to
    50-100 %, maybe flip, a colour shift, and a JPEG re-encode at quality 30-90."""
    w, h = image.size
    cw, ch = (max(1, int(side * rng.uniform(0.70, 0.95))) for side in (w, h))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    out = image.convert("RGB").crop((x, y, x + cw, y + ch))
    scale = rng.uniform(0.5, 1.0)
    out = out.resize((max(8, int(cw * scale)), max(8, int(ch * scale))), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    out = ImageEnhance.Color(out).enhance(rng.uniform(0.7, 1.3))
    out = ImageEnhance.Brightness(out).enhance(rng.uniform(0.8, 1.2))
    buffer = io.BytesIO()
    out.save(buffer, format="JPEG", quality=int(rng.integers(30, 91)))
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


@dataclass(frozen=True)
class DedupCalibration:
    threshold: float
    precision: float
    recall: float
    target_precision: float
    images: int

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "precision": self.precision, "recall": self.recall,
                "target_precision": self.target_precision, "images": self.images,
                "method": "synthetic near-duplicates (crop, resize, flip, colour, JPEG) of held-out images"}


def threshold_for_precision(similarities: np.ndarray, is_duplicate: np.ndarray,
                            target_precision: float) -> tuple[float, float, float]:
    """The lowest threshold whose pairs at or above it reach ``target_precision``:
    (threshold, precision, recall)."""
    order = np.argsort(-similarities, kind="stable")
    sims, positive = similarities[order], is_duplicate[order].astype(np.float64)
    true_pos = np.cumsum(positive)
    precision = true_pos / np.arange(1, len(sims) + 1)
    # A cut "similarity >= t" takes every pair equal to t: only the end of a run of equal
    # similarities is a real cut point.
    run_end = np.append(sims[1:] != sims[:-1], True)
    ok = np.flatnonzero(run_end & (precision >= target_precision))
    if len(ok) == 0 or positive.sum() == 0:
        raise FilterkitError("no threshold reaches the target precision on these images")
    last = ok[-1]
    return float(sims[last]), float(precision[last]), float(true_pos[last] / positive.sum())


def calibrate_dedup(encoder, paths: list[Path], target_precision: float = 0.99, max_images: int = 300,
                    seed: int = 0) -> DedupCalibration:
    """Dedup threshold at ``target_precision`` on a collection made of the given real images
    and one synthetic near-duplicate of each: every (image, its variant) pair is a duplicate,
    every other pair is not."""
    from .errors import ImageError
    from .images import load_image

    rng = np.random.default_rng(seed)
    images = []
    for p in paths:
        if len(images) >= max_images:
            break
        try:
            images.append(load_image(p))
        except ImageError:
            continue
    if len(images) < 10:
        raise FilterkitError(f"calibration needs at least 10 decodable images, found {len(images)}")
    variants = [near_duplicate_variant(im, rng) for im in images]
    vectors = np.concatenate([encoder.embed(images), encoder.embed(variants)])
    n = len(images)
    sims = vectors @ vectors.T  # at most 2 x max_images squared: small by construction
    i, j = np.triu_indices(2 * n, k=1)
    is_dup = (j - i == n)  # image k and its variant k + n
    t, precision, recall = threshold_for_precision(sims[i, j], is_dup, target_precision)
    return DedupCalibration(t, precision, recall, target_precision, n)
