"""Keep-like / reject-like filtering: scores against exemplar sets or prototypes, threshold
calibration from the exemplars themselves, and a decision with its reason for every image.

Scorings (cosine similarities of unit vectors, after the normaliser):
- ``topm-centroid`` (the default): 0.75 x ``topm`` + 0.25 x the similarity to the set's mean
  direction, local and global evidence together (``centroid_scores``);
- ``topm``: against an exemplar set, the mean of the m largest similarities (m = min(3, #exemplars));
- ``prototypes`` (``prototypes=K``): the largest similarity to K spherical k-means prototypes;
- ``linear`` (needs reject-like exemplars): the decision value of a logistic regression
  trained on keep-like vs reject-like exemplars;
- any of them ``+knn``: each score smoothed over the incoming images' kNN graph.
An image is kept when its keep-like score reaches the threshold and is strictly higher than
its reject-like score (a tie goes to reject); ``linear`` has one score and only the threshold.
Images whose score is within the review band of the threshold get a third decision, ``review``.

The array-level functions take and return numpy arrays, so they work on vectors from
anywhere; :class:`ImageFilter` wires them to folders, the encoder and the cache.

    >>> result = ImageFilter(Encoder.load("models/x")).keep_like("exemplars").run("incoming")
    >>> [(d.path, d.decision, d.reason) for d in result.decisions]
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .errors import FilterkitError
from .index import build_index, search, spherical_kmeans
from .normalize import Normalizer

DEFAULT_M = 3
DEFAULT_TARGET_RECALL = 0.95
# Below these, the pool mixture (pool_threshold) is not fitted: the exemplars' spread and the
# pool's share of keep-like images cannot be estimated, and only the recall is stated.
POOL_MIN_EXEMPLARS, POOL_MIN = 8, 50
RECALL_MIN_EXEMPLARS = 3  # below, the recall is not stated: 2 held-out scores are one cosine twice
# Centring measured best (benchmarks/README.md, filter_quality.py on Imagenette, shipped model):
# keep-like AUROC 0.762 +- 0.004 over 3 exemplar draws vs 0.677 raw and 0.736 whitened; "auto"
# centres collections of 64 vectors and more (normalize.AUTO_CENTER_MIN).
DEFAULT_NORMALIZE = "auto"
_FOLDS = 5  # cross-fitting folds for held-out scores of the exemplars themselves
SCORINGS = ("topm-centroid", "topm", "prototypes", "linear")  # each may take "+knn" (smoothing over the incoming kNN graph)
DEFAULT_SCORING = "topm-centroid"
# scoring "topm-centroid": the centroid cosine's share, the top-m score's the rest. Chosen on the
# Imagenette training split from 0.25 / 0.5 / 0.75 as the largest gain that costs nothing with
# reject-like exemplars (benchmarks/README.md).
CENTROID_WEIGHT = 0.25
DEFAULT_PROTOTYPES = 4  # K of scoring "prototypes" when prototypes=K is not given
LINEAR_C = 1.0  # inverse L2 penalty of the classifier: modest, as 16 + 16 exemplars in 192-d separate anyway
SMOOTH_K, SMOOTH_ALPHA = 10, 0.5
BOOTSTRAP_RESAMPLES = 100  # of the exemplars' held-out scores, for the review band
POOL_EM_ITERATIONS = 500  # EM runs to convergence (tolerance 1e-5 on the prevalence) or this many steps
POOL_FIT_MAX = 5000  # pool scores the bootstrap refits the mixture on (a random subset beyond)
# The pool's precision is stated with its interval at this level; its point estimate only
# when the interval is within +- PRECISION_STATED_WITHIN (the goal for stated precision), else it is withheld.
PRECISION_LEVEL, PRECISION_STATED_WITHIN = 0.90, 0.10
POOL_MIN_SEPARATION = 2.0  # d' of the mixture's two components below which it is not trusted (PoolModel.consistent)


@dataclass(frozen=True)
class Scores:
    """Score of each query against one reference set, and which reference was nearest."""

    values: np.ndarray  # [Q] float32
    nearest: np.ndarray  # [Q] int64 row of the nearest exemplar (or prototype)


@dataclass(frozen=True)
class Threshold:
    value: float
    source: str  # "fixed" or "auto"
    est_recall: float | None = None  # of new keep-like images, from the exemplars' held-out scores
    est_precision: float | None = None  # on the incoming pool; from auto_threshold alone: at equal prevalence
    target_recall: float | None = None
    # The share of the incoming pool estimated to be keep-like (pool_threshold without reject-like
    # exemplars, negatives_pool_threshold with them); None where withheld (precision_note says why).
    est_prevalence: float | None = None
    target_precision: float | None = None
    # Scores within +- review_band of the value are decided "review" (0: no review band);
    # review_source: "bootstrap" (the threshold's estimated error, see review_band) or "given".
    review_band: float = 0.0
    review_source: str | None = None
    # PRECISION_LEVEL intervals (lo, hi) of the pool's precision at the value (without reject-like
    # exemplars a bootstrap of the mixture, with them Jeffreys posteriors, negatives_pool_threshold)
    # and of the prevalence; precision_note says why est_precision / est_prevalence are withheld.
    precision_interval: tuple[float, float] | None = None
    prevalence_interval: tuple[float, float] | None = None
    precision_note: str | None = None
    recall_note: str | None = None  # why est_recall is withheld (too few keep-like exemplars)

    def describe(self) -> str:
        """'0.812 auto (calibrated on the exemplars: est. recall 0.95, ...)'."""
        text = f"{self.value:.3f} {self.source}"
        recall = f"est. recall {self.est_recall:.2f}" if self.est_recall is not None else self.recall_note
        if self.est_prevalence is not None:
            text += (f" (calibrated on the exemplars and the incoming pool: est. {self.est_prevalence:.0%} of it "
                     f"keep-like; {recall}, est. precision {self.est_precision:.2f}")
            if self.precision_interval is not None:
                lo, hi = self.precision_interval
                text += f" ({lo:.2f}-{hi:.2f}, {PRECISION_LEVEL:.0%} interval)"
        elif self.precision_note is not None:
            text += f" (calibrated on the exemplars and the incoming pool: {recall}; {self.precision_note}"
        elif recall is not None:
            text += f" (calibrated on the exemplars: {recall}"
            if self.est_precision is not None:
                text += f", est. precision {self.est_precision:.2f} at equal prevalence"
        if recall is not None:
            text += (", of the threshold alone: review images at or above it counted as kept)" if self.review_band > 0
                     else ")")
        if self.review_band > 0:
            why = "the threshold's bootstrap spread" if self.review_source == "bootstrap" else "given"
            text += f"; review within +-{self.review_band:.3f} of it ({why})"
        return text


@dataclass(frozen=True)
class Decision:
    path: Path
    decision: str  # "keep" | "review" | "reject" | "error"
    score: float | None
    reject_score: float | None
    nearest_exemplar: Path | None
    nearest_reject: Path | None
    threshold: float | None
    reason: str

    def to_dict(self) -> dict:
        return {
            "path": str(self.path), "decision": self.decision,
            "score": None if self.score is None else round(self.score, 6),
            "reject_score": None if self.reject_score is None else round(self.reject_score, 6),
            "nearest_exemplar": None if self.nearest_exemplar is None else str(self.nearest_exemplar),
            "nearest_reject": None if self.nearest_reject is None else str(self.nearest_reject),
            "threshold": None if self.threshold is None else round(self.threshold, 6),
            "reason": self.reason,
        }


@dataclass
class FilterResult:
    decisions: list[Decision]
    threshold: Threshold
    exemplars: int
    negatives: int
    prototypes: int | None = None
    skipped_exemplars: list = field(default_factory=list)
    normalizer: Normalizer | None = None
    scoring: str = DEFAULT_SCORING

    def categories(self) -> list[tuple[Path, str]]:
        """(image, "kept" | "review" | "rejected") for file actions: the folders under --out.
        Images that failed stay where they are."""
        folder = {"keep": "kept", "review": "review", "reject": "rejected"}
        return [(d.path, folder[d.decision]) for d in self.decisions if d.decision != "error"]

    def counts(self) -> dict[str, int]:
        out = {"keep": 0, "review": 0, "reject": 0, "error": 0}
        for d in self.decisions:
            out[d.decision] += 1
        return out

    def summary(self) -> dict:
        t = self.threshold
        return {**self.counts(), "threshold": round(t.value, 6), "threshold_source": t.source,
                "est_recall": t.est_recall, "recall_note": t.recall_note,
                "est_precision": t.est_precision, "est_prevalence": t.est_prevalence,
                "precision_interval": _rounded(t.precision_interval),
                "prevalence_interval": _rounded(t.prevalence_interval),
                "precision_interval_level": PRECISION_LEVEL if t.precision_interval else None,
                "precision_note": t.precision_note,
                "target_recall": t.target_recall, "target_precision": t.target_precision,
                # est_recall / est_precision are of the threshold alone, whatever the review band.
                "estimates_count_review_as": "kept at or above the threshold, rejected below it",
                "review_band": round(t.review_band, 6), "review_band_source": t.review_source,
                "scoring": self.scoring, "exemplars": self.exemplars,
                "negatives": self.negatives, "prototypes": self.prototypes,
                "normalize": self.normalizer.to_dict() if self.normalizer else None,
                "skipped_exemplars": [s.to_dict() for s in self.skipped_exemplars]}

    def summary_line(self) -> str:
        c = self.counts()
        similarity = f"; {self.normalizer.describe()}" if self.normalizer else ""
        scoring = f"scoring {self.scoring}; " if self.scoring != DEFAULT_SCORING else ""
        return (f"kept {c['keep']}, review {c['review']}, rejected {c['reject']}, errors {c['error']}; {scoring}"
                f"threshold {self.threshold.describe()}{similarity}")

    def to_dict(self) -> dict:
        return {"images": [d.to_dict() for d in self.decisions], "summary": self.summary()}


def _rounded(pair: tuple[float, float] | None) -> list[float] | None:
    return None if pair is None else [round(v, 4) for v in pair]


# -- scores --------------------------------------------------------------------------------------
def exemplar_scores(queries: np.ndarray, exemplars: np.ndarray, m: int = DEFAULT_M) -> Scores:
    """Mean of each query's m largest cosine similarities to ``exemplars``."""
    if len(exemplars) == 0:
        raise FilterkitError("no exemplar vectors to score against")
    m = max(1, min(m, len(exemplars)))
    found = search(build_index(exemplars), queries, m)
    return Scores(found.scores.mean(axis=1).astype(np.float32), found.ids[:, 0].astype(np.int64))


def _unit(v: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(norm, 1e-12)


def centroid_scores(queries: np.ndarray, exemplars: np.ndarray, m: int = DEFAULT_M,
                    weight: float = CENTROID_WEIGHT) -> Scores:
    """(1 - weight) x the top-m score + weight x the cosine to the exemplars' mean direction: the
    nearest few exemplars (local evidence) and what all of them share (global evidence)."""
    top = exemplar_scores(queries, exemplars, m)
    centre = _unit(np.asarray(exemplars, np.float32).mean(axis=0))
    values = (1 - weight) * top.values + weight * (np.asarray(queries, np.float32) @ centre)
    return Scores(values.astype(np.float32), top.nearest)


def leave_one_out_centroid_scores(exemplars: np.ndarray, m: int = DEFAULT_M,
                                  weight: float = CENTROID_WEIGHT) -> np.ndarray:
    """``centroid_scores`` of each exemplar against the others: their top-m and their mean."""
    e = np.asarray(exemplars, np.float32)
    others = _unit((e.sum(axis=0, keepdims=True) - e) / max(len(e) - 1, 1))
    return ((1 - weight) * leave_one_out_scores(e, m) + weight * np.einsum("nd,nd->n", e, others)).astype(np.float32)


def prototype_scores(queries: np.ndarray, prototypes: np.ndarray) -> Scores:
    """Largest cosine similarity of each query to the prototypes."""
    return exemplar_scores(queries, prototypes, m=1)


def leave_one_out_scores(exemplars: np.ndarray, m: int = DEFAULT_M) -> np.ndarray:
    """Each exemplar's score against all the other exemplars (needs at least two)."""
    n = len(exemplars)
    if n < 2:
        raise FilterkitError("an automatic threshold needs at least two keep-like exemplars")
    k = max(1, min(m, n - 1))
    found = search(build_index(exemplars), exemplars, k + 1)
    scores = np.empty(n, dtype=np.float32)
    for i in range(n):
        ids, sims = found.ids[i], found.scores[i]
        # Drop the exemplar itself; with exact duplicates it may not be in first place.
        self_pos = np.flatnonzero(ids == i)
        drop = self_pos[0] if len(self_pos) else 0
        scores[i] = np.delete(sims, drop)[:k].mean()
    return scores


def held_out_prototype_scores(exemplars: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Each exemplar's prototype score with prototypes fitted on the other folds (cross-fitting),
    so an exemplar never scores against a centroid it helped make."""
    n = len(exemplars)
    if n < 2:
        raise FilterkitError("an automatic threshold needs at least two keep-like exemplars")
    folds = np.arange(n) % min(_FOLDS, n)
    scores = np.empty(n, dtype=np.float32)
    for f in np.unique(folds):
        train = exemplars[folds != f]
        protos = spherical_kmeans(train, min(k, len(train)), seed=seed)
        scores[folds == f] = prototype_scores(exemplars[folds == f], protos).values
    return scores


def _classifier(c: float):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, class_weight="balanced", max_iter=1000)


def _labelled(keep: np.ndarray, reject: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([keep, reject]), np.r_[np.ones(len(keep)), np.zeros(len(reject))]


def linear_scores(queries: np.ndarray, keep: np.ndarray, reject: np.ndarray, c: float = LINEAR_C) -> np.ndarray:
    """Decision value w.x + b of a logistic regression fitted to tell the keep-like exemplars (1)
    from the reject-like ones (0), both sets weighted equally (class_weight="balanced")."""
    if len(keep) == 0 or len(reject) == 0:
        raise FilterkitError("scoring 'linear' needs keep-like and reject-like exemplars")
    return _classifier(c).fit(*_labelled(keep, reject)).decision_function(queries).astype(np.float32)


def held_out_linear_scores(keep: np.ndarray, reject: np.ndarray, c: float = LINEAR_C,
                           seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Each exemplar's decision value from a classifier fitted without it (stratified k-fold
    cross-fitting): (keep-like exemplars', reject-like exemplars')."""
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    folds = min(_FOLDS, len(keep), len(reject))
    if folds < 2:
        raise FilterkitError("scoring 'linear' with an automatic threshold needs at least two keep-like and two "
                             "reject-like exemplars")
    x, y = _labelled(keep, reject)
    values = cross_val_predict(_classifier(c), x, y, method="decision_function",
                               cv=StratifiedKFold(folds, shuffle=True, random_state=seed)).astype(np.float32)
    return values[:len(keep)], values[len(keep):]


def neighbour_mean(pool_scores: np.ndarray, pool_vectors: np.ndarray, queries: np.ndarray | None = None,
                   k: int = SMOOTH_K) -> np.ndarray:
    """Mean of ``pool_scores`` over each query's k nearest pool vectors (cosine). Without
    ``queries``: over each pool vector's k nearest others (itself left out)."""
    own = queries is None
    k = min(k, len(pool_vectors) - own)
    if k < 1:
        raise FilterkitError("kNN smoothing needs at least two incoming images")
    found = search(build_index(pool_vectors), pool_vectors if own else queries, k + own)
    ids = found.ids
    if own:
        # Drop each row's own entry; with exact duplicates it may not come first, and a row that
        # lacks it (ties) drops its last neighbour instead.
        is_self = ids == np.arange(len(ids))[:, None]
        is_self[~is_self.any(axis=1), -1] = True
        is_self &= np.cumsum(is_self, axis=1) == 1
        ids = ids[~is_self].reshape(len(ids), k)
    return np.asarray(pool_scores, np.float32)[ids].mean(axis=1)


def smooth_scores(scores: np.ndarray, neighbour_means: np.ndarray, alpha: float = SMOOTH_ALPHA) -> np.ndarray:
    """score' = (1 - alpha) * score + alpha * (mean score of the k nearest incoming images): one
    step of label propagation over the incoming images' kNN graph, so an image is pulled
    towards the verdict of the images that look like it."""
    return ((1 - alpha) * np.asarray(scores, np.float32) + alpha * np.asarray(neighbour_means, np.float32))


# -- threshold -----------------------------------------------------------------------------------
def _kept(keep: np.ndarray, reject: np.ndarray | None, t: float) -> np.ndarray:
    passed = keep >= t
    return passed if reject is None else passed & (keep > reject)


def auto_threshold(pos_keep: np.ndarray, pos_reject: np.ndarray | None = None,
                   neg_keep: np.ndarray | None = None, neg_reject: np.ndarray | None = None,
                   target_recall: float = DEFAULT_TARGET_RECALL) -> Threshold:
    """Calibrate the keep threshold from held-out scores of the exemplars themselves.

    ``pos_keep``: each keep-like exemplar's leave-one-out keep score (``pos_reject``: its score
    against the reject-like set). ``neg_keep``/``neg_reject``: each reject-like exemplar's score
    against the keep-like set / leave-one-out against its own set.

    Without negatives: the highest threshold that keeps ``target_recall`` of the positives.
    With negatives: the highest threshold with the best F1 of the full keep rule (threshold
    and "beats reject-like"), precision taken at equal prevalence.
    """
    pos_keep = np.asarray(pos_keep, dtype=np.float64)
    if neg_keep is None or len(neg_keep) == 0:
        t = float(np.quantile(pos_keep, 1.0 - target_recall, method="lower"))
        recall = float(_kept(pos_keep, pos_reject, t).mean())
        return Threshold(t, "auto", est_recall=recall, target_recall=target_recall)
    neg_keep = np.asarray(neg_keep, dtype=np.float64)
    best = None
    for t in np.unique(np.concatenate([pos_keep, neg_keep])):
        tpr = _kept(pos_keep, pos_reject, t).mean()
        fpr = _kept(neg_keep, neg_reject, t).mean()
        precision = tpr / (tpr + fpr) if tpr + fpr > 0 else 0.0
        f1 = 2 * precision * tpr / (precision + tpr) if precision + tpr > 0 else 0.0
        # Ties: prefer the higher threshold, which costs nothing on the exemplars and keeps
        # fewer images that resemble neither set.
        if best is None or f1 >= best[0] - 1e-12:
            best = (f1, float(t), float(tpr), float(precision))
    _, t, recall, precision = best
    return Threshold(t, "auto", est_recall=recall, est_precision=precision)


@dataclass(frozen=True)
class PoolModel:
    """The incoming pool's share of keep-like images (``prevalence``, from the semi-supervised
    mixture of ``_pool_em``) and the keep-like scores' normal fitted to the exemplars' held-out
    scores alone, which states the recall (``predictive_recall``; measured in benchmarks/README.md)."""

    prevalence: float
    pos_mean: float
    pos_std: float
    # The mixture's own keep-like normal (exemplars and pool responsibilities): far from the
    # exemplars' one, the mixture has taken other images for keep-like ones (see consistent()).
    mix_mean: float | None = None
    mix_std: float | None = None
    n_exemplars: int = 0
    neg_mean: float | None = None  # the other images' normal
    neg_std: float | None = None

    def consistent(self) -> bool:
        """Could the exemplars' held-out scores be a sample of the mixture's keep-like normal? Their
        mean within 2 standard errors of its mean, their std within the 95 % chi-square range of a
        sample std of that many (ddof 1). Other images' scores with a heavier upper tail than a
        normal get taken for keep-like ones and often fail this (not always: benchmarks/README.md).
        And the two components at least ``POOL_MIN_SEPARATION`` pooled standard deviations apart:
        closer, EM splits the pool into two broad halves (seen with random-init and raw-pixel
        scores, whose upper half the exemplars resemble)."""
        from scipy.stats import chi2

        m = self.n_exemplars
        if self.mix_mean is None or m < 2:
            return False
        close = abs(self.mix_mean - self.pos_mean) <= 2 * self.mix_std / np.sqrt(m)
        ratio = (self.pos_std / self.mix_std) ** 2 * (m - 1)
        apart = (self.mix_mean - self.neg_mean) / np.sqrt((self.mix_std ** 2 + self.neg_std ** 2) / 2)
        return bool(close and chi2.ppf(0.025, m - 1) <= ratio <= chi2.ppf(0.975, m - 1)
                    and apart >= POOL_MIN_SEPARATION)

    def recall(self, t: np.ndarray | float) -> np.ndarray:
        """P(score >= t) for a new keep-like image (``predictive_recall``)."""
        return predictive_recall(t, self.pos_mean, self.pos_std, self.n_exemplars)


def predictive_recall(t, mean, std, n: int) -> np.ndarray:
    """P(score >= t) for a *new* keep-like image, given a normal whose ``mean`` and ``std``
    (ddof 1) were estimated from ``n`` held-out exemplar scores: the normal prediction
    distribution, mean + std·sqrt(1 + 1/n)·T with T Student-t of n − 1 degrees of freedom. The
    plug-in normal ignores that the mean and std are themselves estimates from 16 or so scores
    and keeps about 93 % where it says 95 % (benchmarks/README.md). One score: the plug-in normal."""
    from scipy.special import ndtr, stdtr  # ufuncs: scipy.stats.t costs ~0.5 ms per call

    z = (np.asarray(mean, np.float64) - np.asarray(t, np.float64)) / np.asarray(std, np.float64)
    if n < 2:
        return ndtr(z)
    return stdtr(n - 1, z / np.sqrt(1 + 1 / n))


def predictive_quantile(recall: float, mean: float, std: float, n: int) -> float:
    """The threshold t with ``predictive_recall(t, mean, std, n) == recall``."""
    from scipy.special import ndtri, stdtrit

    if n < 2:
        return float(mean + ndtri(1.0 - recall) * std)
    return float(mean + stdtrit(n - 1, 1.0 - recall) * std * np.sqrt(1 + 1 / n))


def _positive_normal(positives: np.ndarray, spread: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (ddof 1) of each row of held-out exemplar scores [B, n]; one score: ``spread``."""
    mu = positives.mean(axis=1)
    sd = positives.std(axis=1, ddof=1) if positives.shape[1] > 1 else spread
    return mu, np.maximum(sd, 1e-4)


def _pool_em(pools: np.ndarray, positives: np.ndarray, iterations: int = POOL_EM_ITERATIONS,
             tol: float = 1e-5) -> tuple[np.ndarray, ...]:
    """EM for the prevalence of each row of ``pools`` [B, n] under a mixture of two normals, the
    exemplars' held-out scores ``positives`` [B, m] counted as labelled keep-like points
    (semi-supervised EM: the keep-like normal is fitted to them and to the pool's keep-like
    responsibilities together, so 16 exemplars do not fix its shape alone). Run to convergence
    from prevalence 0.5: stopped early from a guess, EM keeps that guess (200 steps from 0.1,
    the benchmark's true prevalence, made it look better than it was)."""
    def pdf(x, mu, sd):  # the normal density; scipy.stats.norm.pdf costs several times more per call here
        return np.exp(-0.5 * ((x - mu[:, None]) / sd[:, None]) ** 2) / (sd[:, None] * np.sqrt(2 * np.pi))

    m = positives.shape[1]
    pi = np.full(len(pools), 0.5)
    mu_p, sd_p = _positive_normal(positives, pools.std(axis=1))
    mu_n, sd_n = pools.mean(axis=1), np.maximum(pools.std(axis=1), 1e-4)
    pos_sum, pos_sq = positives.sum(axis=1), (positives ** 2).sum(axis=1)
    for _ in range(iterations):
        weighted = pi[:, None] * pdf(pools, mu_p, sd_p)
        r = weighted / np.maximum(weighted + (1 - pi[:, None]) * pdf(pools, mu_n, sd_n), 1e-300)
        new = np.clip(r.mean(axis=1), 1e-4, 1 - 1e-4)
        w = 1 - r
        n_p = m + r.sum(axis=1)
        mu_p = (pos_sum + (r * pools).sum(axis=1)) / n_p
        sd_p = np.maximum(np.sqrt(np.maximum((pos_sq + (r * pools ** 2).sum(axis=1)) / n_p - mu_p ** 2, 0)), 1e-4)
        mu_n = (w * pools).sum(axis=1) / w.sum(axis=1)
        sd_n = np.maximum(np.sqrt((w * (pools - mu_n[:, None]) ** 2).sum(axis=1) / w.sum(axis=1)), 1e-4)
        done = np.abs(new - pi).max() < tol
        pi = new
        if done:
            break
    return pi, mu_p, sd_p, mu_n, sd_n


def fit_pool(pool: np.ndarray, positives: np.ndarray, iterations: int = POOL_EM_ITERATIONS) -> PoolModel:
    """The prevalence by ``_pool_em``; the keep-like normal of the exemplars' held-out scores."""
    pool, positives = np.asarray(pool, np.float64), np.asarray(positives, np.float64)
    spread = np.array([max(float(pool.std()), 1e-4)])
    mu_p, sd_p = _positive_normal(positives[None], spread)
    pi, mix_mu, mix_sd, neg_mu, neg_sd = _pool_em(pool[None], positives[None], iterations)
    return PoolModel(float(pi[0]), float(mu_p[0]), float(sd_p[0]), float(mix_mu[0]), float(mix_sd[0]), len(positives),
                     float(neg_mu[0]), float(neg_sd[0]))


def pool_recall_threshold(positives: np.ndarray, target_recall: float = DEFAULT_TARGET_RECALL) -> float:
    """The threshold at which a new keep-like image passes with probability ``target_recall``
    (``predictive_quantile`` of the positives' normal, fitted as in ``fit_pool``)."""
    positives = np.asarray(positives, np.float64)
    mu, sd = _positive_normal(positives[None], np.array([max(float(positives.std()), 1e-4)]))
    return predictive_quantile(target_recall, float(mu[0]), float(sd[0]), len(positives))


def bootstrap_pool(pool: np.ndarray, positives: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prevalence, keep-like mean, keep-like std) [resamples] of the pool mixture refitted on
    bootstrap resamples of both the exemplars' held-out scores and the pool's scores (at most
    ``POOL_FIT_MAX`` of them, a fixed random subset: the interval is then if anything wider)."""
    rng = np.random.default_rng(seed)
    pool, positives = np.asarray(pool, np.float64), np.asarray(positives, np.float64)
    if len(pool) > POOL_FIT_MAX:
        pool = rng.choice(pool, POOL_FIT_MAX, replace=False)
    pools = pool[rng.integers(0, len(pool), (resamples, len(pool)))]
    pos = positives[rng.integers(0, len(positives), (resamples, len(positives)))]
    mu_p, sd_p = _positive_normal(pos, pools.std(axis=1))
    return _pool_em(pools, pos)[0], mu_p, sd_p


def pool_precision(prevalence, pos_mean, pos_std, pool: np.ndarray, t: float, n: int) -> np.ndarray:
    """precision(t) = prevalence x recall(t) / (share of the pool scoring >= t, as observed),
    recall(t) the ``predictive_recall`` of the keep-like normal fitted on ``n`` exemplar scores;
    capped at 1 (1 where nothing reaches t)."""
    share = float((np.asarray(pool) >= t).mean())
    if share == 0:
        return np.ones_like(np.asarray(prevalence, np.float64))
    recall = predictive_recall(t, pos_mean, pos_std, n)
    return np.minimum(1.0, np.asarray(prevalence, np.float64) * recall / share)


def pool_threshold(pool: np.ndarray, positives: np.ndarray, target_recall: float = DEFAULT_TARGET_RECALL,
                   target_precision: float | None = None, resamples: int = BOOTSTRAP_RESAMPLES,
                   seed: int = 0) -> Threshold:
    """The threshold for a target, with the recall and precision it is estimated to give on
    this pool (no reject-like exemplars needed).

    recall(t) = P(a new positive scores >= t), ``predictive_recall``; precision(t): see
    ``pool_precision``. With ``target_precision``: the lowest threshold estimated to reach it
    (the most recall); else the highest threshold whose estimated recall reaches ``target_recall``.

    The precision is stated with its ``PRECISION_LEVEL`` bootstrap interval (``bootstrap_pool``:
    resamples of the exemplars and of the pool, threshold held fixed). Only when that interval
    is at most 2 x ``PRECISION_STATED_WITHIN`` wide are the point estimates of precision and
    prevalence stated; otherwise the mixture is poorly identified (the keep-like and other
    scores overlap, and 16 exemplars pin the keep-like shape loosely), the point estimates are
    withheld and ``precision_note`` says why. Measured (benchmarks/README.md): with the shipped
    model the interval is about 0.5 wide on Imagenette and CIFAR-10, so precision is withheld
    there. ``resamples=0``: no interval (the review band's bootstrap of the threshold itself).
    """
    pool = np.asarray(pool, np.float64)
    model = fit_pool(pool, positives)

    def precision(t: float) -> float:
        return float(pool_precision(model.prevalence, model.pos_mean, model.pos_std, pool, t, model.n_exemplars))

    if target_precision is not None:
        candidates = np.unique(pool)  # every one is reached by some pool score: no zero share
        share = (len(pool) - np.searchsorted(np.sort(pool), candidates, side="left")) / len(pool)
        reached = np.minimum(1.0, model.prevalence * model.recall(candidates) / share) >= target_precision
        t = float(candidates[reached].min()) if reached.any() else float(candidates.max())
    else:
        t = pool_recall_threshold(positives, target_recall)
    interval = prevalence_interval = note = None
    stated = True
    if resamples:
        pi, mu, sd = bootstrap_pool(pool, positives, resamples, seed)
        tails = [(1 - PRECISION_LEVEL) / 2, (1 + PRECISION_LEVEL) / 2]
        lo, hi = np.quantile(pool_precision(pi, mu, sd, pool, t, len(positives)), tails)
        interval, prevalence_interval = (float(lo), float(hi)), tuple(float(v) for v in np.quantile(pi, tails))
        stated = hi - lo <= 2 * PRECISION_STATED_WITHIN and model.consistent()
        if not model.consistent():
            note = (f"precision not stated: the pool mixture is not trusted (its keep-like component: mean "
                    f"{model.mix_mean:.3f}, std {model.mix_std:.3f}; the others': mean {model.neg_mean:.3f}, std "
                    f"{model.neg_std:.3f}; the exemplars' held-out scores: mean {model.pos_mean:.3f}, std "
                    f"{model.pos_std:.3f}): the components overlap, or the keep-like one does not look like the "
                    f"exemplars")
        elif not stated:
            note = (f"precision not stated: the score mixture does not pin the share of keep-like images in "
                    f"the pool ({PRECISION_LEVEL:.0%} bootstrap interval of the precision {lo:.2f}-{hi:.2f}, of "
                    f"the share {prevalence_interval[0]:.0%}-{prevalence_interval[1]:.0%}): the keep-like and "
                    f"other scores overlap too much")
    return Threshold(t, "auto", est_recall=float(model.recall(t)), est_precision=precision(t) if stated else None,
                     target_recall=None if target_precision is not None else target_recall,
                     est_prevalence=model.prevalence if stated else None, target_precision=target_precision,
                     precision_interval=interval, prevalence_interval=prevalence_interval, precision_note=note)


def rule_recall(t: float, pos_keep: np.ndarray, pos_reject: np.ndarray | None) -> float:
    """The recall of the keep rule (keep score >= t, and above the reject score) stated with
    reject-like exemplars: P(keep >= t) from the predictive normal of the keep-like exemplars'
    held-out scores (``predictive_recall``, as without reject-like exemplars) times the share of
    those at or above t that also beat their reject score (of all of them, if none is).

    The kept share of the exemplars themselves, stated before, was optimistic because the
    threshold is chosen on them (F1): 0.847 stated against a true 0.764 on held-out Imagenette,
    now 0.780; benchmarks/README.md."""
    pk = np.asarray(pos_keep, np.float64)
    if len(pk) < 3 or not pk.std(ddof=1) > 0:  # e.g. 2 exemplars: both held-out scores are one cosine
        return float(_kept(pk, pos_reject, t).mean())
    beats = 1.0
    if pos_reject is not None:
        wins = pk > np.asarray(pos_reject, np.float64)
        above = pk >= t
        beats = float(wins[above].mean() if above.any() else wins.mean())
    return float(predictive_recall(t, pk.mean(), pk.std(ddof=1), len(pk))) * beats


def adjusted_count(share, tpr, fpr) -> tuple[np.ndarray, np.ndarray]:
    """(prevalence, precision) of a keep rule on the pool by adjusted classify-and-count (Forman
    2008): the rule keeps a share s = pi * tpr + (1 - pi) * fpr of the pool, tpr and fpr being
    the rates at which it keeps keep-like and other images, hence pi = (s - fpr) / (tpr - fpr)
    and precision = pi * tpr / s. Not clipped: pi outside [0, 1] (s outside [fpr, tpr]) means
    the rates do not describe this pool. NaN where tpr <= fpr. Arrays broadcast."""
    s, tpr, fpr = (np.asarray(a, np.float64) for a in (share, tpr, fpr))
    with np.errstate(divide="ignore", invalid="ignore"):
        pi = np.where(tpr > fpr, (s - fpr) / (tpr - fpr), np.nan)
        precision = np.where(s > 0, pi * tpr / s, 1.0)
    return pi, precision


def negatives_pool_threshold(calibrated: Threshold, pool: tuple[np.ndarray, np.ndarray],
                             positives: tuple[np.ndarray, np.ndarray], negatives: tuple[np.ndarray, np.ndarray],
                             draws: int = 2000, seed: int = 0) -> Threshold:
    """``calibrated`` (``auto_threshold`` with reject-like exemplars) with the precision and the
    prevalence it is estimated to have on the incoming pool (``adjusted_count``; tpr and fpr
    are the shares of the keep-like and reject-like exemplars' held-out scores the rule keeps).
    Each of pool / positives / negatives is (keep scores, reject scores or None: the linear
    classifier's rule is its score alone).

    The ``PRECISION_LEVEL`` interval of the precision comes from Jeffreys posteriors
    Beta(k + 1/2, n - k + 1/2) of tpr and fpr (k of n exemplars kept; the pool's kept share is
    observed), the threshold held fixed: unlike a bootstrap it stays wide when few exemplars are
    all kept, or none (2 of 2 kept is no proof of a recall of 1). Precision and prevalence are
    stated only when the interval is at most 2 x ``PRECISION_STATED_WITHIN`` wide and the pool's
    kept share lies between fpr and tpr for all but a tail of the draws: outside, the exemplars
    do not stand for the pool (e.g. reject-like exemplars kept more often than the incoming
    images), and the clipped estimate would be a confident 0 or 1. Measured
    (benchmarks/README.md): 16 to 300 reject-like exemplars of 9 kinds leave the interval 0.26
    wide or more at a prevalence of 10 %, so precision is then withheld. tpr and fpr are kept shares
    at a threshold chosen on these exemplars (best F1), so both lean optimistic (tpr high, fpr low);
    ``rule_recall`` states the recall without that bias, this count does not yet."""
    t = calibrated.value
    kept = [_kept(np.asarray(k), None if r is None else np.asarray(r), t) for k, r in (pool, positives, negatives)]
    share, tpr, fpr = (float(k.mean()) for k in kept)
    rng = np.random.default_rng(seed)
    # The pool's kept share is observed, not estimated; the exemplars' rates are samples.
    tprs, fprs = (rng.beta(k.sum() + 0.5, len(k) - k.sum() + 0.5, draws) for k in kept[1:])
    pi, precision = adjusted_count(share, tpr, fpr)
    pis, precisions = adjusted_count(share, tprs, fprs)
    tail = (1 - PRECISION_LEVEL) / 2
    fits = np.isfinite(pis) & (pis >= 0) & (pis <= 1)
    lo, hi = np.quantile(np.clip(np.nan_to_num(precisions, nan=0.0), 0, 1), [tail, 1 - tail])
    prevalence_interval = tuple(float(v) for v in np.quantile(np.clip(np.nan_to_num(pis, nan=0.0), 0, 1),
                                                              [tail, 1 - tail]))
    sizes = f"{len(kept[1])} keep-like and {len(kept[2])} reject-like exemplars"
    consistent = bool(0 <= pi <= 1)  # False for NaN too (tpr <= fpr)
    edge = bool(kept[2].sum() == 0 or kept[1].all())
    narrow = hi - lo <= 2 * PRECISION_STATED_WITHIN
    if share == 0:
        note = "precision not stated: the threshold keeps none of the incoming images"
    elif not consistent:
        note = (f"precision not stated: the exemplars do not describe the incoming images (the rule keeps "
                f"{share:.0%} of them, {tpr:.0%} of the keep-like and {fpr:.0%} of the reject-like exemplars; "
                f"the incoming share should lie between the two): "
                + ("give reject-like exemplars like the incoming images to be rejected" if share <= fpr
                   else "the keep-like exemplars score lower than the incoming images" if share >= tpr
                   else "the keep-like exemplars are kept no more often than the reject-like ones"))
    elif hi - lo > 2 * PRECISION_STATED_WITHIN or (1 - fits.mean()) > tail:
        why = ("" if hi - lo > 2 * PRECISION_STATED_WITHIN else
               f"; in {1 - fits.mean():.0%} of the posterior draws the exemplars' rates do not bracket the incoming share")
        note = (f"precision not stated: {sizes} do not pin the share of keep-like images among the "
                f"{len(kept[0])} incoming ({PRECISION_LEVEL:.0%} interval of the precision {lo:.2f}-{hi:.2f}{why})")
    elif edge:
        # Best F1 on these very exemplars puts the threshold just past the last reject-like one (or the
        # first keep-like one): a rate of 0 (or 1) is where it was put, not how often other images pass.
        # Stated so, the precision came out 1.00 against a true 0.25 (benchmarks/README.md).
        edge = (f"none of the {len(kept[2])} reject-like exemplars" if kept[2].sum() == 0
                else f"all {len(kept[1])} keep-like exemplars")
        note = (f"precision not stated: the threshold keeps {edge}, and it was chosen on them (best F1), so that "
                f"rate says where the threshold was put, not how often other images pass it")
    else:
        note = None
    stated = note is None
    # else the clipped quantiles would look confident; at an edge rate they are confident and wrong
    intervals = share > 0 and consistent and not (edge and narrow)
    return replace(calibrated, est_precision=float(np.clip(precision, 0, 1)) if stated else None,
                   est_prevalence=float(np.clip(pi, 0, 1)) if stated else None,
                   precision_interval=(float(lo), float(hi)) if intervals else None,
                   prevalence_interval=prevalence_interval if intervals else None, precision_note=note)


def threshold_spread(calibrate, groups: list[tuple], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> float:
    """Standard deviation of the threshold ``calibrate(*arrays)`` (a float) over bootstrap
    resamples of the exemplars: ``groups`` are tuples of arrays with one row per exemplar
    (``None`` passes through), the arrays of a tuple resampled with the same rows."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        arrays = []
        for group in groups:
            rows = rng.integers(0, len(group[0]), len(group[0]))
            arrays += [None if a is None else np.asarray(a)[rows] for a in group]
        values.append(calibrate(*arrays))
    return float(np.std(values))


# -- decisions -----------------------------------------------------------------------------------
def decide(paths: list[Path], keep: np.ndarray, nearest: list[Path], threshold: float,
           reject: np.ndarray | None = None, nearest_reject: list[Path] | None = None,
           via: list[str] | None = None, band: float = 0.0) -> list[Decision]:
    """One Decision per path, with its reason. ``keep``/``reject`` are the scores,
    ``nearest``/``nearest_reject`` the closest exemplar of each set, ``via`` optional words on
    what was scored against (e.g. "prototype 3").

    A score within ``band`` of the threshold (|score - threshold| <= band, band > 0) is decided
    "review" unless the image is more like the reject-like exemplars: the threshold is not
    known that precisely, so neither keep nor reject is trusted there."""
    out = []
    for i, path in enumerate(paths):
        score, near = float(keep[i]), nearest[i]
        rscore = float(reject[i]) if reject is not None else None
        rnear = nearest_reject[i] if nearest_reject is not None else None
        against = f" ({via[i]})" if via else ""
        loses = rscore is not None and rscore >= score
        if band > 0 and abs(score - threshold) <= band and not loses:
            decision = "review"
            reason = (f"score {score:.3f}{against} is within +-{band:.3f} of the threshold {threshold:.3f} "
                      f"(the review band): too close to call; nearest exemplar {near.name}")
        elif score < threshold:
            decision, reason = "reject", f"score {score:.3f}{against} is below the threshold {threshold:.3f}"
        elif loses:
            decision = "reject"
            reason = (f"more like reject-like {rnear.name} ({rscore:.3f}) than like keep-like "
                      f"{near.name} ({score:.3f}{against})")
        else:
            decision = "keep"
            reason = f"score {score:.3f}{against} reaches the threshold {threshold:.3f}; nearest exemplar {near.name}"
            if rscore is not None:
                reason += f"; beats reject-like {rnear.name} ({rscore:.3f})"
        out.append(Decision(path, decision, score, rscore, near, rnear, threshold, reason))
    return out


class ImageFilter:
    """Folders in, decisions out.

        >>> f = ImageFilter(encoder).keep_like("exemplars").reject_like("negatives")
        >>> result = f.run("incoming")
    """

    def __init__(self, encoder, cache=None, threshold: float | str = "auto", prototypes: int | None = None,
                 m: int = DEFAULT_M, target_recall: float = DEFAULT_TARGET_RECALL, batch_size: int = 64,
                 workers: int | None = None, progress: bool = False, follow_symlinks: bool = False,
                 normalize: str = DEFAULT_NORMALIZE, review_band: float | str = "auto") -> None:
        if threshold != "auto" and (not isinstance(threshold, (int, float)) or not np.isfinite(threshold)):
            raise FilterkitError(f"threshold must be 'auto' or a finite number, got {threshold!r}")
        _check_review_band(review_band)
        self.encoder, self.cache, self.normalize = encoder, cache, normalize
        self.threshold, self.prototypes, self.m, self.target_recall = threshold, prototypes, m, target_recall
        self.review_band = review_band
        self.batch_size, self.workers, self.progress = batch_size, workers, progress
        self.follow_symlinks = follow_symlinks
        self._keep: tuple[list[Path], np.ndarray] | None = None
        self._reject: tuple[list[Path], np.ndarray] | None = None
        self._folders: dict[str, Path] = {}  # keep-like / reject-like: no incoming image may be an exemplar
        self._skipped: list = []

    def _embed(self, folder: str | os.PathLike):
        from .pipeline import embed_folder

        return embed_folder(folder, self.encoder, self.cache, self.batch_size, self.workers, self.progress,
                            follow_symlinks=self.follow_symlinks)

    def _embed_exemplars(self, folder: str | os.PathLike, role: str):
        result = self._embed(folder)
        if not result.paths:
            raise FilterkitError(f"none of the {role} images in {folder} could be decoded")
        return result

    def keep_like(self, folder: str | os.PathLike) -> ImageFilter:
        result = self._embed_exemplars(folder, "keep-like")
        self._keep = (result.paths, result.vectors)
        self._folders["keep-like"] = Path(folder)
        self._skipped += result.skipped
        return self

    def reject_like(self, folder: str | os.PathLike) -> ImageFilter:
        result = self._embed_exemplars(folder, "reject-like")
        self._reject = (result.paths, result.vectors)
        self._folders["reject-like"] = Path(folder)
        self._skipped += result.skipped
        return self

    def run(self, incoming: str | os.PathLike) -> FilterResult:
        if self._keep is None:
            raise FilterkitError("call keep_like(folder) before run()")
        from .fsutil import check_disjoint

        check_disjoint(("incoming", incoming), *self._folders.items())
        found = self._embed(incoming)
        # Through a followed symlink an exemplar folder can still lie inside the incoming one.
        roots = {label: Path(f).resolve() for label, f in self._folders.items()}
        for path in found.paths:
            real = Path(path).resolve()
            for label, root in roots.items():
                if real == root or root in real.parents:
                    raise FilterkitError(f"incoming image {path} is a {label} exemplar ({real}), reached through a "
                                         "symbolic link: give folders that do not contain each other")
        return filter_vectors(found.paths, found.vectors, *self._keep, *(self._reject or (None, None)),
                              threshold=self.threshold, prototypes=self.prototypes, m=self.m,
                              target_recall=self.target_recall, skipped=found.skipped,
                              skipped_exemplars=self._skipped, normalize=self.normalize,
                              review_band=self.review_band)


def parse_scoring(scoring: str) -> tuple[str, bool]:
    """"topm", "linear+knn"... -> (base scoring, smoothed over the kNN graph or not)."""
    base, plus, rest = scoring.partition("+")
    if base not in SCORINGS or (plus and rest != "knn"):
        raise FilterkitError(f"scoring must be one of {', '.join(SCORINGS)}, optionally with +knn "
                             f"(e.g. topm+knn), got {scoring!r}")
    return base, bool(plus)


def _check_review_band(band: float | str) -> None:
    if band == "auto":
        return
    if isinstance(band, bool) or not isinstance(band, (int, float)) or not band >= 0:
        raise FilterkitError(f"--review-band must be 'auto' or a score width >= 0 (0: no review), got {band!r}")


def filter_vectors(paths: list[Path], vectors: np.ndarray, keep_paths: list[Path], keep_vectors: np.ndarray,
                   reject_paths: list[Path] | None = None, reject_vectors: np.ndarray | None = None,
                   threshold: float | str = "auto", prototypes: int | None = None, m: int = DEFAULT_M,
                   target_recall: float = DEFAULT_TARGET_RECALL, skipped: list | None = None,
                   skipped_exemplars: list | None = None, normalize: str = DEFAULT_NORMALIZE,
                   target_precision: float | None = None, scoring: str = DEFAULT_SCORING,
                   review_band: float | str = "auto") -> FilterResult:
    """Score, calibrate and decide on vectors; ``skipped`` images become "error" decisions.

    ``normalize`` (see ``normalize.Normalizer``) is fitted on the incoming vectors and both
    exemplar sets together, and applied to all of them before any cosine. ``scoring``: see
    the module docstring; ``prototypes=K`` implies "prototypes". With "+knn" the exemplars'
    held-out scores used for the threshold are smoothed the same way, over their nearest
    incoming images, so threshold and scores stay comparable. ``linear`` and ``+knn`` are
    offered here only, for benchmarks/filter_quality.py: neither beat top-m beyond the spread
    over exemplar draws (benchmarks/README.md), so ImageFilter and the CLI do not take them.

    ``review_band="auto"``: the threshold's bootstrap spread, i.e. the standard deviation of
    the automatic threshold over ``BOOTSTRAP_RESAMPLES`` resamples (with replacement) of the
    exemplars' held-out scores: how far the threshold would move with another draw of as many
    exemplars. It is in score units, and exists for every scoring, with or without reject-like
    exemplars (a band from the pool mixture's posterior would exist only without them). A fixed
    threshold has no estimated error, so "auto" gives it no band; a number is used as given,
    0 disables review."""
    if threshold != "auto" and not np.isfinite(float(threshold)):
        raise FilterkitError(f"threshold must be 'auto' or a finite number, got {threshold!r}")
    _check_review_band(review_band)
    base, smooth = parse_scoring(scoring)
    if prototypes and base in ("topm", "topm-centroid"):
        base = "prototypes"
    if base == "prototypes":
        prototypes = prototypes or DEFAULT_PROTOTYPES
    elif prototypes:
        raise FilterkitError(f"prototypes=K goes with scoring 'prototypes' (or 'topm', 'topm-centroid'), not {scoring!r}")
    scoring = base + ("+knn" if smooth else "")
    if threshold != "auto" and base != "linear" and abs(float(threshold)) > 1:
        # cosine scores: such a threshold would keep every image, or none, without saying so
        raise FilterkitError(f"threshold {threshold} is outside [-1, 1], the range of {scoring!r} scores "
                             "(cosine similarities): give one inside it, or 'auto'")
    if prototypes and prototypes > len(keep_vectors):  # k-means needs a vector per prototype at least
        raise FilterkitError(f"--prototypes {prototypes} is more than the {len(keep_vectors)} keep-like exemplars "
                             f"that could be embedded: give --prototypes {len(keep_vectors)} or fewer, "
                             "or more keep-like exemplars")
    has_neg = reject_vectors is not None and len(reject_vectors) > 0
    if base == "linear" and not has_neg:
        raise FilterkitError("scoring 'linear' needs reject-like exemplars: a classifier "
                             "learns keep-like against reject-like")
    normalizer = Normalizer.fit(np.concatenate([v for v in (vectors, keep_vectors, reject_vectors)
                                                if v is not None and len(v)]), normalize)
    vectors, keep_vectors = normalizer(vectors), normalizer(keep_vectors)
    if has_neg:
        reject_vectors = normalizer(reject_vectors)
    protos = spherical_kmeans(keep_vectors, prototypes) if prototypes else None
    smooth = smooth and len(paths) >= 2

    against = centroid_scores if base == "topm-centroid" else exemplar_scores
    held_out = leave_one_out_centroid_scores if base == "topm-centroid" else leave_one_out_scores

    def keep_of(q: np.ndarray) -> Scores:
        return prototype_scores(q, protos) if prototypes else against(q, keep_vectors, m)

    def reject_of(q: np.ndarray) -> Scores:
        return against(q, reject_vectors, m)

    def smoothed(incoming: np.ndarray | None, held_out: np.ndarray | None = None,
                 exemplars: np.ndarray | None = None) -> np.ndarray | None:
        """``incoming`` scores over the incoming kNN graph; with ``held_out``: those exemplars'
        scores, smoothed over their nearest incoming images."""
        if not smooth or incoming is None:
            return incoming if held_out is None else held_out
        if held_out is None:
            return smooth_scores(incoming, neighbour_mean(incoming, vectors))
        return smooth_scores(held_out, neighbour_mean(incoming, vectors, exemplars))

    # Scores of the incoming images: keep (and reject, for topm/prototypes with negatives).
    keep = reject = None
    if len(paths):
        if base == "linear":
            keep = linear_scores(vectors, keep_vectors, reject_vectors)
        else:
            keep = keep_of(vectors).values
            reject = reject_of(vectors).values if has_neg else None
    keep_s, reject_s = smoothed(keep), smoothed(reject)  # what is decided on

    calibrated = Threshold(float(threshold), "fixed") if threshold != "auto" else None
    if calibrated is None:
        # Held-out scores of the exemplars: each scored without itself.
        pos_reject = neg_keep = neg_reject = value = None
        if base == "linear":
            pos_keep, neg_keep = held_out_linear_scores(keep_vectors, reject_vectors)
            pos_keep, neg_keep = smoothed(keep, pos_keep, keep_vectors), smoothed(keep, neg_keep, reject_vectors)
        else:
            pos_keep = (held_out_prototype_scores(keep_vectors, prototypes) if prototypes
                        else held_out(keep_vectors, m))
            pos_keep = smoothed(keep, pos_keep, keep_vectors)
            if has_neg:
                pos_reject = smoothed(reject, reject_of(keep_vectors).values, keep_vectors)
                neg_keep = smoothed(keep, keep_of(reject_vectors).values, reject_vectors)
                neg_reject = (held_out(reject_vectors, m) if len(reject_vectors) > 1
                              else np.full(len(reject_vectors), -np.inf, dtype=np.float32))
                neg_reject = smoothed(reject, neg_reject, reject_vectors)
        pool = keep_s
        if not has_neg and pool is not None and len(pos_keep) >= POOL_MIN_EXEMPLARS and len(pool) >= POOL_MIN:
            # The pool itself tells how many are keep-like, so precision can be stated too.
            def calibrate(pk):
                return pool_threshold(pool, pk, target_recall, target_precision)

            def value(pk):  # the same threshold without the mixture where it does not need it
                return (pool_recall_threshold(pk, target_recall) if target_precision is None
                        else pool_threshold(pool, pk, target_recall, target_precision, resamples=0).value)

            groups = [(pos_keep,)]
        elif has_neg:
            def calibrate(pk, pr, nk, nr):
                return auto_threshold(pk, pr, nk, nr, target_recall)

            groups = [(pos_keep, pos_reject), (neg_keep, neg_reject)]
        else:
            def calibrate(pk):
                return auto_threshold(pk, target_recall=target_recall)

            groups = [(pos_keep,)]
        calibrated = calibrate(*[a for g in groups for a in g])
        if has_neg and pool is not None and len(pool):
            calibrated = negatives_pool_threshold(calibrated, (pool, reject_s), (pos_keep, pos_reject),
                                                  (neg_keep, neg_reject))
        if value is None:  # not the pool mixture's threshold, which states its own recall
            calibrated = replace(calibrated, est_recall=rule_recall(calibrated.value, pos_keep, pos_reject))
        if len(pos_keep) < RECALL_MIN_EXEMPLARS:
            # Their held-out scores made the threshold: each one passes it by construction. A precision
            # would rest on the same rate (tpr), so it goes too.
            few = (f"{len(pos_keep)} keep-like exemplars are too few to tell how many new keep-like images "
                   f"would pass (give {RECALL_MIN_EXEMPLARS} or more)")
            calibrated = replace(calibrated, est_recall=None, recall_note=f"recall not stated: {few}")
            if calibrated.est_precision is not None:
                calibrated = replace(calibrated, est_precision=None, est_prevalence=None, precision_interval=None,
                                     prevalence_interval=None, precision_note=f"precision not stated: {few}")
    if review_band == "auto":  # a fixed threshold has no estimated error: no band
        band = 0.0
        if calibrated.source == "auto":
            band = threshold_spread(value or (lambda *arrays: calibrate(*arrays).value), groups)
        source = "bootstrap" if band > 0 else None
    else:
        band, source = float(review_band), "given" if review_band > 0 else None
    calibrated = replace(calibrated, review_band=band, review_source=source)

    decisions = []
    if len(paths):
        # The nearest *exemplar* explains a decision whatever was scored against.
        nearest = exemplar_scores(vectors, keep_vectors, 1).nearest
        nearest_reject = reject_of(vectors).nearest if has_neg else None
        via = None
        if prototypes:
            via = [f"prototype {i}" for i in keep_of(vectors).nearest]
        elif base == "linear":
            via = ["classifier"] * len(paths)
        if smooth:
            via = [f"{v}, kNN-smoothed" for v in via] if via else ["kNN-smoothed"] * len(paths)
        decisions = decide(
            paths, keep_s, [keep_paths[i] for i in nearest], calibrated.value, reject_s,
            [reject_paths[i] for i in nearest_reject] if has_neg and base != "linear" else None, via, band)
    for s in skipped or []:
        decisions.append(Decision(s.path, "error", None, None, None, None, None, s.reason))
    return FilterResult(decisions, calibrated, len(keep_vectors), len(reject_vectors) if has_neg else 0,
                        prototypes, list(skipped_exemplars or []), normalizer, scoring)
