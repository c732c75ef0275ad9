"""Cross-set duplicates: which images of a new folder duplicate an image of a reference folder
(train/test leakage, re-uploads, a blocklist).

The same verified machinery as folder dedup (dedup.score_pairs): candidate pairs from the
embedding and from thumbnails under the 8 flips/rotations, each verified on its two images,
scored, and linked at a pair-score threshold calibrated at run time, with synthetic copies of
images of both folders as positives (each as one more image of the other folder, its own
background measured there) and the candidate pairs as negatives. Only pairs with
one image in each folder are candidates: each new image's nearest reference images and each
reference image's nearest new images. Pairs inside one folder are neither candidates nor links.

    >>> result = find_cross_duplicates("./batch", "./train", encoder=Encoder.load())
    >>> [(d.path, d.duplicate_of, d.score) for d in result.duplicates]

Both folders are embedded through the embedding cache, so a reference checked before is not
embedded again (its images are still read once more for their thumbnails).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .dedup import (
    LIST_TARGET_PRECISION,
    NEIGHBOURS,
    SAMPLE,
    CollectionCalibration,
    _Proposer,
    _Views,
    canonical_rows,
    check_options,
    json_threshold,
    score_pairs,
    search_thumbnails,
)
from .errors import FilterkitError
from .images import Skip


@dataclass(frozen=True)
class CrossDuplicate:
    path: Path  # the file of the new folder
    duplicate_of: Path  # the reference file it duplicates (its best-scoring one)
    score: float  # their pair score; 1.0 for identical bytes
    exact: bool  # identical bytes

    def to_dict(self) -> dict:
        return {"path": str(self.path), "duplicate_of": str(self.duplicate_of), "score": round(self.score, 6),
                "exact": self.exact}


@dataclass
class CrossDedupResult:
    """The new images that duplicate a reference image (sorted by path), the threshold used and
    its calibration (None when there was nothing to compare: identical bytes only)."""

    duplicates: list[CrossDuplicate]
    threshold: float
    calibration: CollectionCalibration | None
    n_new: int
    n_reference: int
    embedded: dict  # {"new": n, "reference": n}: distinct contents embedded by this run
    skipped: list[Skip] = field(default_factory=list)  # of either folder
    verified: bool = True  # the links were checked image by image (check_move asks)

    @property
    def only_exact(self) -> bool:
        return all(d.exact for d in self.duplicates)

    @property
    def estimated(self) -> bool:
        from .dedup import MIN_CALIBRATION_IMAGES

        return self.calibration is not None and self.calibration.images >= MIN_CALIBRATION_IMAGES

    def summary_line(self) -> str:
        head = f"{len(self.duplicates)} of {self.n_new} new image(s) duplicate a reference image"
        c = self.calibration
        if c is None:
            return f"{head}: identical bytes only (no distinct images to compare)"
        how = "calibrated on these two folders" if c.source == "calibrated" else "given"
        return f"{head}, verified at pair score >= {self.threshold:.4f} ({c.clause(how, 'images of the two folders')})"

    def to_dict(self) -> dict:
        c = self.calibration
        return {"duplicates": [d.to_dict() for d in self.duplicates], "threshold": json_threshold(self.threshold),
                "new_images": self.n_new, "reference_images": self.n_reference, "embedded": self.embedded,
                "verified": self.verified,
                "estimated_precision": round(c.precision, 4) if self.estimated else None,
                "precision_bound": round(c.precision_bound, 4) if self.estimated else None,
                "estimated_recall": round(c.recall, 4) if self.estimated else None,
                "calibration": None if c is None else c.to_dict(),
                "summary": self.summary_line(),
                "skipped": [s.to_dict() for s in self.skipped]}


def _check_folders(new: Path, reference: Path) -> None:
    from .ondisk import is_index_dir

    for label, folder in (("new folder", new), ("reference", reference)):
        index = folder.parent if folder.is_file() else folder  # a file of one, too: its index.faiss
        if is_index_dir(index):
            raise FilterkitError(
                f"{index} is an index directory (filterkit index build): cross-set dedup verifies each candidate "
                "pair on its two images, which an index does not hold; pass the image folder it was built from "
                "(its vectors come from the embedding cache, not embedded again)")
        if folder.is_file():
            raise FilterkitError(f"{label} is a file, not a folder of images: {folder}")
        if not folder.is_dir():
            raise FilterkitError(f"{label} not found: {folder}")
    a, b = new.resolve(), reference.resolve()
    if a == b:
        raise FilterkitError(f"the new folder and the reference are the same folder ({new}); for duplicates "
                             "inside one folder run filterkit dedup without --against")
    if a in b.parents or b in a.parents:
        raise FilterkitError(f"{new} and {reference} overlap (one is inside the other): give two separate folders")


class _EitherSide:
    """Candidate generation between the two folders, asked about a synthetic copy of an image of
    either: a copy of a reference image as one more new image (``to_new``), a copy of a new
    image as one more reference image (``to_ref``). Rows below ``n_ref`` are reference rows."""

    def __init__(self, to_new: _Proposer, to_ref: _Proposer, n_ref: int) -> None:
        self.to_new, self.to_ref, self.n_ref = to_new, to_ref, n_ref

    def _split(self, rows):
        side = np.asarray(rows) < self.n_ref
        return ((self.to_new, np.flatnonzero(side)), (self.to_ref, np.flatnonzero(~side)))

    def proposes_rows(self, rows: np.ndarray, vectors: np.ndarray, frames: np.ndarray | None) -> np.ndarray:
        out = np.zeros(len(rows), dtype=bool)
        for proposer, k in self._split(rows):
            if len(k):
                out[k] = proposer.proposes_rows(np.asarray(rows)[k], vectors[k], None if frames is None else frames[k])
        return out

    def would_pair(self, rows: np.ndarray, vectors: np.ndarray, frames: np.ndarray | None):
        found_q, found_t = [], []
        for proposer, k in self._split(rows):
            if len(k):
                q, t = proposer.would_pair(vectors[k], None if frames is None else frames[k])
                found_q.append(k[q])
                found_t.append(t)
        return np.concatenate(found_q), np.concatenate(found_t)


def cross_candidate_pairs(views: _Views, vectors: np.ndarray, ref: np.ndarray, new: np.ndarray,
                          rotations: bool, pixel_floor: float):
    """(ref rows, new rows, proposer): each new image's NEIGHBOURS nearest reference images and
    each reference image's NEIGHBOURS nearest new images, by cosine and with ``rotations`` by
    colour thumbnail under the 8 flips/rotations (at >= ``pixel_floor``); the proposer
    (``_EitherSide``) asks the same of a newcomer to either folder."""
    from . import verify
    from .index import build_index, search

    ref_vectors = np.ascontiguousarray(vectors[ref], dtype=np.float32)
    new_vectors = np.ascontiguousarray(vectors[new], dtype=np.float32)
    ref_index, new_index = build_index(ref_vectors), build_index(new_vectors)
    to_ref = search(ref_index, new_vectors, min(NEIGHBOURS, len(ref)))  # no floor: every image its background
    to_new = search(new_index, ref_vectors, min(NEIGHBOURS, len(new)))

    def kth(hits, n):  # a full list over the other folder: a newcomer must beat its last entry
        return hits.scores[:, -1] if hits.ids.shape[1] == NEIGHBOURS else np.full(n, -np.inf)
    pairs = [np.stack([to_ref.ids.ravel(), np.repeat(np.arange(len(new)), to_ref.ids.shape[1])], axis=1),
             np.stack([np.repeat(np.arange(len(ref)), to_new.ids.shape[1]), to_new.ids.ravel()], axis=1)]
    ref_frames = new_frames = None
    if rotations:
        ref_thumbs, new_thumbs = search_thumbnails(views, ref), search_thumbnails(views, new)
        ref_frames = verify.DihedralSearch(ref_thumbs, NEIGHBOURS, pixel_floor, others=new_thumbs)
        new_frames = verify.DihedralSearch(new_thumbs, NEIGHBOURS, pixel_floor, others=ref_thumbs)
        pairs.append(np.stack(ref_frames.pairs, axis=1))
    pairs = np.concatenate(pairs).astype(np.int64)
    pairs = np.unique(pairs[(pairs >= 0).all(axis=1)], axis=0)
    proposer = _EitherSide(_Proposer(ref_index, ref_vectors, kth(to_new, len(ref)), ref_frames, ref),
                           _Proposer(new_index, new_vectors, kth(to_ref, len(new)), new_frames, new),
                           int(new[0]))  # every reference row is below the first new row
    return ref[pairs[:, 0]], new[pairs[:, 1]], proposer


def _newcomer_backgrounds(views: _Views, rotations: bool, proposer: _EitherSide, sampled: np.ndarray,
                          copy_vectors: np.ndarray, copy_views: np.ndarray, copy_colour: np.ndarray,
                          chunk: int = 256) -> np.ndarray:
    """[m]: the background each synthetic copy would have as one more image of the other folder:
    ``backgrounds`` over its pixel scores with every image candidate generation would pair it
    with (its nearest, and those whose lists it would enter, by cosine and by rotated thumbnail),
    as a real image's background is computed over its candidates."""
    from . import verify
    from .dedup import backgrounds

    m = len(copy_vectors)
    copies, targets = proposer.would_pair(sampled, copy_vectors, copy_colour if rotations else None)
    views.ensure(targets)
    pix = np.empty(len(copies), dtype=np.float32)
    for s in range(0, len(copies), chunk):  # a small table per chunk: 2 x 84 kB per pair, not per candidate
        q, t = copies[s:s + chunk], targets[s:s + chunk]
        pairs = np.arange(len(q))
        pix[s:s + chunk] = verify.pixel_scores(np.concatenate([copy_views[q], views.table[t]]), pairs, len(q) + pairs)
    # every other end stands in one dummy node (m): only the copies' backgrounds are wanted
    return backgrounds(m + 1, copies, np.full(len(copies), m), pix)[:m]


def cross_duplicates(ref_paths: list[Path], ref_hashes: list[str], ref_vectors: np.ndarray, new_paths: list[Path],
                     new_hashes: list[str], new_vectors: np.ndarray, encoder, threshold: float | str = "auto",
                     target_precision: float = LIST_TARGET_PRECISION, rotations: bool = True, seed: int = 0,
                     sample: int = SAMPLE, progress: bool = False) -> tuple[list[CrossDuplicate], float,
                                                                            CollectionCalibration | None]:
    """(duplicates, threshold, calibration) of embedded reference and new images: every new
    image linked to a reference image (identical bytes, or a verified pair scoring >= the
    threshold), with its best-scoring reference image."""
    threshold = check_options(threshold, target_precision)
    paths = [*ref_paths, *new_paths]
    vectors = np.concatenate([ref_vectors, new_vectors]).astype(np.float32)
    n_ref, n = len(ref_paths), len(ref_paths) + len(new_paths)
    canonical = canonical_rows([*ref_hashes, *new_hashes])  # the reference first: its rows stand for shared bytes
    distinct = canonical == np.arange(n)
    ref, new = np.flatnonzero(distinct[:n_ref]), n_ref + np.flatnonzero(distinct[n_ref:])
    calibration = None
    best = {}  # new distinct row -> (score, ref row)
    if len(ref) and len(new):
        views = _Views(paths, progress)
        rows, cols, scores, _, calibration = score_pairs(
            paths, vectors, encoder, views, np.concatenate([ref, new]),
            lambda floor: cross_candidate_pairs(views, vectors, ref, new, rotations, floor),
            threshold, target_precision, len(new), rotations, seed, sample, scope="cross-set",
            copy_background=lambda proposer, sampled, v, copy_views, copy_colour: _newcomer_backgrounds(
                views, rotations, proposer, sampled, v, copy_views, copy_colour))
        threshold = calibration.threshold
        for k in np.flatnonzero(scores >= threshold)[np.argsort(-scores[scores >= threshold], kind="stable")]:
            best.setdefault(int(cols[k]), (float(scores[k]), int(rows[k])))
    elif threshold == "auto":
        threshold = 1.0  # nothing to calibrate on: only identical bytes link
    found = []
    for row in range(n_ref, n):
        if canonical[row] < n_ref:  # the bytes of a reference file
            found.append(CrossDuplicate(paths[row], paths[canonical[row]], 1.0, True))
        elif int(canonical[row]) in best:  # a new image or a byte copy of one that links
            score, match = best[int(canonical[row])]
            found.append(CrossDuplicate(paths[row], paths[match], min(score, 1.0), False))
    return sorted(found, key=lambda d: str(d.path)), float(threshold), calibration


def find_cross_duplicates(new: str | os.PathLike, reference: str | os.PathLike, encoder,
                          threshold: float | str | None = "auto", cache=None, batch_size: int = 64,
                          workers: int | None = None, progress: bool = False, follow_symlinks: bool = False,
                          target_precision: float = LIST_TARGET_PRECISION, rotations: bool = True,
                          seed: int = 0) -> CrossDedupResult:
    """The images of folder ``new`` that duplicate an image of folder ``reference``, each
    candidate pair verified on its images, at a pair-score threshold calibrated on the two
    folders (``threshold="auto"``, at ``target_precision``; pass dedup.MOVE_TARGET_PRECISION
    before ``dedup.check_move``) or given. ``cache``: an open ``EmbeddingCache`` (None: the
    default cache): a reference embedded before is read from it."""
    from .pipeline import cache_or_default, embed_folder

    new, reference = Path(new), Path(reference)
    _check_folders(new, reference)
    with cache_or_default(cache) as store:
        ref_found = embed_folder(reference, encoder, store, batch_size, workers, progress,
                                 follow_symlinks=follow_symlinks)
        new_found = embed_folder(new, encoder, store, batch_size, workers, progress, follow_symlinks=follow_symlinks)
    for label, found, folder in (("reference", ref_found, reference), ("new folder", new_found, new)):
        if not found.paths:
            raise FilterkitError(f"none of the images in the {label} {folder} could be decoded")
    duplicates, used, calibration = cross_duplicates(
        ref_found.paths, ref_found.hashes, ref_found.vectors, new_found.paths, new_found.hashes, new_found.vectors,
        encoder, "auto" if threshold is None else threshold, target_precision, rotations, seed, progress=progress)
    return CrossDedupResult(duplicates, used, calibration, len(new_found.paths), len(ref_found.paths),
                            {"new": new_found.n_embedded, "reference": ref_found.n_embedded},
                            [*new_found.skipped, *ref_found.skipped])
