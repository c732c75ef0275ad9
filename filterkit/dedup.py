"""Exact and near duplicates: identical bytes by content hash, near copies by cosine similarity
(FAISS range search), grouped with union-find; each group keeps its best image.

``find_duplicates`` takes a folder (with an encoder) or an ``[N, D]`` array of unit vectors
(groups of row indices, as imagededup's ``encoding_map`` takes precomputed encodings). In a
folder the keeper of a group is the largest resolution, then the larger file, then the first
path; among vectors it is the first row.

    >>> result = find_duplicates("./photos", encoder=Encoder.load("models/x"), threshold=0.95)
    >>> [(g.keep, [d.path for d in g.duplicates]) for g in result.groups]
    >>> find_duplicates(vectors, threshold=0.95).groups[0].keep      # a row index
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from .errors import FilterkitError
from .images import Skip
from .index import range_pairs


@dataclass(frozen=True)
class Duplicate:
    path: Path | int  # a file, or a row of the vectors given
    score: float  # cosine similarity to the kept image (1.0 for identical bytes)
    exact: bool  # identical bytes


@dataclass(frozen=True)
class DuplicateGroup:
    keep: Path | int
    duplicates: list[Duplicate]

    def to_dict(self) -> dict:
        def name(p: Path | int):
            return p if isinstance(p, int) else str(p)
        return {"keep": name(self.keep),
                "duplicates": [{"path": name(d.path), "score": round(d.score, 6), "exact": d.exact}
                               for d in self.duplicates]}


@dataclass
class DedupResult:
    """Duplicate groups (sorted by keeper), the threshold used, and the inputs skipped."""

    groups: list[DuplicateGroup]
    threshold: float
    skipped: list[Skip] = field(default_factory=list)

    @property
    def n_duplicates(self) -> int:
        return sum(len(g.duplicates) for g in self.groups)

    def summary_line(self) -> str:
        return f"{len(self.groups)} group(s), {self.n_duplicates} duplicate(s) at cosine >= {self.threshold:.4f}"

    def to_dict(self) -> dict:
        return {"groups": [g.to_dict() for g in self.groups], "threshold": round(self.threshold, 6),
                "skipped": [s.to_dict() for s in self.skipped]}


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


def _check_threshold(threshold: float) -> float:
    if not -1.0 <= threshold <= 1.0:
        raise FilterkitError(f"a cosine threshold lies in [-1, 1], got {threshold}")
    return float(threshold)


def duplicate_groups(paths: list[Path], hashes: list[str], vectors: np.ndarray,
                     threshold: float, index=None) -> list[DuplicateGroup]:
    """Groups of exact (same hash) and near (cosine >= threshold) duplicates, sorted by keeper.

    ``index``: a FAISS index over ``vectors`` to reuse (default: built for their number).
    """
    if len(paths) != len(vectors) or len(paths) != len(hashes):
        raise FilterkitError("paths, hashes and vectors must have the same length")
    _check_threshold(threshold)
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


def vector_groups(vectors: np.ndarray, threshold: float) -> list[DuplicateGroup]:
    """Groups of rows of unit ``vectors`` linked by cosine >= threshold; each keeps its first row."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise FilterkitError(f"expected vectors [N, D], got an array of shape {list(vectors.shape)}")
    _check_threshold(threshold)
    rows, cols, _ = range_pairs(vectors, threshold) if len(vectors) else (np.empty(0), np.empty(0), None)
    groups = []
    for members in group_indices(len(vectors), (rows.astype(np.int64), cols.astype(np.int64))):
        keep, rest = members[0], members[1:]  # members are in row order
        groups.append(DuplicateGroup(int(keep), [Duplicate(int(i), float(vectors[i] @ vectors[keep]), False)
                                                 for i in rest]))
    return groups


def model_threshold(encoder) -> float:
    """The dedup threshold calibrated into the encoder's model directory."""
    threshold = (encoder.meta.get("thresholds") or {}).get("dedup")
    if threshold is None:
        raise FilterkitError("this model has no calibrated dedup threshold: pass --threshold "
                             "(cosine, e.g. 0.95) or calibrate the model first")
    return float(threshold)


def find_duplicates(source: str | os.PathLike | np.ndarray, encoder=None, threshold: float | str | None = "auto",
                    cache=None, batch_size: int = 64, workers: int | None = None, progress: bool = False,
                    follow_symlinks: bool = False) -> DedupResult:
    """Group the duplicates of a folder (embedded through the cache by ``encoder``) or of the
    rows of an ``[N, D]`` array of unit vectors.

    ``threshold="auto"`` (or None) uses the dedup threshold calibrated into the encoder's model
    directory; vectors without an encoder need a number. ``cache``: an open ``EmbeddingCache``
    (None: the default cache).
    """
    if threshold in ("auto", None):
        if encoder is None:
            raise FilterkitError("threshold='auto' reads the encoder's calibrated threshold: pass encoder= "
                                 "or a cosine threshold")
        threshold = model_threshold(encoder)
    threshold = _check_threshold(float(threshold))
    if isinstance(source, np.ndarray):
        return DedupResult(vector_groups(source, threshold), threshold)
    if encoder is None:
        raise FilterkitError("find_duplicates(folder) needs encoder= to embed the folder")
    from .index import cached_index, content_key
    from .pipeline import cache_or_default, embed_folder

    with cache_or_default(cache) as store:  # the default cache keeps the folder's index too
        found = embed_folder(source, encoder, store, batch_size, workers, progress, follow_symlinks=follow_symlinks)
        index = None
        if len(found.vectors):
            index = cached_index(found.vectors, content_key(encoder.model_id, found.hashes), store.index_dir)
    groups = duplicate_groups(found.paths, found.hashes, found.vectors, threshold, index)
    return DedupResult(groups, threshold, found.skipped)


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


def calibrate_model_dir(model_dir: str | os.PathLike, images: str | os.PathLike, target_precision: float = 0.99,
                        max_images: int = 300, seed: int = 0) -> DedupCalibration:
    """Calibrate the dedup threshold of a model directory on a random sample of the real
    images under ``images`` (which it was not trained on) and store it in its config.json."""
    from .encoder import Encoder
    from .images import discover_images
    from .modeldir import update_model_config

    encoder = Encoder.load(model_dir)
    paths = discover_images(images)
    order = np.random.default_rng(seed).permutation(len(paths))[:max_images] if paths else []
    result = calibrate_dedup(encoder, [paths[i] for i in order], target_precision, max_images, seed)
    thresholds = dict(encoder.meta.get("thresholds") or {}, dedup=result.threshold,
                      dedup_calibration=result.to_dict())
    update_model_config(model_dir, thresholds=thresholds)
    return result
