"""Exact and near duplicates: identical bytes by content hash; near copies found as candidates
(embedding neighbours, and thumbnail neighbours under flips/rotations), verified image by image
(verify.py) and linked when their pair score reaches a threshold calibrated on the collection
itself; groups are the connected components of the links; each group keeps its best image.

``find_duplicates`` takes a folder (with an encoder) or an ``[N, D]`` array of unit vectors
(groups of row indices, as imagededup's ``encoding_map`` takes precomputed encodings; with no
images there is nothing to verify, so those links are cosine only). In a folder the keeper of
a group is the largest resolution, then the larger file, then the first path; among vectors it
is the first row.

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
from .pair_precision import calibrate


@dataclass(frozen=True)
class Duplicate:
    path: Path | int  # a file, or a row of the vectors given
    score: float  # to the kept image: the pair score (folders) or cosine (vectors); 1.0 for identical bytes
    exact: bool  # identical bytes


def _name(p: Path | int):
    return p if isinstance(p, int) else str(p)


@dataclass(frozen=True)
class Link:
    a: Path | int
    b: Path | int
    score: float  # the pair score (verified) or cosine (vectors only); 1.0 for identical bytes

    def to_dict(self) -> dict:
        return {"a": _name(self.a), "b": _name(self.b), "score": round(self.score, 6)}


@dataclass(frozen=True)
class DuplicateGroup:
    keep: Path | int
    duplicates: list[Duplicate]
    weakest: Link | None = None  # its lowest direct score: the keeper and its least similar duplicate

    def to_dict(self) -> dict:
        return {"keep": _name(self.keep),
                "duplicates": [{"path": _name(d.path), "score": round(d.score, 6), "exact": d.exact}
                               for d in self.duplicates],
                "weakest_link": self.weakest.to_dict() if self.weakest is not None else None}


def json_threshold(value: float) -> float | None:
    """A threshold for JSON: rounded, or None where it is not finite (strict parsers refuse Infinity)."""
    return round(float(value), 6) if np.isfinite(value) else None


@dataclass(frozen=True)
class CollectionCalibration:
    """The pair-score threshold and its estimates, measured on the collection being deduplicated.

    ``recall``: the share of synthetic copies (crop, resize, flip, colour, JPEG, 90-degree
    rotations) of ``images`` sampled images whose pair score with their image reaches the
    threshold, a copy that candidate generation would not propose counting as missed.
    ``links``: the candidate pairs scored at or above the threshold; ``false_links``: the
    look-alike pairs expected among them; ``precision`` = 1 - false_links / links (1.0 where
    none links). ``precision_bound``: a 75 % one-sided lower confidence bound of it, which the
    automatic threshold and ``--action move`` hold to the target. ``estimator``: how
    (``pair_precision``): from each image's look-alike tail, or on small collections from the
    real copies counted at an anchor.
    """

    threshold: float
    precision: float
    recall: float
    target_precision: float
    images: int
    links: int
    false_links: float
    pixel_floor: float
    source: str  # "calibrated" (auto) or "given"
    precision_bound: float = 0.0
    scope: str = "collection"  # "collection" (one folder) or "cross-set" (new images against a reference)
    estimator: str = "tails"  # pair_precision: "tails" or, on fewer than TAIL_MIN_IMAGES images, "anchor"

    def to_dict(self) -> dict:
        estimated = self.images >= MIN_CALIBRATION_IMAGES  # else too coarse to state (clause): null, as in the summary
        return {"threshold": json_threshold(self.threshold),
                "precision": round(self.precision, 4) if estimated else None,
                "precision_bound": round(self.precision_bound, 4) if estimated else None,
                "recall": round(self.recall, 4) if estimated else None, "target_precision": self.target_precision,
                "images": self.images, "links": self.links, "expected_false_links": round(self.false_links, 3),
                "estimator": self.estimator,
                "pixel_floor": round(self.pixel_floor, 6),
                "threshold_source": self.source, "scope": self.scope,
                "method": "pair score = mean of embedding cosine and dihedral thumbnail correlation less "
                          "the pair's background; positives: synthetic copies of sampled images of "
                          + ("this collection" if self.scope == "collection" else "either folder, each as one more "
                             "image of the other")
                          + ", missed where candidate generation would not propose them (recall); precision: "
                          + "1 - expected look-alike links / links among the "
                          + ("collection's candidate pairs" if self.scope == "collection" else
                             "candidate pairs between the new images and the reference")
                          + (", the look-alikes extrapolated from each image's 2nd to 11th best pair scores "
                             "(an exponential tail)" if self.estimator == "tails" else
                             ", the real copies counted at the anchor (the score 75 % or 50 % of the synthetic "
                             "copies reach, the smaller estimate), every link above it taken for one")}

    def clause(self, how: str, sampled: str = "of its images") -> str:
        """The summary's account of the threshold: how it was set and what it is estimated at."""
        if self.images < MIN_CALIBRATION_IMAGES:
            return (f"{how}; precision and recall not estimated: {self.images} sampled images, "
                    f"{MIN_CALIBRATION_IMAGES} needed")
        text = (f"{how}; estimated pair precision {self.precision:.3f}, at least {self.precision_bound:.3f} at 75 % "
                f"confidence unless look-alikes score like copies; recall {self.recall:.3f}; from synthetic copies "
                f"of {self.images} {sampled}")
        if self.source == "calibrated" and self.links == 0 and self.recall < 0.5:
            # the target was out of reach: linking nothing is safe, but say what it costs (a
            # folder without copies links nothing too, with most synthetic copies above the cut)
            text += (f"; no threshold that links a pair has its 75 % bound at the target {self.target_precision:g}, "
                     f"so nothing links: a lower --target-precision links copies at a lower stated precision")
        return text


@dataclass
class DedupResult:
    """Duplicate groups (sorted by keeper), the threshold used, and the inputs skipped.

    ``verified``: links were checked image by image and ``threshold`` is a pair score (with
    ``calibration`` stating its estimated precision and recall on this collection); otherwise
    it is a cosine between vectors and ``threshold_note`` says where it came from.
    """

    groups: list[DuplicateGroup]
    threshold: float
    skipped: list[Skip] = field(default_factory=list)
    verified: bool = False
    calibration: CollectionCalibration | None = None
    threshold_note: str = "given"

    @property
    def estimated(self) -> bool:
        """Whether precision and recall were estimated (on enough sampled images)."""
        return self.calibration is not None and self.calibration.images >= MIN_CALIBRATION_IMAGES

    @property
    def n_duplicates(self) -> int:
        return sum(len(g.duplicates) for g in self.groups)

    @property
    def only_exact(self) -> bool:
        """Every duplicate has its keeper's bytes (safe to move without an estimate)."""
        return all(d.exact for g in self.groups for d in g.duplicates)

    def summary_line(self) -> str:
        head = f"{len(self.groups)} group(s), {self.n_duplicates} duplicate(s)"
        c = self.calibration
        if self.verified and c is not None:
            how = "calibrated on this collection" if c.source == "calibrated" else "given"
            return f"{head} verified at pair score >= {self.threshold:.4f} ({c.clause(how)})"
        if self.verified:
            return f"{head}: identical bytes only (fewer than 2 distinct images to compare)"
        return f"{head} at cosine >= {self.threshold:.4f} (cosine only, not verified; threshold {self.threshold_note})"

    def to_dict(self) -> dict:
        return {"groups": [g.to_dict() for g in self.groups], "threshold": json_threshold(self.threshold),
                "verified": self.verified, "threshold_note": self.threshold_note,
                "estimated_precision": round(self.calibration.precision, 4) if self.estimated else None,
                "precision_bound": round(self.calibration.precision_bound, 4) if self.estimated else None,
                "estimated_recall": round(self.calibration.recall, 4) if self.estimated else None,
                "calibration": None if self.calibration is None else self.calibration.to_dict(),
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


# Fewer sampled images than this give estimates too coarse to state or to move files on (the
# same minimum as calibrate_dedup's).
MIN_CALIBRATION_IMAGES = 10
# Estimated pair precision the automatic threshold aims for: groups to look at get the most
# recall the calibration can state (on CIFAR-10 it held within 0.05 at 0.90, benchmarks/README.md);
# files are moved only on links estimated at 0.99.
LIST_TARGET_PRECISION = 0.90
MOVE_TARGET_PRECISION = 0.99
CALIBRATION_SIDE = 512  # longest side of the sampled images the synthetic copies are made from


def _check_threshold(threshold: float) -> float:
    if not -1.0 <= threshold <= 1.0:
        raise FilterkitError(f"a cosine threshold lies in [-1, 1], got {threshold}")
    return float(threshold)


def _check_pair_score(threshold: float) -> float:
    # (cosine + pixel score - background) / 2 with each term in [-1, 1]
    if not -1.5 <= threshold <= 1.5:
        raise FilterkitError(f"a pair-score threshold lies in [-1.5, 1.5] ((cosine + thumbnail correlation - the "
                             f"pair's background) / 2), got {threshold}")
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
    norms = np.linalg.norm(vectors, axis=1)
    if len(vectors) and not np.allclose(norms, 1.0, atol=1e-3):  # inner products are cosines only then
        worst = int(np.argmax(np.abs(norms - 1.0)))
        raise FilterkitError(f"find_duplicates(vectors) needs unit rows (L2-normalised, as Encoder.embed returns "
                             f"them): row {worst} has norm {norms[worst]:.4g}")
    _check_threshold(threshold)
    rows, cols, sims = range_pairs(vectors, threshold) if len(vectors) else (np.empty(0), np.empty(0), np.empty(0))
    groups = []
    for members, _ in _spanning_groups(len(vectors), rows.astype(np.int64), cols.astype(np.int64),
                                       np.asarray(sims, dtype=np.float64)):  # members are in row order
        for keep, taken in star_groups(members, lambda k, rest: vectors[rest] @ vectors[k], threshold):
            low, low_score = min(taken, key=lambda t: t[1])
            groups.append(DuplicateGroup(int(keep), [Duplicate(int(i), sc, False) for i, sc in taken],
                                         Link(int(keep), int(low), low_score)))
    return sorted(groups, key=lambda g: g.keep)


def model_threshold(encoder) -> float:
    """The dedup threshold calibrated into the encoder's model directory."""
    threshold = (encoder.meta.get("thresholds") or {}).get("dedup")
    if threshold is None:
        raise FilterkitError("this model has no calibrated dedup threshold: pass --threshold "
                             "(cosine, e.g. 0.95) or calibrate the model first")
    return float(threshold)


ROTATIONS = (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)
NEIGHBOURS = 10  # candidates per image and per source (embedding, thumbnails): bounded work
SAMPLE = 200  # images whose synthetic copies calibrate the threshold
FLOOR_QUANTILE = 0.02  # thumbnail candidates' floor: what 98 % of the synthetic copies reach
BACKGROUND = 10  # an image's background: the mean of its BACKGROUND best other pixel scores


def pair_score(cosine: np.ndarray, pixel: np.ndarray, background: np.ndarray | float = 0.0) -> np.ndarray:
    """The fused score of a pair: the mean of its embedding cosine and its thumbnail
    correlation (verify.pixel_scores) less the pair's background (``backgrounds``). A plain
    mean: on planted copies of 32-px images it beat a logistic fit (benchmarks/README.md)."""
    return (np.asarray(cosine, dtype=np.float64) + np.asarray(pixel, dtype=np.float64)
            - np.asarray(background, dtype=np.float64)) / 2


def backgrounds(n: int, rows: np.ndarray, cols: np.ndarray, pixel: np.ndarray, k: int = BACKGROUND) -> np.ndarray:
    """[n]: each image's background, the mean of its 2nd to (k+1)-th largest pixel scores over
    its candidate pairs (0 with fewer than two). The best is left out because it may be a copy;
    the same rule for every pair, and for a synthetic copy through its image, keeps the
    calibration's positives scored like the collection's pairs.

    A low-texture image (a small object on a plain sky) correlates highly with many unrelated
    ones; a copy stands out from that level, a look-alike does not. Subtracting it is the
    contextual dissimilarity of Jegou, Harzallah and Schmid 2007 ("A contextual dissimilarity
    measure for accurate and efficient image search"; CSLS in Conneau et al. 2018)."""
    ends = np.concatenate([rows, cols]).astype(np.int64)
    values = np.concatenate([pixel, pixel]).astype(np.float64)
    order = np.lexsort((-values, ends))  # by image, then score descending
    ends, values = ends[order], values[order]
    rank = np.arange(len(ends)) - np.searchsorted(ends, ends)  # 0 for an image's best
    keep = (rank >= 1) & (rank <= k)
    total = np.bincount(ends[keep], weights=values[keep], minlength=n)
    count = np.bincount(ends[keep], minlength=n)
    return total / np.maximum(count, 1)


def synthetic_copy(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """near_duplicate_variant, then a 90, 180 or 270-degree rotation one time in four."""
    out = near_duplicate_variant(image, rng)
    if rng.random() < 0.25:
        out = out.transpose(ROTATIONS[int(rng.integers(3))])
    return out


class _Views:
    """Thumbnail views (verify.image_views) of a folder's images, decoded once each, on demand,
    kept in one ``verify.ViewTable`` indexed by row: 3.3 kB per image (its 48 x 48 greyscale
    image, whole frame and colour thumbnail; the windows are computed when read), read by the pair
    scores in place.
    A float32 table of every view was 84 kB per image: 10^6 images would have needed 84 GB."""

    def __init__(self, paths: list[Path], progress: bool = False) -> None:
        from . import verify

        self.paths, self.progress = paths, progress
        try:
            self.table = verify.ViewTable(len(paths))
        except MemoryError:
            gb = len(paths) * (verify.WORK ** 2 + 4 * verify.SIDE ** 2 + 12 * verify.COLOUR ** 2) / 1e9
            raise FilterkitError(f"verifying {len(paths)} images needs {gb:.1f} GB of memory "
                                 "for their thumbnails; deduplicate the folder in parts") from None
        self.done = np.zeros(len(paths), dtype=bool)

    def ensure(self, indices) -> None:
        """Decode the rows of ``indices`` not decoded yet."""
        from . import verify
        from .errors import ImageError
        from .images import load_image
        from .progress import progress_bar

        todo = np.unique(np.asarray(indices, dtype=np.int64))
        todo = todo[~self.done[todo]]
        with progress_bar("verify: thumbnails and crops", len(todo), self.progress and len(todo) > 50) as advance:
            for i in todo:
                try:
                    self.table.set(i, load_image(self.paths[i], draft_size=verify.DRAFT))
                except ImageError:  # gone or changed since it was embedded: zeros verify nothing
                    pass
                self.done[i] = True
                advance()

    def get(self, indices) -> np.ndarray:
        """float32 [len(indices), N_VIEWS, D]: the rows' views (decoded first if needed)."""
        indices = np.asarray(indices, dtype=np.int64)
        self.ensure(indices)
        return self.table[indices]


def star_groups(members: list, direct, threshold: float) -> list[tuple]:
    """Split a linked component (``members`` in keeper order) into groups in which every
    duplicate scores >= ``threshold`` against its keeper directly: links chain (A~B, B~C with
    A and C unlike), and a group must not merge photos that are not copies of its keeper. The
    best remaining image keeps every remaining one it scores >= threshold with, then the rest
    start over. ``direct(keep, others) -> scores``. Returns (keep, [(member, score), ...])."""
    out, remaining = [], list(members)
    while len(remaining) >= 2:
        keep, rest = remaining[0], remaining[1:]
        scores = [float(x) for x in direct(keep, rest)]
        taken = [(m, sc) for m, sc in zip(rest, scores) if sc >= threshold]
        if taken:
            out.append((keep, taken))
        remaining = [m for m, sc in zip(rest, scores) if sc < threshold]
    return out


def _spanning_groups(n: int, rows: np.ndarray, cols: np.ndarray, scores: np.ndarray):
    """Union-find over links taken strongest first (Kruskal): (members, weakest merging link)
    per component of size >= 2; the weakest link of a maximum spanning tree is the group's
    bottleneck: below its score the group would split."""
    uf = _UnionFind(n)
    weakest: dict[int, tuple[float, int, int]] = {}
    for k in np.argsort(-scores, kind="stable"):
        a, b = int(rows[k]), int(cols[k])
        ra, rb = uf.find(a), uf.find(b)
        if ra == rb:
            continue
        merged = [w for w in (weakest.pop(ra, None), weakest.pop(rb, None)) if w is not None]
        uf.union(a, b)
        weakest[uf.find(a)] = min(merged + [(float(scores[k]), a, b)])
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(uf.find(i), []).append(i)
    return [(members, weakest[root]) for root, members in groups.items() if len(members) > 1]


def check_options(threshold: float | str, target_precision: float) -> float | str:
    """The threshold ("auto" or a checked pair score), refusing a target precision outside (0, 1]."""
    if not 0 < target_precision <= 1:
        raise FilterkitError(f"the target precision lies in (0, 1], got {target_precision}")
    return threshold if threshold == "auto" else _check_pair_score(float(threshold))


def canonical_rows(hashes: list[str]) -> np.ndarray:
    """int64 [N]: for each row, the first row with the same bytes (itself if none before)."""
    first_of_hash: dict[str, int] = {}
    return np.array([first_of_hash.setdefault(h, i) for i, h in enumerate(hashes)], dtype=np.int64)


def verified_groups(paths: list[Path], hashes: list[str], vectors: np.ndarray, encoder,
                    threshold: float | str = "auto", target_precision: float = LIST_TARGET_PRECISION,
                    rotations: bool = True,
                    index=None, seed: int = 0, sample: int = SAMPLE,
                    progress: bool = False) -> tuple[list[DuplicateGroup], CollectionCalibration | None]:
    """Groups of exact and verified near duplicates, and the calibration that set (or, for a
    given ``threshold``, estimated) the pair-score threshold on this collection.

    Candidates: each image's ``NEIGHBOURS`` nearest by cosine and, with ``rotations``, by
    colour thumbnail under the 8 flips/rotations (this decodes every image, once: the
    thumbnails are kept with the views verification reads; without it only the candidates' images are
    read). Each candidate pair gets a pair score
    (``pair_score``: cosine and pixel score less the mean ``backgrounds`` of its two images);
    links are the pairs at or above the threshold, plus identical bytes.
    """
    if len(paths) != len(vectors) or len(paths) != len(hashes):
        raise FilterkitError("paths, hashes and vectors must have the same length")
    threshold = check_options(threshold, target_precision)
    n = len(paths)
    canonical = canonical_rows(hashes)
    unique = np.flatnonzero(canonical == np.arange(n))  # verification runs on distinct contents
    views = _Views(paths, progress)
    calibration = background = None
    rows = cols = np.empty(0, dtype=np.int64)
    scores = np.empty(0)
    if len(unique) >= 2:
        # each pair is a link of both its images: links per image = pairs / (n / 2)
        scored = score_pairs(paths, vectors, encoder, views, unique,
                             lambda floor: _candidate_pairs(views, vectors, unique, index, rotations, floor),
                             threshold, target_precision, len(unique) / 2, rotations, seed, sample)
        rows, cols, scores, background, calibration = scored
        threshold = calibration.threshold
    elif threshold == "auto":
        threshold = 1.0  # nothing to calibrate on: only identical bytes link
    linked = scores >= threshold
    dup_rows = np.flatnonzero(canonical != np.arange(n))
    links = (np.concatenate([rows[linked], canonical[dup_rows]]), np.concatenate([cols[linked], dup_rows]),
             np.concatenate([scores[linked], np.ones(len(dup_rows))]))
    return _linked_groups(paths, hashes, vectors, links, views, background, canonical, float(threshold)), calibration


def score_pairs(paths: list[Path], vectors: np.ndarray, encoder, views: _Views, pool: np.ndarray, candidates,
                threshold: float | str, target_precision: float, n_images: float, rotations: bool, seed: int = 0,
                sample: int = SAMPLE, scope: str = "collection", copy_background=None):
    """The verified-dedup core that folder and cross-set dedup share: synthetic copies of up to
    ``sample`` images of ``pool`` (rows), the candidate pairs ``candidates(pixel_floor) ->
    (rows, cols, proposer)`` (a ``_Proposer`` over rows), every pair scored (``pair_score``:
    cosine and pixel score less the pair's ``backgrounds``), and the threshold chosen (or, when
    ``threshold`` is a number, estimated) on them: synthetic copies as positives, missed where
    the proposer would not propose them (the recall); the candidate pairs for the precision
    (``pair_precision.calibrate``; links counted per ``n_images`` by its anchor estimate). A synthetic copy is scored with its image's background for both ends, or with
    ``copy_background(proposer, sampled, copy_vectors, copy_views, copy_colour) -> [m]`` for its own end where a copy's
    candidates differ from its image's (cross-set: the copy's are reference images, its image's
    new ones). Returns (rows, cols, scores, background [len(paths)], CollectionCalibration)."""
    rng = np.random.default_rng(seed)
    sampled, copy_vectors, both, copy_colour, pixel_floor = _synthetic_positives(paths, vectors, encoder, pool, views,
                                                                                 rng, sample)
    rows, cols, proposer = candidates(pixel_floor)
    cos = pair_cosines(vectors, rows, cols)
    views.ensure(np.concatenate([rows, cols]))
    pix = _verify().pixel_scores(views.table, rows, cols)
    background = backgrounds(len(paths), rows, cols, pix)
    scores = pair_score(cos, pix, (background[rows] + background[cols]) / 2)
    m = len(sampled)
    pos_cos = np.einsum("nd,nd->n", vectors[sampled], copy_vectors)
    pos_pix = _verify().pixel_scores(both, np.arange(m), np.arange(m, 2 * m))
    # a synthetic copy is not in the collection: its image's background stands for both ends,
    # and a copy that candidate generation would not propose is one dedup misses
    found = proposer.proposes_rows(sampled, copy_vectors, copy_colour if rotations else None)
    level = background[sampled]
    if copy_background is not None:
        level = (level + copy_background(proposer, sampled, copy_vectors, both[m:], copy_colour)) / 2
    positive = np.where(found, pair_score(pos_cos, pos_pix, level), -np.inf)
    # the precision is measured over all candidate pairs (every one has its score already),
    # not only over the sampled images: far less noise at the same cost
    source = "calibrated" if threshold == "auto" else "given"
    est = calibrate(positive, len(paths), rows, cols, scores, n_images, len(pool), target_precision,
                    None if threshold == "auto" else float(threshold), seed)
    calibration = CollectionCalibration(est.threshold, est.precision, est.recall, float(target_precision), len(sampled),
                                        est.links, est.false_links, pixel_floor, source, est.precision_bound, scope,
                                        est.estimator)
    return rows, cols, scores, background, calibration


def pair_cosines(vectors: np.ndarray, rows: np.ndarray, cols: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """float32 [P]: the cosine of each pair of unit rows, ``chunk`` pairs at a time (gathering
    every pair's two vectors at once took 1.9 GB at 20,000 images, 94 GB at 10^6)."""
    out = np.empty(len(rows), dtype=np.float32)
    for s in range(0, len(rows), chunk):
        out[s:s + chunk] = np.einsum("nd,nd->n", vectors[rows[s:s + chunk]], vectors[cols[s:s + chunk]])
    return out


def _verify():
    from . import verify

    return verify


class _Proposer:
    """Candidate generation (``_candidate_pairs``), kept to ask whether it would have proposed
    a synthetic copy with its image: a copy it would miss is a copy dedup cannot find, so the
    calibration's recall counts it as missed rather than scoring it as if it were a candidate."""

    def __init__(self, index, sub: np.ndarray, kth: np.ndarray, frames=None, rows: np.ndarray | None = None) -> None:
        self.index, self.sub, self.kth, self.frames = index, sub, kth, frames
        self.rows = np.arange(len(sub)) if rows is None else np.asarray(rows)  # sorted: the collection row of each

    def would_pair(self, vectors: np.ndarray, frames: np.ndarray | None,
                   chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """(newcomer, collection row) of every pair candidate generation would have made with
        newcomers of embeddings ``vectors`` (and colour thumbnails ``frames``): each one's
        NEIGHBOURS nearest, and every image whose list it would enter."""
        from .index import search

        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        hits = search(self.index, vectors, min(NEIGHBOURS, len(self.sub)))
        q = np.repeat(np.arange(len(vectors)), hits.ids.shape[1])
        keep = hits.ids.ravel() >= 0
        found = [np.stack([q[keep], hits.ids.ravel()[keep]], axis=1)]
        for s in range(0, len(vectors), chunk):
            qi, ti = np.nonzero(vectors[s:s + chunk] @ self.sub.T >= self.kth[None, :])
            found.append(np.stack([qi + s, ti], axis=1))
        if self.frames is not None and frames is not None:
            found.append(np.stack(self.frames.would_pair(frames), axis=1))
        pairs = np.unique(np.concatenate(found).astype(np.int64), axis=0)
        return pairs[:, 0], self.rows[pairs[:, 1]]

    def proposes_rows(self, rows: np.ndarray, vectors: np.ndarray, frames: np.ndarray | None) -> np.ndarray:
        """``proposes`` for targets named by their rows of the collection."""
        return self.proposes(np.searchsorted(self.rows, rows), vectors, frames)

    def proposes(self, targets: np.ndarray, vectors: np.ndarray, frames: np.ndarray | None) -> np.ndarray:
        """bool [m]: whether row ``targets[p]`` (a position among the distinct images) would be
        paired with a newcomer of embedding ``vectors[p]`` and colour thumbnail ``frames[p]``."""
        from .index import search

        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        cos = np.einsum("md,md->m", self.sub[targets], vectors)
        hits = search(self.index, vectors, min(NEIGHBOURS, len(self.sub)))
        found = (cos >= self.kth[targets]) | (hits.ids == targets[:, None]).any(axis=1)
        if self.frames is not None and frames is not None:
            found |= self.frames.proposes(targets, frames)
        return found


def _synthetic_positives(paths, vectors, encoder, unique, views, rng, sample):
    """Sampled rows, the embedding, thumbnail views and colour thumbnail of one synthetic copy of each, and the
    colour-thumbnail correlation (under the best flip/rotation) most copies reach: the floor of
    the rotation candidates."""
    from .errors import ImageError
    from .images import load_image

    verify = _verify()
    sampled = np.sort(rng.choice(unique, min(sample, len(unique)), replace=False))
    originals, kept = [], []
    for i in sampled:
        try:
            # Bounded: 200 camera photos at full size would hold gigabytes; the encoder and the
            # thumbnails see far less than CALIBRATION_SIDE pixels anyway.
            image = load_image(paths[i], draft_size=CALIBRATION_SIDE)
            image.thumbnail((CALIBRATION_SIDE, CALIBRATION_SIDE))
            originals.append(image)
            kept.append(int(i))
        except ImageError:  # unreadable now: not sampled
            pass
    if not kept:
        raise FilterkitError("no image of the collection could be decoded to calibrate dedup")
    sampled = np.array(kept, dtype=np.int64)
    copies = [synthetic_copy(im, rng) for im in originals]
    copy_vectors = encoder.embed(copies)
    copy_views = np.stack([verify.image_views(im) for im in copies])
    copy_colour = np.stack([verify.colour_thumbnail(im) for im in copies])
    both = np.concatenate([views.get(sampled), copy_views])
    floor = np.quantile(verify.dihedral_correlation(copy_colour, search_thumbnails(views, sampled)), FLOOR_QUANTILE)
    return sampled, copy_vectors, both, copy_colour, float(floor)


def search_thumbnails(views: _Views, rows: np.ndarray) -> np.ndarray:
    """float32 [len(rows), COLOUR * COLOUR * 3]: the rows' ``verify.colour_thumbnail`` (decoded
    first if needed), what the rotation candidates search: from the same single decode of each
    image as its pair scores; an unreadable image gets zeros (matches nothing)."""
    rows = np.asarray(rows, dtype=np.int64)
    views.ensure(rows)
    return views.table.colour[rows]


def _candidate_pairs(views: _Views, vectors, unique, index, rotations: bool,
                     pixel_floor: float) -> tuple[np.ndarray, np.ndarray, _Proposer]:
    """(rows, cols), rows < cols: each distinct image's NEIGHBOURS nearest by cosine, and with
    ``rotations`` by colour thumbnail under the 8 flips/rotations (at >= ``pixel_floor``);
    and the ``_Proposer`` that asks the same of a newcomer."""
    from .index import build_index, search

    verify = _verify()
    sub = np.ascontiguousarray(vectors[unique], dtype=np.float32)
    idx = index if index is not None and len(unique) == len(views.paths) else build_index(sub)
    hits = search(idx, sub, min(NEIGHBOURS + 1, len(unique)))
    # a full list (NEIGHBOURS others beside the image itself): a newcomer must beat its last entry
    kth = hits.scores[:, -1] if hits.ids.shape[1] == NEIGHBOURS + 1 else np.full(len(unique), -np.inf)
    i = np.repeat(np.arange(len(unique)), hits.ids.shape[1])
    j = hits.ids.ravel().astype(np.int64)
    keep = (j >= 0) & (j != i)  # no cosine floor: every image gets its NEIGHBOURS, its background
    pairs = [np.stack([np.minimum(i[keep], j[keep]), np.maximum(i[keep], j[keep])], axis=1)]
    frames = None
    if rotations:
        frames = verify.DihedralSearch(search_thumbnails(views, unique), NEIGHBOURS, pixel_floor)
        pairs.append(np.stack(frames.pairs, axis=1))
    pairs = np.unique(np.concatenate(pairs), axis=0) if sum(len(p) for p in pairs) else np.empty((0, 2), np.int64)
    return unique[pairs[:, 0]], unique[pairs[:, 1]], _Proposer(idx, sub, kth, frames, unique)


def _linked_groups(paths, hashes, vectors, links, views, background, canonical,
                   threshold: float) -> list[DuplicateGroup]:
    """Groups over ``links`` (rows, cols, scores), split so that every duplicate scores >=
    ``threshold`` against its keeper directly (``star_groups``), sorted by keeper; each group
    states its weakest direct link."""
    verify = _verify()

    def direct(keep: int, others: list[int]) -> list[float]:
        out = {i: np.inf for i in others if hashes[i] == hashes[keep]}  # identical bytes always group
        near = [i for i in others if i not in out]
        if near:
            views.ensure([keep] + near)  # scored in place: each image's windows computed once a call
            pix = verify.pixel_scores(views.table, np.full(len(near), keep, dtype=np.int64), np.asarray(near))
            cos = vectors[near] @ vectors[keep]
            # backgrounds belong to distinct contents: an exact copy uses its first row's
            level = 0.0 if background is None else (background[canonical[keep]] + background[canonical[near]]) / 2
            out.update(zip(near, pair_score(cos, pix, level).tolist()))
        return [out[i] for i in others]

    groups = []
    for members, _ in _spanning_groups(len(paths), *links):
        order = keeper_order([paths[i] for i in members])
        for keep, taken in star_groups([members[k] for k in order], direct, threshold):
            taken = [(i, min(sc, 1.0)) for i, sc in taken]  # identical bytes are stated as 1.0
            low, low_score = min(taken, key=lambda t: t[1])
            dups = [Duplicate(paths[i], float(sc), hashes[i] == hashes[keep]) for i, sc in taken]
            groups.append(DuplicateGroup(paths[keep], dups, Link(paths[keep], paths[low], float(low_score))))
    return sorted(groups, key=lambda g: str(g.keep))


def check_move(result, target_precision: float = MOVE_TARGET_PRECISION) -> None:
    """Refuse to move files on links whose estimated precision is below the target, or could
    not be estimated; identical bytes are always safe to move. ``result``: a ``DedupResult``
    or a cross-set result (``only_exact``, ``verified``, ``calibration``)."""
    if result.only_exact:
        return
    c = result.calibration
    if not result.verified or c is None:
        raise FilterkitError("--action move needs verified links with an estimated precision; this result has "
                             "cosine-only links")
    if c.images < MIN_CALIBRATION_IMAGES:
        raise FilterkitError(f"--action move refused: {c.images} images are too few to estimate the precision of "
                             f"near-duplicate links ({MIN_CALIBRATION_IMAGES} needed); look at the groups with "
                             "--action report and move them yourself")
    if c.precision_bound < target_precision:
        raise FilterkitError(
            f"--action move refused: the estimated pair precision {c.precision:.3f} (75 % lower bound "
            f"{c.precision_bound:.3f}) at pair score >= {c.threshold:.4f} is below the target "
            f"{target_precision:.3f} (estimated recall {c.recall:.3f}); "
            "look at the groups with --action report, raise --threshold or lower --target-precision")


def find_duplicates(source: str | os.PathLike | np.ndarray, encoder=None, threshold: float | str | None = "auto",
                    cache=None, batch_size: int = 64, workers: int | None = None, progress: bool = False,
                    follow_symlinks: bool = False, target_precision: float = LIST_TARGET_PRECISION,
                    rotations: bool = True,
                    seed: int = 0) -> DedupResult:
    """Group the duplicates of a folder (embedded through the cache by ``encoder``, each
    candidate pair verified on its images) or of the rows of an ``[N, D]`` array of unit
    vectors (cosine only: there are no images to verify).

    Folder: ``threshold="auto"`` (or None) calibrates the pair-score threshold on the folder
    itself at ``target_precision`` (LIST_TARGET_PRECISION; pass MOVE_TARGET_PRECISION before
    ``check_move``); a number is a pair score, whose precision and recall are
    estimated the same way. Vectors: a cosine; "auto" reads the threshold the encoder's model
    directory was calibrated with (on other images: the result says so). ``cache``: an open
    ``EmbeddingCache`` (None: the default cache).
    """
    if threshold is None:
        threshold = "auto"
    if isinstance(source, np.ndarray):
        note = "given"
        if threshold == "auto":
            if encoder is None:
                raise FilterkitError("threshold='auto' on vectors reads the encoder's calibrated threshold: pass "
                                     "encoder= or a cosine threshold")
            threshold = model_threshold(encoder)
            note = "from the model directory, calibrated on other images"
        threshold = _check_threshold(float(threshold))
        return DedupResult(vector_groups(source, threshold), threshold, threshold_note=note)
    if encoder is None:
        raise FilterkitError("find_duplicates(folder) needs encoder= to embed the folder")
    from .index import cached_index, content_key
    from .pipeline import cache_or_default, embed_folder

    with cache_or_default(cache) as store:  # the default cache keeps the folder's index too
        found = embed_folder(source, encoder, store, batch_size, workers, progress, follow_symlinks=follow_symlinks)
        index = None
        if len(found.vectors):
            index = cached_index(found.vectors, content_key(encoder.model_id, found.hashes), store.index_dir)
    groups, calibration = verified_groups(found.paths, found.hashes, found.vectors, encoder, threshold,
                                          target_precision, rotations, index, seed, progress=progress)
    used = calibration.threshold if calibration is not None else (1.0 if threshold == "auto" else float(threshold))
    return DedupResult(groups, used, found.skipped, verified=True, calibration=calibration,
                       threshold_note=("identical bytes only" if calibration is None else
                                       "calibrated on this collection" if threshold == "auto" else "given"))


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
        raise FilterkitError(f"no threshold reaches the target precision {target_precision:g} on these images "
                             f"({int(positive.sum())} near-duplicate pairs among {len(sims)} scored): the closest "
                             "distinct images score like the copies; give more images, and varied ones (a few "
                             "hundred calibrate the shipped model), or a lower --target-precision")
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
                        max_images: int = 300, seed: int = 0, precision: str = "auto") -> DedupCalibration:
    """Calibrate the dedup threshold of a model directory on a random sample of the real
    images under ``images`` (which it was not trained on) and store it in its config.json."""
    from .encoder import Encoder
    from .images import discover_images
    from .modeldir import update_model_config

    encoder = Encoder.load(model_dir, precision=precision)
    paths = discover_images(images)
    order = np.random.default_rng(seed).permutation(len(paths))[:max_images] if paths else []
    result = calibrate_dedup(encoder, [paths[i] for i in order], target_precision, max_images, seed)
    thresholds = dict(encoder.meta.get("thresholds") or {}, dedup=result.threshold,
                      dedup_calibration=result.to_dict())
    update_model_config(model_dir, thresholds=thresholds)
    return result
