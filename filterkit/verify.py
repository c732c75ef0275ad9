"""Image-level check of candidate duplicate pairs: small greyscale thumbnails, normalised per
image, compared under crops and under the 8 flips and 90-degree rotations (the dihedral group).

A thumbnail is the image in greyscale, area-averaged to ``SIDE`` x ``SIDE`` (whatever its aspect
ratio; to ``WORK`` x ``WORK`` by PIL, then exactly, each cell the mean of the pixels it covers), minus its local mean (a 5x5 box: the large smooth areas that make unrelated skies and
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

Candidate pairs for rotated copies come from a search of small colour thumbnails
(``colour_thumbnail``) under the same 8 transforms (``DihedralSearch``).

A folder's views are kept compact (``ViewTable``: 3.3 kB per image, the windows recomputed from
a 48 x 48 greyscale image when read), so that the views of 10^6 images take 3.3 GB, not 84 GB
(the candidate pairs and searches need more besides: about 100 bytes per pair).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SIDE = 12  # thumbnail side (benchmarks/README.md compared 8, 12 and 16 on 32-px images)
SCALES = (0.95, 0.85, 0.75)  # window side fractions, as near_duplicate_variant crops 70-95 %
GRID = 4  # window positions per axis
WORK = 4 * SIDE  # windows are cut from the image reduced to WORK x WORK: cheap for any size
DRAFT = WORK  # JPEG draft decoding down to this size loses nothing the thumbnails keep
N_VIEWS = 1 + len(SCALES) ** 2 * GRID ** 2
# The rotation candidates search colour thumbnails this small (6 x 6 x RGB = 108 numbers): on
# 20,500 CIFAR-10 photos with 500 rotated copies they put 72-76 % of the copies among an image's
# 10 nearest under some flip/rotation, the 12 x 12 detail frames 41-42 % (benchmarks/README.md).
COLOUR = 6


def _local_mean_matrix(side: int, radius: int = 2) -> np.ndarray:
    """[side, side]: row i averages the 2 * radius + 1 pixels around i, edge pixels repeated past
    the border (np.pad's "edge"); L @ g @ L.T is g's (2r+1) x (2r+1) box mean, the box being separable."""
    m = np.zeros((side, side), dtype=np.float32)
    for i in range(side):
        for d in range(-radius, radius + 1):
            m[i, min(max(i + d, 0), side - 1)] += 1.0 / (2 * radius + 1)
    return m


_LOCAL = _local_mean_matrix(SIDE)
# the same on a flattened S*S thumbnail: vec(L g L^T) = (L kron L) vec(g), so one product subtracts it
_DETAIL = (np.eye(SIDE * SIDE, dtype=np.float32) - np.kron(_LOCAL, _LOCAL)).T


def _normalise(grey: np.ndarray) -> np.ndarray:
    """[..., S, S] -> [..., S*S]: minus the 5x5 local mean, zero mean, unit norm (zeros if flat)."""
    flat = np.asarray(grey, dtype=np.float32).reshape(*grey.shape[:-2], grey.shape[-2] * grey.shape[-1]) @ _DETAIL
    flat = flat - flat.mean(axis=-1, keepdims=True)
    norm = np.linalg.norm(flat, axis=-1, keepdims=True)
    return np.where(norm > 1e-3, flat / np.maximum(norm, 1e-3), 0.0).astype(np.float32)


def _area_weights(start: float, length: float, cells: int = SIDE, size: int = WORK) -> np.ndarray:
    """[cells, size]: cell c of [start, start + length] split into ``cells`` equal parts is the
    mean of the pixels it covers, each weighted by the fraction of it inside the cell."""
    edges = start + length * np.arange(cells + 1) / cells
    lo, hi = edges[:-1, None], edges[1:, None]
    pixel = np.arange(size)[None, :]
    overlap = np.clip(np.minimum(hi, pixel + 1) - np.maximum(lo, pixel), 0.0, None)
    return (overlap / (hi - lo)).astype(np.float32)


# per axis: the whole side, then every window extent (side fraction, position), fraction-major
_FRAME = _area_weights(0.0, float(WORK))
_EXTENTS = np.concatenate([_area_weights(float(x), f * WORK) for f in SCALES
                           for x in np.linspace(0, WORK - f * WORK, GRID)])  # [extents * SIDE, WORK]


def _small(image: Image.Image) -> Image.Image:
    """``image`` in RGB (``images.to_rgb``: transparency on white, 16-bit and float rescaled, as
    every loaded image), area-averaged to WORK x WORK: what both thumbnails are cut from."""
    from .images import to_rgb

    return to_rgb(image).resize((WORK, WORK), Image.Resampling.BOX)


def work_image(image: Image.Image) -> np.ndarray:
    """``image`` in greyscale, area-averaged to uint8 [WORK, WORK]: everything its views need."""
    return np.asarray(_small(image).convert("L"), dtype=np.uint8)


def _colour_of(small: Image.Image) -> np.ndarray:
    cells = np.asarray(small, dtype=np.float32).reshape(COLOUR, WORK // COLOUR, COLOUR, WORK // COLOUR, 3)
    flat = cells.mean(axis=(1, 3)).reshape(-1)
    flat = flat - flat.mean()
    norm = np.linalg.norm(flat)
    # Below 1 (0-255 scale) the image is flat but for noise, which unit norm would blow up.
    return (flat / norm if norm > 1.0 else np.zeros_like(flat)).astype(np.float32)


def colour_thumbnail(image: Image.Image) -> np.ndarray:
    """float32 [COLOUR * COLOUR * 3]: ``image`` area-averaged to COLOUR x COLOUR in RGB, minus its
    mean over all channels, unit norm (zeros if flat grey; a flat colour keeps its tint, so flat
    images of one hue are each other's candidates, which verification then rejects): what the rotation candidates search. Unlike the detail
    frames it keeps the coarse layout and colour, which a 70-95 % crop moves least."""
    return _colour_of(_small(image))


def window_thumbnails(work: np.ndarray) -> np.ndarray:
    """[..., WORK, WORK] greyscale -> [..., N_VIEWS, SIDE, SIDE], not normalised: the whole
    frame, then the windows of every pair of side fractions (x, y) at every lattice position
    (x, y), each the exact area average of its cells (two matrix products, not a resize per window)."""
    work = np.asarray(work, dtype=np.float32)
    lead, e = work.shape[:-2], len(SCALES) * GRID
    frame = _FRAME @ work @ _FRAME.T
    both = _EXTENTS @ work @ _EXTENTS.T  # [..., (fy, y, row), (fx, x, col)]
    windows = both.reshape(*lead, len(SCALES), GRID, SIDE, len(SCALES), GRID, SIDE)
    k = len(lead)
    windows = windows.transpose(*range(k), k + 3, k, k + 4, k + 1, k + 2, k + 5)  # [..., fx, fy, x, y, row, col]
    return np.concatenate([frame[..., None, :, :], windows.reshape(*lead, e * e, SIDE, SIDE)], axis=-3)


def image_views(image: Image.Image) -> np.ndarray:
    """The whole-frame thumbnail, then the window thumbnails: float32 [N_VIEWS, SIDE * SIDE]."""
    return _normalise(window_thumbnails(work_image(image)))


class ViewTable:
    """The views of N images, 3.3 kB each instead of the 84 kB of their float32 views: each
    image's ``work_image``, its normalised whole frame and its ``colour_thumbnail`` (``colour``);
    the windows are computed when read (``table[rows]`` -> [len(rows), N_VIEWS, D]),
    ``table[rows, 0]`` reads the frames alone. The views of 10^6 images take 3.3 GB, and
    ``pixel_scores`` computes each image's windows once per call."""

    def __init__(self, n: int) -> None:
        # zeros until set: flat images, whose views are zeros and match nothing (as an unreadable one)
        self.work = np.zeros((n, WORK, WORK), dtype=np.uint8)
        self.frames = np.zeros((n, SIDE * SIDE), dtype=np.float32)
        self.colour = np.zeros((n, COLOUR * COLOUR * 3), dtype=np.float32)  # colour_thumbnail

    def __len__(self) -> int:
        return len(self.work)

    def set(self, row: int, image: Image.Image) -> None:
        small = _small(image)
        self.work[row] = np.asarray(small.convert("L"), dtype=np.uint8)
        self.frames[row] = _normalise(_FRAME @ self.work[row].astype(np.float32) @ _FRAME.T)
        self.colour[row] = _colour_of(small)

    def __getitem__(self, key):
        if isinstance(key, tuple):  # (rows, 0): the whole frames, nothing computed
            rows, view = key
            if view != 0:
                raise IndexError("a ViewTable reads all views of rows, or their frames (view 0)")
            return self.frames[rows]
        return _normalise(window_thumbnails(self.work[key]))


# dihedral()'s transform t = rot90^k after a flip^f (t = 4f + k); the index of its inverse
INVERSE = (0, 3, 2, 1, 4, 5, 6, 7)


def transform(thumbs: np.ndarray, t: int) -> np.ndarray:
    """Transform ``t`` of ``dihedral`` applied to thumbnails [..., D] (greyscale SIDE x SIDE, or
    ``colour_thumbnail``'s COLOUR x COLOUR x RGB): a contiguous float32 copy."""
    side, channels = {SIDE * SIDE: (SIDE, 1), COLOUR * COLOUR * 3: (COLOUR, 3)}[thumbs.shape[-1]]
    square = thumbs.reshape(-1, side, side, channels)
    if t >= 4:
        square = square[:, :, ::-1]
    return np.ascontiguousarray(np.rot90(square, t % 4, axes=(1, 2)).reshape(thumbs.shape), dtype=np.float32)


def dihedral_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float32 [m]: the largest inner product of a[p] with b[p] under the 8 flips/rotations."""
    return np.einsum("tmd,md->tm", dihedral(a), np.asarray(b, dtype=np.float32)).max(axis=0)


def dihedral(thumbs: np.ndarray) -> np.ndarray:
    """The 8 flips/rotations of thumbnails: [..., D] -> [8, ..., D] (identity first)."""
    return np.stack([transform(thumbs, t) for t in range(8)])


def pixel_scores(views: np.ndarray, rows: np.ndarray, cols: np.ndarray, chunk: int = 512) -> np.ndarray:
    """For each pair (rows[p], cols[p]) of images with ``views`` [N, N_VIEWS, D], the largest
    correlation of one's whole frame with a window of the other (either way round) under any
    flip/rotation: float32 [P] in [-1, 1].

    Each pair is two directed comparisons (a's frame against b's windows, and the reverse),
    grouped by the image whose windows they read: one matrix product per image (its partners'
    transformed frames against its windows, in place), at most ``chunk`` partners at a time, not
    a copy of every partner's windows per pair."""
    rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    frame_of = np.concatenate([rows, cols])
    window_of = np.concatenate([cols, rows])
    directed = np.full(len(frame_of), -1.0, dtype=np.float32)
    order = np.argsort(window_of, kind="stable")
    bounds = np.flatnonzero(np.diff(window_of[order])) + 1
    for group in np.split(order, bounds) if len(order) else []:
        windows = views[window_of[group[0]]]  # [V, D]
        for s in range(0, len(group), chunk):
            part = group[s:s + chunk]
            # <frame, T(window)> = <T^-1(frame), window> (T permutes pixels) and T^-1 runs over the
            # same 8 transforms: transform the frames, not the V windows
            frames = dihedral(views[frame_of[part], 0])  # [8, m, D]
            directed[part] = (frames.reshape(-1, frames.shape[-1]) @ windows.T).reshape(8, len(part), -1).max(axis=(0, 2))
    return np.maximum(directed[:len(rows)], directed[len(rows):])


def dihedral_neighbours(thumbs: np.ndarray, k: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i < j) where j is among i's ``k`` nearest thumbnails under some flip/rotation, at correlation >= ``threshold`` (see ``DihedralSearch``)."""
    return DihedralSearch(thumbs, k, threshold).pairs


class DihedralSearch:
    """Thumbnail neighbours under the 8 flips/rotations (whole frames of ``transform``'s shapes;
    dedup searches ``colour_thumbnail``s): 8 FAISS searches (one per
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
        for t in range(8):  # one transform at a time: 8 copies of 10^6 thumbnails are 4.6 GB
            view = transform(self.thumbs, t)
            hits = search(other_index, view, min(k + own, len(other)))
            if hits.ids.shape[1] == k + own:  # a full list: a newcomer must beat its last entry
                self.kth[t] = hits.scores[:, -1]
            i = np.repeat(np.arange(n), hits.ids.shape[1])
            j, s = hits.ids.ravel().astype(np.int64), hits.scores.ravel()
            keep = (j >= 0) & (s >= threshold) & (cross | (j != i))
            found.append(np.stack([i[keep], j[keep]], axis=1) if cross else
                         np.stack([np.minimum(i[keep], j[keep]), np.maximum(i[keep], j[keep])], axis=1))
        if cross:  # and each image of the other set's nearest here
            for t in range(8):
                view = transform(other, t)
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
