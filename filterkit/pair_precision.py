"""The estimated pair precision and recall of verified dedup at a pair-score threshold, and the
automatic threshold: recall from synthetic copies of sampled images (their pair scores,
``positive``), precision from the collection's candidate pair scores. Two estimators:

- ``tail_*`` (collections of TAIL_MIN_IMAGES distinct images or more): each image's look-alike
  scores have an exponential upper tail fitted on its 2nd to 11th best pairs, and the false links
  above a threshold are what those tails predict there (``look_alike_tails``);
- ``anchor_*`` (smaller ones, too few pairs per image for a tail): the real copies are counted
  at an anchor score most synthetic copies reach, as if every link above it were one.

``calibrate`` picks one and returns the threshold with its estimates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CUT_GRID = 1000  # thresholds tried among the candidate pair scores (``_cut_grid``)
# The bound takes the false links at F + z sqrt(F), the normal approximation of the 75 %
# quantile of a Poisson count of mean F (75 % one-sided; continuous, so never above the point
# estimate, as the discrete quantile 0 of a small F would be): few expected false links among
# few links need a clearer margin than the point estimate.
PRECISION_BOUND_Z = 0.6745
CHUNK = 1 << 22  # cut x image terms per block of expected_false_links (32 MB of float64)
TAIL = 10  # look-alike scores per image that its tail is fitted on (``look_alike_tails``)
# Anchors: links at least as strong as 75 % or 50 % of the synthetic copies are taken for
# real copies. Each overstates the prevalence (look-alikes above it count as copies; real copies
# easier than the synthetic ones inflate it by 1 / R(anchor) at most), so the smallest is used.
ANCHOR_QUANTILES = (0.25, 0.5)
BOOTSTRAP = 200  # Poisson resamples of the calibration (``anchor_bounds``)
# The bound is the 25 % quantile of the resampled precision (75 % one-sided): on 11 photos it
# keeps a look-alike pair out that the point estimate (0.917) let in; on CIFAR-10 the 10 %
# quantile cost half the recall at true precision 0.96-1.00 (benchmarks/README.md).
PRECISION_BOUND = 0.25
# Below this many distinct images the anchor estimate is used: an image's tail needs 2 x TAIL
# candidate pairs, and a few dozen images give each only its few others (benchmarks/README.md).
TAIL_MIN_IMAGES = 100


@dataclass(frozen=True)
class Estimate:
    """A threshold and what is estimated of linking the pairs scored at or above it."""

    threshold: float
    precision_bound: float
    precision: float
    recall: float
    links: int
    false_links: float  # expected look-alike links among ``links``
    estimator: str  # "tails" or "anchor"


def calibrate(positive: np.ndarray, n: int, rows: np.ndarray, cols: np.ndarray, scores: np.ndarray,
              n_images: float, distinct: int, target_precision: float, threshold: float | None = None,
              seed: int = 0) -> Estimate:
    """The threshold (the lowest whose precision bound reaches ``target_precision``, or the
    given one) and its estimates, by the tails on ``distinct`` >= TAIL_MIN_IMAGES images, else
    by the anchor (links counted per ``n_images``). ``rows``, ``cols``: the candidate pairs of
    ``scores``, rows of ``n`` images."""
    positive, scores = np.asarray(positive, np.float64), np.asarray(scores, np.float64)
    if distinct >= TAIL_MIN_IMAGES:
        tails = look_alike_tails(n, rows, cols, scores)
        t, bound = tail_threshold(positive, scores, tails, target_precision, threshold)
        precision, recall, false, links = tail_estimate(t, positive, scores, tails)
        return Estimate(t, bound, precision, recall, links, false, "tails")
    t, bound = anchor_threshold(positive, scores, n_images, target_precision, threshold, seed)
    precision, recall, _, _ = anchor_estimate(t, positive, scores, n_images)
    links = int(np.sum(scores >= t))
    return Estimate(t, bound, precision, recall, links, links * (1 - precision), "anchor")


@dataclass(frozen=True)
class LookAlikeTails:
    """Per image: the upper tail of its look-alike pair scores, ``count`` scores above ``level``,
    their excesses exponential with mean ``scale`` (``look_alike_tails``); with each image's
    candidate pair scores (``ends``, ``values``: sorted by image, then score descending)."""

    level: np.ndarray
    scale: np.ndarray
    count: np.ndarray
    ends: np.ndarray
    values: np.ndarray


def _by_end(n: int, rows: np.ndarray, cols: np.ndarray, scores: np.ndarray):
    """(ends, values, rank): every pair once per end, by image and then score descending; rank
    0 is an image's best pair."""
    ends = np.concatenate([rows, cols]).astype(np.int64)
    values = np.concatenate([scores, scores]).astype(np.float64)
    order = np.lexsort((-values, ends))
    ends, values = ends[order], values[order]
    return ends, values, np.arange(len(ends)) - np.searchsorted(ends, ends)


def look_alike_tails(n: int, rows: np.ndarray, cols: np.ndarray, scores: np.ndarray, k: int = TAIL) -> LookAlikeTails:
    """Each image's look-alike tail, from its 2nd to (k+1)-th best pair scores s_2 >= ... >=
    s_(k+1) (k at most half its candidate pairs): the best is left out (it may be a real copy),
    s_(k+1) is the level u, and the scores above it are the top of an exponential tail (the
    peaks-over-threshold model of extreme-value statistics), its scale b their mean excess
    over u. Above u the image expects k x exp(-(t - u) / b) look-alike scores at or above t,
    its best counted as a look-alike too, so an image with a real copy overstates its false
    links (precision errs low). Leaving the best out also makes b low for an exactly
    exponential tail (on simulated ones the precision is then optimistic by up to 0.04), but
    real look-alike tails are lighter than exponential and there the estimate errs low
    (benchmarks/README.md). An image with fewer than 3 such scores (a tiny folder; a
    reference image few new ones point at) gets the median tail of the others, over no more
    scores than it has pairs."""
    ends, values, rank = _by_end(n, rows, cols, scores)
    top = np.full((n, k), np.nan)  # [n, k]: each image's 2nd to (k+1)-th best (0-based ranks 1..k)
    # a tail is the top of a sample, not all of it: at most half of an image's candidate pairs
    # (a folder of 11 images gives each 10, and their bulk is no exponential tail)
    depth = np.minimum(k, np.bincount(ends, minlength=n) // 2)
    keep = (rank >= 1) & (rank <= depth[ends])
    top[ends[keep], rank[keep] - 1] = values[keep]
    kept = np.sum(~np.isnan(top), axis=1)
    level = np.full(n, np.nan)
    has = kept > 0
    level[has] = top[has, kept[has] - 1]
    ok = kept >= 3
    scale = np.full(n, np.nan)
    if ok.any():  # the mean excess of the scores above the level
        scale[ok] = (np.nansum(top[ok], axis=1) - level[ok]) / (kept[ok] - 1) - level[ok]
        count = kept.astype(np.float64)
        fill = ~ok
        level[fill], scale[fill] = np.median(level[ok]), np.median(scale[ok])
        # no more look-alikes above the level than it has scores there: F stays continuous at
        # the level (below it the image's own scores count) and never grows with t
        own = np.bincount(ends[values >= level[ends]], minlength=n)
        count[fill] = np.minimum(np.median(count[ok]), own[fill])
    else:  # no image has a tail: every link may be a look-alike (precision 0, nothing certified)
        level, count, scale = np.full(n, np.inf), np.zeros(n), np.ones(n)
    return LookAlikeTails(level, np.maximum(scale, 1e-4), count, ends, values)


def expected_false_links(cuts: np.ndarray, tails: LookAlikeTails) -> np.ndarray:
    """[len(cuts)]: the look-alike pairs expected at or above each cut: per image, its scores >= t
    as observed up to its level u, and count x exp(-(t - u) / scale) above it; summed over
    images and halved (a pair has two ends)."""
    cuts = np.asarray(cuts, np.float64)
    modelled = np.zeros(len(cuts))
    step = max(1, CHUNK // max(len(tails.level), 1))  # [cuts, images] blocks: bounded memory on big folders
    for start in range(0, len(cuts), step):
        block = cuts[start:start + step, None]
        with np.errstate(over="ignore", invalid="ignore"):
            terms = tails.count * np.exp(-(block - tails.level) / tails.scale)
        modelled[start:start + step] = np.where(block > tails.level, terms, 0.0).sum(axis=1)
    # below its level an image's own scores count: an end-score v counts for every t <= min(v, u)
    observed = _links_at(cuts, np.minimum(tails.values, tails.level[tails.ends]))
    return (modelled + observed) / 2


def _links_at(cuts: np.ndarray, scores: np.ndarray) -> np.ndarray:
    scores = np.sort(np.asarray(scores, np.float64))
    return (len(scores) - np.searchsorted(scores, cuts, side="left")).astype(np.float64)


def _recall_at(cuts: np.ndarray, positive: np.ndarray) -> np.ndarray:
    positive = np.sort(np.asarray(positive, np.float64))
    return (len(positive) - np.searchsorted(positive, cuts, side="left")) / max(len(positive), 1)


def precision_at(cuts: np.ndarray, scores: np.ndarray, tails: LookAlikeTails, z: float = 0.0) -> np.ndarray:
    """[len(cuts)]: 1 - F(t) / C(t), with C(t) the candidate pairs scored >= t and F(t) the
    look-alike pairs expected among them (``expected_false_links``); with ``z`` > 0, F is
    raised to F + z sqrt(F) (a one-sided confidence bound on the precision). 1 where no pair
    reaches t."""
    cuts = np.asarray(cuts, np.float64)
    links, false = _links_at(cuts, scores), expected_false_links(cuts, tails)
    false = false + z * np.sqrt(false)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(links == 0, 1.0, 1.0 - np.minimum(1.0, false / links))


def tail_estimate(threshold: float, positive: np.ndarray, scores: np.ndarray,
                  tails: LookAlikeTails) -> tuple[float, float, float, int]:
    """Estimated (precision, recall, expected false links, links) of linking the candidate pairs
    scored >= ``threshold``.

    ``positive``: the pair scores of one synthetic copy per sampled image (-inf for a copy
    candidate generation would not propose: dedup cannot find it), whose share >= t is the
    recall R(t); ``scores``: the collection's candidate pair scores, C(t) of them >= t;
    ``tails``: each image's look-alike tail (``look_alike_tails``), which gives the expected
    false links F(t) (``expected_false_links``). precision(t) = 1 - F(t) / C(t), or 1 when C(t)
    = 0. No assumption on how many real copies the collection holds: the look-alikes are
    extrapolated from each image's own next-best pairs, which the copies do not reach.
    """
    cut = np.array([threshold], dtype=np.float64)
    precision = precision_at(cut, scores, tails)[0]
    return (float(precision), float(_recall_at(cut, positive)[0]), float(expected_false_links(cut, tails)[0]),
            int(_links_at(cut, scores)[0]))


def _cut_grid(positive: np.ndarray, scores: np.ndarray, size: int = CUT_GRID) -> np.ndarray:
    """Candidate thresholds: every finite positive, ``size`` quantiles of the pair scores at
    or above the lowest positive (below it the recall cannot grow), and the cut just above
    every pair score (links nothing, at precision 1: some cut always reaches a target)."""
    finite = positive[np.isfinite(positive)]
    low = finite.min() if len(finite) else np.inf
    top = scores[scores >= low]
    grid = np.quantile(top, np.linspace(0, 1, size)) if len(top) else np.empty(0)
    nothing = np.nextafter(scores.max(), np.inf) if len(scores) else np.inf
    return np.unique(np.concatenate([finite, grid, [nothing]]))


def tail_threshold(positive: np.ndarray, scores: np.ndarray, tails: LookAlikeTails, target_precision: float,
                   threshold: float | None = None) -> tuple[float, float]:
    """(threshold, its precision bound): the lowest pair score whose bound (``precision_at``
    with PRECISION_BOUND_Z) reaches the target (the most recall; where no cut that links a
    pair does, the one just above every pair, linking nothing); or the given ``threshold``
    with its bound."""
    positive, scores = np.asarray(positive, np.float64), np.asarray(scores, np.float64)
    if threshold is not None:
        return float(threshold), float(precision_at(np.array([threshold]), scores, tails, PRECISION_BOUND_Z)[0])
    cuts = _cut_grid(positive, scores)
    bound = precision_at(cuts, scores, tails, PRECISION_BOUND_Z)
    first = np.flatnonzero(bound >= target_precision)[0]  # the cut linking nothing always qualifies
    return float(cuts[first]), float(bound[first])


def anchor_estimate(threshold: float, positive: np.ndarray, neighbour: np.ndarray, n_images: float) -> tuple[float, float, float, float]:
    """Estimated (precision, recall, prevalence, anchor) of linking pairs scored >= ``threshold``.

    ``positive``: the pair scores of one synthetic copy per sampled image (-inf for a copy
    candidate generation would not propose: dedup cannot find it); ``neighbour``: the scores of
    the collection's candidate pairs, each pair once per end, over ``n_images`` images. With
    R(t) the share of positives >= t and c(t) the links >= t per image, c(a) >= q R(a) at every a (real copies
    alone give q R(a), look-alikes add to it), so each anchor a (the ANCHOR_QUANTILES
    quantiles of the positives) bounds the prevalence from above by c(a) / R(a); q is the
    smallest of these, the anchor the one giving it, and precision(t) = min(1, q R(t) / c(t)),
    or 1 when c(t) = 0. It is still an upper bound where look-alikes pass every anchor.
    """
    prevalence, anchor = _prevalence(positive, neighbour, n_images)
    precision, recall = _precision_recall(np.array([threshold], dtype=np.float64), positive, neighbour, n_images,
                                          prevalence)
    return float(precision[0]), float(recall[0]), prevalence, anchor


def _prevalence(positive: np.ndarray, neighbour: np.ndarray, n_images: float) -> tuple[float, float]:
    """(q, the anchor giving it): see ``anchor_estimate``."""
    positive, neighbour = np.asarray(positive, dtype=np.float64), np.asarray(neighbour, dtype=np.float64)
    # missed copies score -inf; an anchor between a miss and a hit interpolates to nan: -inf too
    with np.errstate(invalid="ignore"):
        anchors = np.nan_to_num(np.quantile(positive, ANCHOR_QUANTILES), nan=-np.inf)
    return min((float(np.sum(neighbour >= a)) / n_images / max(float(np.mean(positive >= a)), 1e-12), float(a))
               for a in anchors)


def _precision_recall(cuts: np.ndarray, positive: np.ndarray, neighbour: np.ndarray, n_images: float,
                      prevalence: float) -> tuple[np.ndarray, np.ndarray]:
    """``anchor_estimate``'s precision and recall at every threshold of ``cuts`` at once (sorted counts)."""
    positive, neighbour = np.sort(np.asarray(positive, np.float64)), np.sort(np.asarray(neighbour, np.float64))
    recall = (len(positive) - np.searchsorted(positive, cuts, side="left")) / max(len(positive), 1)
    links = (len(neighbour) - np.searchsorted(neighbour, cuts, side="left")) / n_images
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(links == 0, 1.0, np.minimum(1.0, prevalence * recall / links))
    return precision, recall


def anchor_bounds(cuts: np.ndarray, positive: np.ndarray, neighbour: np.ndarray, n_images: float,
                  resamples: int = BOOTSTRAP, seed: int = 0) -> np.ndarray:
    """[len(cuts)]: a lower confidence bound of ``anchor_estimate``'s precision at each cut (sorted):
    its ``PRECISION_BOUND`` quantile over Poisson bootstrap resamples, every positive and every
    neighbour score weighted by a Poisson(1) count (Hanley and MacGibbon 2006), the anchors and
    the prevalence refitted each time. A few hundred images give few links and few copies, and
    the point estimate alone then picks thresholds by luck; the bound needs more evidence there."""
    rng = np.random.default_rng(seed)

    def at_least(values: np.ndarray) -> np.ndarray:  # [B, K + 1]: resampled counts >= each cut; col 0: all
        bins = np.bincount(np.searchsorted(cuts, values, side="right"), minlength=len(cuts) + 1)
        draws = rng.poisson(bins, size=(resamples, len(bins)))  # bin 0: below every cut
        return np.cumsum(draws[:, ::-1], axis=1)[:, ::-1]

    pos = at_least(positive)
    recall = pos[:, 1:] / np.maximum(pos[:, :1], 1)
    links = at_least(neighbour)[:, 1:] / n_images
    prevalence = np.full(resamples, np.inf)
    rows = np.arange(resamples)
    for quantile in ANCHOR_QUANTILES:
        k = np.maximum((recall >= 1 - quantile).sum(axis=1) - 1, 0)  # the anchor's cut
        prevalence = np.minimum(prevalence, links[rows, k] / np.maximum(recall[rows, k], 1e-12))
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(links == 0, 1.0, np.minimum(1.0, prevalence[:, None] * recall / links))
    return np.quantile(precision, PRECISION_BOUND, axis=0)


def anchor_threshold(positive: np.ndarray, neighbour: np.ndarray, n_images: float, target_precision: float,
                     threshold: float | None = None, seed: int = 0) -> tuple[float, float]:
    """(threshold, its precision bound): the lowest pair score whose bound (``anchor_bounds``)
    reaches the target (the most recall; else the one just above every pair, linking nothing);
    or the given ``threshold`` with its bound."""
    positive, neighbour = np.asarray(positive, np.float64), np.asarray(neighbour, np.float64)
    cuts = _cut_grid(positive, neighbour)
    if threshold is not None:
        cuts = np.unique(np.append(cuts, threshold))
    bound = anchor_bounds(cuts, positive, neighbour, n_images, seed=seed)
    if threshold is not None:
        return float(threshold), float(bound[np.searchsorted(cuts, threshold)])
    first = np.flatnonzero(bound >= target_precision)[0]  # the cut linking nothing always qualifies
    return float(cuts[first]), float(bound[first])


