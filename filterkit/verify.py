"""Image-level check of candidate duplicate pairs: small greyscale thumbnails, normalised per
image, compared under crops and under the 8 flips and 90-degree rotations (the dihedral group).

A thumbnail is the image in greyscale, area-averaged to ``SIDE`` x ``SIDE`` (whatever its aspect
ratio), minus its local mean (a 5x5 box: the large smooth areas that make unrelated skies and
seas correlate are removed), then shifted to zero mean and scaled to unit norm. The inner
product of two thumbnails is their correlation: brightness and contrast shifts do not change
it, the small side averages away JPEG noise, colour shifts and resampling, and the square
resize maps a 90-degree rotation of an image onto ``np.rot90`` of its thumbnail.

A copy cropped to 70-95 % of each side is out of register with its original by up to a third of
the thumbnail, so each image also has thumbnails of ``len(SCALES)**2 * GRID**2`` windows (every
pair of side fractions in ``SCALES``, on a GRID x GRID lattice of positions). The pixel score of
a pair is the largest correlation of either image's whole-frame thumbnail with any window of the
other under any of the 8 transforms. This is the tiny-image comparison of Torralba, Fergus and
Freeman 2008 ("80 million tiny images": normalised 32x32 images matched with flips and small
shifts), computed only for the candidate pairs.

    >>> views = [image_views(im) for im in (Image.open("a.jpg"), Image.open("b.jpg"))]
    >>> pixel_scores(np.stack(views), np.array([0]), np.array([1]))     # in [-1, 1]
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

SIDE = 12  # thumbnail side (benchmarks/README.md compared 8, 12 and 16 on 32-px images)
SCALES = (0.95, 0.85, 0.75)  # window side fractions, as near_duplicate_variant crops 70-95 %
GRID = 4  # window positions per axis
WORK = 4 * SIDE  # windows are cut from the image reduced to WORK x WORK: cheap for any size
DRAFT = WORK  # JPEG draft decoding down to this size loses nothing the thumbnails keep
N_VIEWS = 1 + len(SCALES) ** 2 * GRID ** 2


def _normalise(grey: np.ndarray) -> np.ndarray:
    """[..., S, S] -> [..., S*S]: minus the 5x5 local mean, zero mean, unit norm (zeros if flat)."""
    padded = np.pad(grey, [(0, 0)] * (grey.ndim - 2) + [(2, 2), (2, 2)], mode="edge")
    detail = grey - sliding_window_view(padded, (5, 5), axis=(-2, -1)).mean(axis=(-2, -1))
    flat = detail.reshape(*grey.shape[:-2], -1)
    flat = flat - flat.mean(axis=-1, keepdims=True)
    norm = np.linalg.norm(flat, axis=-1, keepdims=True)
    return np.where(norm > 1e-3, flat / np.maximum(norm, 1e-3), 0.0).astype(np.float32)


def thumbnail(image: Image.Image) -> np.ndarray:
    """The whole-frame thumbnail of ``image``: float32 [SIDE * SIDE]."""
    grey = image.convert("L").resize((SIDE, SIDE), Image.Resampling.BOX)
    return _normalise(np.asarray(grey, dtype=np.float32))


def image_views(image: Image.Image) -> np.ndarray:
    """The whole-frame thumbnail, then the window thumbnails: float32 [N_VIEWS, SIDE * SIDE]."""
    work = image.convert("L").resize((WORK, WORK), Image.Resampling.BOX)
    boxes = [(0.0, 0.0, float(WORK), float(WORK))]
    for fx in SCALES:
        for fy in SCALES:
            w, h = fx * WORK, fy * WORK
            boxes += [(x, y, x + w, y + h) for x in np.linspace(0, WORK - w, GRID)
                      for y in np.linspace(0, WORK - h, GRID)]
    grey = np.stack([np.asarray(work.resize((SIDE, SIDE), Image.Resampling.BOX, box=b), dtype=np.float32)
                     for b in boxes])
    return _normalise(grey)


# dihedral()'s transform t = rot90^k after a flip^f (t = 4f + k); the index of its inverse
INVERSE = (0, 3, 2, 1, 4, 5, 6, 7)


def dihedral(thumbs: np.ndarray) -> np.ndarray:
    """The 8 flips/rotations of thumbnails: [..., D] -> [8, ..., D] (identity first)."""
    shape = thumbs.shape
    square = thumbs.reshape(-1, SIDE, SIDE)
    views = [np.rot90(flipped, k, axes=(1, 2)).reshape(shape)
             for flipped in (square, square[:, :, ::-1]) for k in range(4)]
    return np.ascontiguousarray(np.stack(views), dtype=np.float32)


def pixel_scores(views: np.ndarray, rows: np.ndarray, cols: np.ndarray, chunk: int = 512) -> np.ndarray:
    """For each pair (rows[p], cols[p]) of images with ``views`` [N, N_VIEWS, D], the largest
    correlation of one's whole frame with a window of the other (either way round) under any
    flip/rotation: float32 [P] in [-1, 1]. Work is chunked: ``chunk`` pairs at a time."""
    rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    out = np.empty(len(rows), dtype=np.float32)
    for s in range(0, len(rows), chunk):
        a, b = rows[s:s + chunk], cols[s:s + chunk]
        best = np.full(len(a), -1.0, dtype=np.float32)
        for x, y in ((a, b), (b, a)):
            # <frame, T(window)> = <T^-1(frame), window> (T permutes pixels) and T^-1 runs over the
            # same 8 transforms: transform the one frame, not the V windows (8x less to copy).
            frames = dihedral(views[x, 0])  # [8, p, D]
            best = np.maximum(best, np.einsum("kpd,pvd->kpv", frames, views[y]).max(axis=(0, 2)))
        out[s:s + chunk] = best
    return out


def dihedral_neighbours(thumbs: np.ndarray, k: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i < j) where j is among i's ``k`` nearest whole-frame thumbnails under some
    flip/rotation, at correlation >= ``threshold`` (see ``DihedralSearch``)."""
    return DihedralSearch(thumbs, k, threshold).pairs


class DihedralSearch:
    """Whole-frame thumbnail neighbours under the 8 flips/rotations: 8 FAISS searches (one per
    transform of the queries) over one index, so a rotated copy is found without transforming
    the index. Kept after the search to ask whether it would have proposed a pair with an image
    it never saw (``proposes``): dedup's calibration counts a synthetic copy as found only then.

    ``others``: the thumbnails of a second set (cross-set dedup). Then only pairs (i of
    ``thumbs``, j of ``others``) are searched: each image's ``k`` nearest in the other set, both
    ways round, and ``proposes`` asks about a newcomer to ``others``."""

    def __init__(self, thumbs: np.ndarray, k: int, threshold: float, others: np.ndarray | None = None) -> None:
        from .index import build_index, search

        self.thumbs = np.ascontiguousarray(thumbs, dtype=np.float32)
        self.k, self.threshold = k, float(threshold)
        cross = others is not None
        n = len(self.thumbs)
        other = np.ascontiguousarray(others, dtype=np.float32) if cross else self.thumbs
        self.kth = np.full((8, n), -np.inf, dtype=np.float32)  # the weakest score in each image's list
        empty = np.empty(0, dtype=np.int64)
        self.pairs = (empty, empty)
        if n < (1 if cross else 2) or len(other) < 1:
            return
        self.index = build_index(self.thumbs)
        other_index = build_index(other) if cross else self.index
        own = 0 if cross else 1  # a self-search finds the image itself first
        found = []
        for t, view in enumerate(dihedral(self.thumbs)):
            hits = search(other_index, view, min(k + own, len(other)))
            if hits.ids.shape[1] == k + own:  # a full list: a newcomer must beat its last entry
                self.kth[t] = hits.scores[:, -1]
            i = np.repeat(np.arange(n), hits.ids.shape[1])
            j, s = hits.ids.ravel().astype(np.int64), hits.scores.ravel()
            keep = (j >= 0) & (s >= threshold) & (cross | (j != i))
            found.append(np.stack([i[keep], j[keep]], axis=1) if cross else
                         np.stack([np.minimum(i[keep], j[keep]), np.maximum(i[keep], j[keep])], axis=1))
        if cross:  # and each image of the other set's nearest here
            for view in dihedral(other):
                hits = search(self.index, view, min(k, n))
                j = np.repeat(np.arange(len(other)), hits.ids.shape[1])
                i, s = hits.ids.ravel().astype(np.int64), hits.scores.ravel()
                keep = (i >= 0) & (s >= threshold)
                found.append(np.stack([i[keep], j[keep]], axis=1))
        pairs = np.unique(np.concatenate(found), axis=0)
        self.pairs = (pairs[:, 0], pairs[:, 1])

    def proposes(self, targets: np.ndarray, queries: np.ndarray) -> np.ndarray:
        """bool [m]: whether the search, had ``queries[p]`` been one more image (of ``others``,
        in a cross-set search), would pair it with image ``targets[p]``: the target among the
        query's k nearest, or the query beating the last of the target's list, under some
        transform, at >= the threshold."""
        from .index import search

        targets = np.asarray(targets, dtype=np.int64)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        found = np.zeros(len(targets), dtype=bool)
        if not hasattr(self, "index") or not len(targets):
            return found
        own = dihedral(self.thumbs[targets])  # [8, m, D]
        for t, view in enumerate(dihedral(queries)):
            hits = search(self.index, view, min(self.k, len(self.thumbs)))
            found |= ((hits.ids == targets[:, None]) & (hits.scores >= self.threshold)).any(axis=1)
            score = np.einsum("md,md->m", own[t], queries)
            found |= score >= np.maximum(self.kth[t][targets], self.threshold)
        return found

    def would_pair(self, queries: np.ndarray, chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """(query, image) pairs the search would have made had ``queries`` been more images (of
        ``others``, in a cross-set search): each query's k nearest under some transform, and
        every image whose list it would enter, at >= the threshold (``proposes`` for all images)."""
        from .index import search

        queries = np.ascontiguousarray(queries, dtype=np.float32)
        found = []
        if not hasattr(self, "index") or not len(queries):
            return np.empty(0, np.int64), np.empty(0, np.int64)
        views = dihedral(queries)  # [8, m, D]
        for t, view in enumerate(views):
            hits = search(self.index, view, min(self.k, len(self.thumbs)))
            q = np.repeat(np.arange(len(queries)), hits.ids.shape[1])
            keep = (hits.ids.ravel() >= 0) & (hits.scores.ravel() >= self.threshold)
            found.append(np.stack([q[keep], hits.ids.ravel()[keep]], axis=1))
            # <T(image), query> = <image, T^-1(query)>: transform the queries, not all the images
            floor = np.maximum(self.kth[t], self.threshold)
            for s in range(0, len(queries), chunk):
                qi, ti = np.nonzero(views[INVERSE[t], s:s + chunk] @ self.thumbs.T >= floor[None, :])
                found.append(np.stack([qi + s, ti], axis=1))
        pairs = np.unique(np.concatenate(found).astype(np.int64), axis=0)
        return pairs[:, 0], pairs[:, 1]
