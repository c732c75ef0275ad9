"""Keep-like / reject-like filtering: scores against exemplar sets or prototypes, threshold
calibration from the exemplars themselves, and a decision with its reason for every image.

Scores (cosine similarity of unit vectors):
- against an exemplar set: the mean of the m largest similarities (m = min(3, #exemplars));
- against prototypes (spherical k-means of the exemplars): the largest similarity.
An image is kept when its keep-like score reaches the threshold and is strictly higher than
its reject-like score (a tie goes to reject).

The array-level functions take and return numpy arrays, so they work on vectors from
anywhere; :class:`ImageFilter` wires them to folders, the encoder and the cache.

    >>> result = ImageFilter(Encoder.load("models/x")).keep_like("exemplars").run("incoming")
    >>> [(d.path, d.decision, d.reason) for d in result.decisions]
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
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
# Centring measured best (benchmarks/README.md, filter_quality.py on Imagenette, shipped model):
# keep-like AUROC 0.762 +- 0.004 over 3 exemplar draws vs 0.677 raw and 0.736 whitened; "auto"
# centres collections of 64 vectors and more (normalize.AUTO_CENTER_MIN).
DEFAULT_NORMALIZE = "auto"
_FOLDS = 5  # cross-fitting folds for prototype scores of the exemplars themselves


@dataclass(frozen=True)
class Scores:
    """Score of each query against one reference set, and which reference was nearest."""

    values: np.ndarray  # [Q] float32
    nearest: np.ndarray  # [Q] int64 row of the nearest exemplar (or prototype)


@dataclass(frozen=True)
class Threshold:
    value: float
    source: str  # "fixed" or "auto"
    est_recall: float | None = None  # of the keep-like exemplars, leave-one-out
    est_precision: float | None = None  # at equal prevalence of keep-like and reject-like images
    target_recall: float | None = None
    # Without reject-like exemplars: the share of the incoming pool estimated to be keep-like, and
    # est_precision is then the pool's (see pool_threshold), not one at equal prevalence.
    est_prevalence: float | None = None
    target_precision: float | None = None

    def describe(self) -> str:
        """'0.812 auto (calibrated on the exemplars: est. recall 0.95, ...)'."""
        text = f"{self.value:.3f} {self.source}"
        if self.est_prevalence is not None:
            text += (f" (calibrated on the exemplars and the incoming pool: est. {self.est_prevalence:.0%} of it "
                     f"keep-like; est. recall {self.est_recall:.2f}, est. precision {self.est_precision:.2f})")
        elif self.est_recall is not None:
            text += f" (calibrated on the exemplars: est. recall {self.est_recall:.2f}"
            if self.est_precision is not None:
                text += f", est. precision {self.est_precision:.2f} at equal prevalence"
            text += ")"
        return text


@dataclass(frozen=True)
class Decision:
    path: Path
    decision: str  # "keep" | "reject" | "error"
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

    def categories(self) -> list[tuple[Path, str]]:
        """(image, "kept" | "rejected") for file actions; images that failed stay where they are."""
        return [(d.path, "kept" if d.decision == "keep" else "rejected")
                for d in self.decisions if d.decision != "error"]

    def counts(self) -> dict[str, int]:
        out = {"keep": 0, "reject": 0, "error": 0}
        for d in self.decisions:
            out[d.decision] += 1
        return out

    def summary(self) -> dict:
        t = self.threshold
        return {**self.counts(), "threshold": round(t.value, 6), "threshold_source": t.source,
                "est_recall": t.est_recall, "est_precision": t.est_precision, "est_prevalence": t.est_prevalence,
                "target_recall": t.target_recall, "target_precision": t.target_precision, "exemplars": self.exemplars,
                "negatives": self.negatives, "prototypes": self.prototypes,
                "normalize": self.normalizer.to_dict() if self.normalizer else None,
                "skipped_exemplars": [s.to_dict() for s in self.skipped_exemplars]}

    def summary_line(self) -> str:
        c = self.counts()
        similarity = f"; {self.normalizer.describe()}" if self.normalizer else ""
        return (f"kept {c['keep']}, rejected {c['reject']}, errors {c['error']}; "
                f"threshold {self.threshold.describe()}{similarity}")

    def to_dict(self) -> dict:
        return {"images": [d.to_dict() for d in self.decisions], "summary": self.summary()}


# -- scores --------------------------------------------------------------------------------------
def exemplar_scores(queries: np.ndarray, exemplars: np.ndarray, m: int = DEFAULT_M) -> Scores:
    """Mean of each query's m largest cosine similarities to ``exemplars``."""
    if len(exemplars) == 0:
        raise FilterkitError("no exemplar vectors to score against")
    m = max(1, min(m, len(exemplars)))
    found = search(build_index(exemplars), queries, m)
    return Scores(found.scores.mean(axis=1).astype(np.float32), found.ids[:, 0].astype(np.int64))


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
    """The incoming pool's keep scores as a mixture of two normal distributions: the keep-like
    images', fitted to the exemplars' held-out scores and kept fixed, and the others', fitted
    with the prevalence by EM on the pool itself."""

    prevalence: float
    pos_mean: float
    pos_std: float
    neg_mean: float
    neg_std: float

    def recall(self, t: np.ndarray | float) -> np.ndarray:
        """P(score >= t) for a keep-like image."""
        from scipy.special import ndtr

        return ndtr((self.pos_mean - np.asarray(t, dtype=np.float64)) / self.pos_std)


def fit_pool(pool: np.ndarray, positives: np.ndarray, iterations: int = 200) -> PoolModel:
    """EM for the prevalence and the other images' normal, the positives' normal fixed."""
    from scipy.stats import norm

    pool, positives = np.asarray(pool, np.float64), np.asarray(positives, np.float64)
    spread = max(float(pool.std()), 1e-4)
    mu_p, sd_p = float(positives.mean()), max(float(positives.std(ddof=1)) if len(positives) > 1 else spread, 1e-4)
    pi, mu_n, sd_n = 0.1, float(pool.mean()), spread
    p_pos = norm.pdf(pool, mu_p, sd_p)
    for _ in range(iterations):
        weighted = pi * p_pos
        r = weighted / np.maximum(weighted + (1 - pi) * norm.pdf(pool, mu_n, sd_n), 1e-300)
        pi = float(np.clip(r.mean(), 1e-4, 1 - 1e-4))
        w = 1 - r
        mu_n = float((w * pool).sum() / w.sum())
        sd_n = max(float(np.sqrt((w * (pool - mu_n) ** 2).sum() / w.sum())), 1e-4)
    return PoolModel(pi, mu_p, sd_p, mu_n, sd_n)


def pool_threshold(pool: np.ndarray, positives: np.ndarray, target_recall: float = DEFAULT_TARGET_RECALL,
                   target_precision: float | None = None) -> Threshold:
    """The threshold for a target, with the recall and precision it is estimated to give on
    this pool (no reject-like exemplars needed).

    recall(t) = P(positive score >= t) under the positives' normal; precision(t) =
    prevalence x recall(t) / (share of the pool scoring >= t, as observed). With
    ``target_precision``: the lowest threshold estimated to reach it (the most recall);
    else the highest threshold whose estimated recall reaches ``target_recall``.

    Measured (benchmarks/README.md): at recall 0.95 the stated recall is within 0.04 of the
    true one and the stated precision within 0.12 on average; at a precision target of 0.5 the
    stated precision is 0.18 too high, so the CLI does not offer a precision target yet.
    """
    from scipy.stats import norm

    pool = np.asarray(pool, np.float64)
    model = fit_pool(pool, positives)

    def precision(t: float) -> float:
        share = float((pool >= t).mean())
        return 1.0 if share == 0 else float(min(1.0, model.prevalence * model.recall(t) / share))

    if target_precision is not None:
        candidates = np.unique(pool)
        ok = [t for t in candidates if precision(float(t)) >= target_precision]
        t = float(min(ok)) if ok else float(candidates.max())
    else:
        t = float(norm.ppf(1.0 - target_recall, model.pos_mean, model.pos_std))
    return Threshold(t, "auto", est_recall=float(model.recall(t)), est_precision=precision(t),
                     target_recall=None if target_precision is not None else target_recall,
                     est_prevalence=model.prevalence, target_precision=target_precision)


# -- decisions -----------------------------------------------------------------------------------
def decide(paths: list[Path], keep: np.ndarray, nearest: list[Path], threshold: float,
           reject: np.ndarray | None = None, nearest_reject: list[Path] | None = None,
           via: list[str] | None = None) -> list[Decision]:
    """One Decision per path, with its reason. ``keep``/``reject`` are the scores,
    ``nearest``/``nearest_reject`` the closest exemplar of each set, ``via`` optional words on
    what was scored against (e.g. "prototype 3")."""
    out = []
    for i, path in enumerate(paths):
        score, near = float(keep[i]), nearest[i]
        rscore = float(reject[i]) if reject is not None else None
        rnear = nearest_reject[i] if nearest_reject is not None else None
        against = f" ({via[i]})" if via else ""
        if score < threshold:
            decision, reason = "reject", f"score {score:.3f}{against} is below the threshold {threshold:.3f}"
        elif rscore is not None and rscore >= score:
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
                 normalize: str = DEFAULT_NORMALIZE) -> None:
        if threshold != "auto" and not isinstance(threshold, (int, float)):
            raise FilterkitError(f"threshold must be 'auto' or a number, got {threshold!r}")
        self.encoder, self.cache, self.normalize = encoder, cache, normalize
        self.threshold, self.prototypes, self.m, self.target_recall = threshold, prototypes, m, target_recall
        self.batch_size, self.workers, self.progress = batch_size, workers, progress
        self.follow_symlinks = follow_symlinks
        self._keep: tuple[list[Path], np.ndarray] | None = None
        self._reject: tuple[list[Path], np.ndarray] | None = None
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
        self._skipped += result.skipped
        return self

    def reject_like(self, folder: str | os.PathLike) -> ImageFilter:
        result = self._embed_exemplars(folder, "reject-like")
        self._reject = (result.paths, result.vectors)
        self._skipped += result.skipped
        return self

    def run(self, incoming: str | os.PathLike) -> FilterResult:
        if self._keep is None:
            raise FilterkitError("call keep_like(folder) before run()")
        found = self._embed(incoming)
        return filter_vectors(found.paths, found.vectors, *self._keep, *(self._reject or (None, None)),
                              threshold=self.threshold, prototypes=self.prototypes, m=self.m,
                              target_recall=self.target_recall, skipped=found.skipped,
                              skipped_exemplars=self._skipped, normalize=self.normalize)


def filter_vectors(paths: list[Path], vectors: np.ndarray, keep_paths: list[Path], keep_vectors: np.ndarray,
                   reject_paths: list[Path] | None = None, reject_vectors: np.ndarray | None = None,
                   threshold: float | str = "auto", prototypes: int | None = None, m: int = DEFAULT_M,
                   target_recall: float = DEFAULT_TARGET_RECALL, skipped: list | None = None,
                   skipped_exemplars: list | None = None, normalize: str = DEFAULT_NORMALIZE,
                   target_precision: float | None = None) -> FilterResult:
    """Score, calibrate and decide on vectors; ``skipped`` images become "error" decisions.

    ``normalize`` (see ``normalize.Normalizer``) is fitted on the incoming vectors and both
    exemplar sets together, and applied to all of them before any cosine."""
    has_neg = reject_vectors is not None and len(reject_vectors) > 0
    normalizer = Normalizer.fit(np.concatenate([v for v in (vectors, keep_vectors, reject_vectors)
                                                if v is not None and len(v)]), normalize)
    vectors, keep_vectors = normalizer(vectors), normalizer(keep_vectors)
    if has_neg:
        reject_vectors = normalizer(reject_vectors)
    protos = spherical_kmeans(keep_vectors, prototypes) if prototypes else None

    def keep_of(q: np.ndarray) -> Scores:
        return prototype_scores(q, protos) if prototypes else exemplar_scores(q, keep_vectors, m)

    def reject_of(q: np.ndarray) -> Scores:
        return exemplar_scores(q, reject_vectors, m)

    keep = keep_of(vectors) if len(paths) else None
    if threshold == "auto":
        pos_keep = (held_out_prototype_scores(keep_vectors, prototypes) if prototypes
                    else leave_one_out_scores(keep_vectors, m))
        pos_reject = neg_keep = neg_reject = None
        if not has_neg and keep is not None and len(pos_keep) >= POOL_MIN_EXEMPLARS and len(keep.values) >= POOL_MIN:
            # The pool itself tells how many are keep-like, so precision can be stated too.
            calibrated = pool_threshold(keep.values, pos_keep, target_recall, target_precision)
        elif has_neg:
            pos_reject = reject_of(keep_vectors).values
            neg_keep = keep_of(reject_vectors).values
            neg_reject = (leave_one_out_scores(reject_vectors, m) if len(reject_vectors) > 1
                          else np.full(len(reject_vectors), -np.inf, dtype=np.float32))
            calibrated = auto_threshold(pos_keep, pos_reject, neg_keep, neg_reject, target_recall)
        else:
            calibrated = auto_threshold(pos_keep, target_recall=target_recall)
    else:
        calibrated = Threshold(float(threshold), "fixed")

    decisions = []
    if len(paths):
        # The nearest *exemplar* explains a decision even when scoring used prototypes.
        nearest = keep if not prototypes else exemplar_scores(vectors, keep_vectors, 1)
        rej = reject_of(vectors) if has_neg else None
        decisions = decide(
            paths, keep.values, [keep_paths[i] for i in nearest.nearest], calibrated.value,
            rej.values if rej else None, [reject_paths[i] for i in rej.nearest] if rej else None,
            [f"prototype {i}" for i in keep.nearest] if prototypes else None)
    for s in skipped or []:
        decisions.append(Decision(s.path, "error", None, None, None, None, None, s.reason))
    return FilterResult(decisions, calibrated, len(keep_vectors), len(reject_vectors) if has_neg else 0,
                        prototypes, list(skipped_exemplars or []), normalizer)
