import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import sample_photo
from filterkit import FilterkitError
from filterkit.cli import main
from filterkit.filtering import auto_threshold, exemplar_scores, filter_vectors, leave_one_out_scores, spherical_kmeans


def unit(*rows):
    a = np.asarray(rows, dtype=np.float32)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_scores_are_the_mean_of_the_top_m_similarities():
    exemplars = unit([1, 0], [0.8, 0.6], [0, 1], [-1, 0])
    scores = exemplar_scores(unit([1, 0]), exemplars, m=3)
    assert scores.values[0] == pytest.approx((1.0 + 0.8 + 0.0) / 3, abs=1e-6)
    assert scores.nearest[0] == 0
    assert exemplar_scores(unit([1, 0]), exemplars[:2], m=3).values[0] == pytest.approx(0.9, abs=1e-6)


def test_keep_reject_and_a_tie_goes_to_reject():
    keep = unit([1, 0], [0.99, 0.14])
    neg = unit([0, 1], [0.14, 0.99])
    incoming = unit([1, 0.05], [0.05, 1], [1, 1])  # like keep, like reject, exactly between
    paths = [Path("a.jpg"), Path("b.jpg"), Path("tie.jpg")]
    result = filter_vectors(paths, incoming, [Path("k1"), Path("k2")], keep, [Path("n1"), Path("n2")], neg,
                            threshold=0.3, m=1)
    got = {d.path.name: d for d in result.decisions}
    assert got["a.jpg"].decision == "keep" and got["a.jpg"].nearest_exemplar == Path("k1")
    assert got["b.jpg"].decision == "reject" and "below the threshold" in got["b.jpg"].reason
    tie = got["tie.jpg"]
    assert tie.score == pytest.approx(tie.reject_score, abs=1e-6)
    assert tie.decision == "reject" and "more like reject-like" in tie.reason
    assert all(d.threshold == pytest.approx(0.3) for d in result.decisions)


def test_auto_threshold_without_negatives_keeps_the_target_recall():
    positives = np.linspace(0.5, 0.9, 101)
    t = auto_threshold(positives, target_recall=0.95)
    assert t.value == pytest.approx(0.52, abs=1e-9)  # the 5th percentile
    assert t.est_recall == pytest.approx(96 / 101)
    assert t.est_precision is None


def test_auto_threshold_with_negatives_separates_the_distributions():
    rng = np.random.default_rng(0)
    pos_keep, neg_keep = rng.normal(0.8, 0.03, 50), rng.normal(0.4, 0.03, 50)
    t = auto_threshold(pos_keep, np.full(50, 0.2), neg_keep, np.full(50, 0.9))
    assert neg_keep.max() < t.value <= pos_keep.min()
    assert (t.est_recall, t.est_precision) == (1.0, 1.0)
    # Overlapping distributions: an honest estimate below 1.
    t = auto_threshold(rng.normal(0.6, 0.1, 200), None, rng.normal(0.5, 0.1, 200), None)
    assert 0.5 < t.est_precision < 1.0 and 0.0 < t.est_recall < 1.0


def test_leave_one_out_never_scores_an_exemplar_against_itself():
    exemplars = unit([1, 0], [1, 0], [0, 1])  # an exact duplicate pair
    scores = leave_one_out_scores(exemplars, m=1)
    np.testing.assert_allclose(scores, [1.0, 1.0, 0.0], atol=1e-6)
    with pytest.raises(FilterkitError, match="at least two"):
        leave_one_out_scores(exemplars[:1])


def test_prototypes_find_the_clusters_of_the_exemplars():
    rng = np.random.default_rng(0)
    centres = unit([1, 0, 0], [0, 0, 1])
    exemplars = np.concatenate([c + 0.05 * rng.normal(size=(20, 3)) for c in centres]).astype(np.float32)
    exemplars /= np.linalg.norm(exemplars, axis=1, keepdims=True)
    protos = spherical_kmeans(exemplars, 2)
    assert np.allclose(np.linalg.norm(protos, axis=1), 1, atol=1e-5)
    assert sorted(np.round(np.max(protos @ centres.T, axis=0), 2)) == [1.0, 1.0]
    paths = [Path(f"e{i}") for i in range(40)]
    result = filter_vectors([Path("x"), Path("y")], unit([1, 0.02, 0], [0, 1, 0]), paths, exemplars,
                            threshold="auto", prototypes=2)
    decisions = {d.path.name: d for d in result.decisions}
    assert decisions["x"].decision == "keep" and "prototype" in decisions["x"].reason
    assert decisions["x"].nearest_exemplar in paths[:20]
    assert decisions["y"].decision == "reject"
    assert result.threshold.source == "auto" and result.threshold.est_recall >= 0.9


def _photo_folders(root: Path):
    cat = sample_photo("chelsea")
    (root / "exemplars").mkdir(parents=True)
    (root / "incoming").mkdir()
    for i, box in enumerate([(0, 0, 400, 280), (40, 10, 451, 300), (20, 20, 420, 290), (10, 0, 430, 270)]):
        cat.crop(box).save(root / "exemplars" / f"cat{i}.jpg", quality=90)
    cat.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((300, 200)).save(root / "incoming" / "cat_copy.jpg")
    for name in ("astronaut", "coffee", "rocket", "hubble_deep_field"):
        im = sample_photo(name)
        im.thumbnail((300, 300))
        im.save(root / "incoming" / f"{name}.jpg")
    (root / "incoming" / "broken.jpg").write_bytes(b"nope")


def test_filter_cli_json_explains_every_decision(tmp_path, capsys, small_model_dir):
    _photo_folders(tmp_path)
    code = main(["filter", str(tmp_path / "incoming"), "--keep-like", str(tmp_path / "exemplars"),
                 "--model", str(small_model_dir), "--json", "-q", "--workers", "0"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    by_name = {Path(d["path"]).name: d for d in out["images"]}
    assert by_name["cat_copy.jpg"]["decision"] == "keep"
    assert by_name["broken.jpg"]["decision"] == "error" and "not an image" in by_name["broken.jpg"]["reason"]
    for d in out["images"]:
        assert set(d) >= {"path", "decision", "score", "reject_score", "nearest_exemplar", "threshold", "reason"}
    summary = out["summary"]
    assert summary["threshold_source"] == "auto" and summary["exemplars"] == 4
    assert summary["keep"] + summary["reject"] + summary["error"] == 6


def test_filter_cli_errors(tmp_path, capsys, small_model_dir):
    (tmp_path / "empty").mkdir()
    _photo_folders(tmp_path)
    code = main(["filter", str(tmp_path / "incoming"), "--keep-like", str(tmp_path / "empty"),
                 "--model", str(small_model_dir), "-q"])
    assert code == 1 and "no images found" in capsys.readouterr().err
    code = main(["filter", str(tmp_path / "incoming"), "--keep-like", str(tmp_path / "exemplars"),
                 "--threshold", "high", "--model", str(small_model_dir), "-q"])
    assert code == 1 and "--threshold must be" in capsys.readouterr().err
    code = main(["filter", str(tmp_path / "empty"), "--keep-like", str(tmp_path / "exemplars"),
                 "--model", str(small_model_dir), "-q"])
    assert code == 1 and "no images found in" in capsys.readouterr().err
    code = main(["filter", str(tmp_path / "incoming"), "--keep-like", str(tmp_path / "exemplars"),
                 "--model", str(tmp_path / "exemplars"), "-q"])
    assert code == 1 and "not a filterkit model directory" in capsys.readouterr().err
    code = main(["filter", str(tmp_path / "incoming"), "--keep-like", str(tmp_path / "exemplars"),
                 "--prototypes", "50", "--model", str(small_model_dir), "-q"])
    assert code == 1 and ("--prototypes 50 is more than the 4 keep-like exemplars that could be embedded: "
                          "give --prototypes 4 or fewer, or more keep-like exemplars") in capsys.readouterr().err


def test_scores_are_cosines_after_the_normaliser_fitted_on_exemplars_and_incoming():
    from filterkit.filtering import filter_vectors
    from filterkit.normalize import Normalizer

    rng = np.random.default_rng(0)
    common = np.eye(8, dtype=np.float32)[0] * 5  # a direction every vector shares
    incoming = rng.normal(size=(70, 8)).astype(np.float32) + common
    exemplars = rng.normal(size=(6, 8)).astype(np.float32) + common
    paths = [Path(f"in{i}.jpg") for i in range(len(incoming))]
    ex_paths = [Path(f"ex{i}.jpg") for i in range(len(exemplars))]
    for kind, expected_kind in (("auto", "center"), ("none", "none"), ("whiten", "whiten")):
        result = filter_vectors(paths, incoming, ex_paths, exemplars, threshold=0.0, normalize=kind)
        norm = Normalizer.fit(np.concatenate([incoming, exemplars]), kind)
        sims = norm(incoming) @ norm(exemplars).T
        centre = norm(exemplars).mean(axis=0)
        # the default scoring: 0.75 x the mean of the top 3 + 0.25 x the cosine to the exemplars' mean direction
        expected = (0.75 * np.sort(sims, axis=1)[:, -3:].mean(axis=1)
                    + 0.25 * norm(incoming) @ (centre / np.linalg.norm(centre)))
        assert np.allclose([d.score for d in result.decisions], expected, atol=1e-5)
        assert result.summary()["normalize"]["kind"] == expected_kind
        assert result.summary()["normalize"]["fitted_on"] == 76
    # Raw cosines of vectors sharing a large component are all high; centred ones are not.
    raw = filter_vectors(paths, incoming, ex_paths, exemplars, threshold=0.0, normalize="none")
    centred = filter_vectors(paths, incoming, ex_paths, exemplars, threshold=0.0, normalize="center")
    assert min(d.score for d in raw.decisions) > 0.7
    assert np.mean([d.score for d in centred.decisions]) < 0.5
    assert "centred on 76 vectors" in centred.summary_line()


def test_the_pool_mixture_recovers_the_prevalence_and_its_estimates_equal_their_formulas():
    from scipy.stats import norm
    from scipy.stats import t as student

    from filterkit.filtering import PRECISION_LEVEL, bootstrap_pool, fit_pool, pool_precision, pool_threshold

    rng = np.random.default_rng(0)
    pool = np.concatenate([rng.normal(0.6, 0.05, 200), rng.normal(0.2, 0.1, 800)])  # 20 % keep-like
    held_out = rng.normal(0.6, 0.05, 16)  # the exemplars' leave-one-out scores
    model = fit_pool(pool, held_out)
    assert model.prevalence == pytest.approx(0.2, abs=0.03) and model.consistent()
    assert (model.pos_mean, model.pos_std) == (pytest.approx(held_out.mean()), pytest.approx(held_out.std(ddof=1)))
    t = pool_threshold(pool, held_out, target_recall=0.9)
    # The prediction quantile of a new score: Student-t of 15 df, scaled by sqrt(1 + 1/16).
    assert t.value == pytest.approx(model.pos_mean + student.ppf(0.1, 15) * model.pos_std * np.sqrt(1 + 1 / 16))
    assert t.value < norm.ppf(0.1, model.pos_mean, model.pos_std)  # below the plug-in normal's
    assert t.est_recall == pytest.approx(0.9)
    assert t.est_prevalence == pytest.approx(model.prevalence)
    share = (pool >= t.value).mean()
    assert t.est_precision == pytest.approx(min(1.0, model.prevalence * 0.9 / share))
    # The interval: quantiles of the same formula over the bootstrap refits.
    pi, mu, sd = bootstrap_pool(pool, held_out)
    per_resample = np.minimum(1.0, pi * student.cdf((mu - t.value) / sd / np.sqrt(1 + 1 / 16), 15) / share)
    tails = [(1 - PRECISION_LEVEL) / 2, (1 + PRECISION_LEVEL) / 2]
    assert t.precision_interval == pytest.approx(tuple(np.quantile(per_resample, tails)))
    np.testing.assert_allclose(pool_precision(pi, mu, sd, pool, t.value, 16), per_resample)
    true_precision = (pool[:200] >= t.value).sum() / (pool >= t.value).sum()
    assert abs(t.est_precision - true_precision) < 0.05
    lo, hi = t.precision_interval
    assert lo <= true_precision <= hi and t.precision_note is None
    strict = pool_threshold(pool, held_out, target_precision=0.99)
    # Well-separated populations: precision 0.99 is reached below the recall-0.9 threshold.
    assert strict.est_precision >= 0.99 and strict.value < t.value and strict.est_recall > 0.99


def test_the_chosen_precision_threshold_meets_its_estimate_formula():
    from filterkit.filtering import fit_pool, pool_precision, pool_threshold

    rng = np.random.default_rng(3)
    pool = np.concatenate([rng.normal(0.7, 0.08, 150), rng.normal(0.3, 0.1, 850)])
    held_out = rng.normal(0.7, 0.08, 16)
    model = fit_pool(pool, held_out)
    t = pool_threshold(pool, held_out, target_precision=0.9, resamples=0)
    def formula(v):
        return float(pool_precision(model.prevalence, model.pos_mean, model.pos_std, pool, v, 16))

    assert formula(t.value) >= 0.9 and t.est_precision == pytest.approx(formula(t.value))
    # The lowest pool score that meets the target: the next lower one does not.
    below = pool[pool < t.value].max()
    assert formula(below) < 0.9


def _pool_draw(seed, separation, prevalence=0.1, n=500, skewed=False):
    """Synthetic keep scores: keep-like N(0.3 + 0.1 d', 0.1), the others N(0.3, 0.1) or a
    skew-normal (shape 5) with the same mean and std; 16 exemplars from the keep-like normal."""
    from scipy.stats import skewnorm

    rng = np.random.default_rng(seed)
    k = int(prevalence * n)
    if skewed:
        d = skewnorm(5)
        neg = 0.3 + 0.1 * (d.rvs(n - k, random_state=rng) - d.mean()) / d.std()
    else:
        neg = rng.normal(0.3, 0.1, n - k)
    pool = np.concatenate([rng.normal(0.3 + 0.1 * separation, 0.1, k), neg])
    return pool, np.arange(n) < k, rng.normal(0.3 + 0.1 * separation, 0.1, 16)


def test_the_stated_pool_precision_lands_near_the_truth_on_a_known_mixture():
    from filterkit.filtering import pool_threshold

    for seed in range(3):
        pool, truth, held_out = _pool_draw(seed, separation=5, prevalence=0.3)
        t = pool_threshold(pool, held_out)
        kept = pool >= t.value
        true_precision = (kept & truth).sum() / kept.sum()
        assert t.est_precision is not None and abs(t.est_precision - true_precision) < 0.05
        assert t.precision_interval[0] <= true_precision <= t.precision_interval[1]


def test_precision_is_withheld_when_the_mixture_is_poorly_identified():
    from filterkit.filtering import pool_threshold

    # Overlapping populations, as the shipped model's scores on Imagenette (d' about 1).
    pool, _, held_out = _pool_draw(0, separation=1)
    t = pool_threshold(pool, held_out)
    assert t.est_precision is None and t.est_prevalence is None and t.est_recall is not None
    assert "precision not stated" in t.precision_note and "precision not stated" in t.describe()
    # The others' scores with a heavier upper tail than the model's normal.
    pool, _, held_out = _pool_draw(1, separation=2, skewed=True)
    assert pool_threshold(pool, held_out).est_precision is None


def test_precision_is_stated_without_negatives_only_when_the_pool_can_be_fitted():
    from filterkit.filtering import POOL_MIN, POOL_MIN_EXEMPLARS, filter_vectors

    rng = np.random.default_rng(1)
    dim = 16
    centre = np.eye(dim, dtype=np.float32)[3] * 3
    keep_like = rng.normal(size=(20, dim)).astype(np.float32) + centre
    others = rng.normal(size=(80, dim)).astype(np.float32)
    incoming = np.concatenate([keep_like, others])
    exemplars = rng.normal(size=(POOL_MIN_EXEMPLARS, dim)).astype(np.float32) + centre
    paths = [Path(f"{i}.jpg") for i in range(len(incoming))]
    ex_paths = [Path(f"ex{i}.jpg") for i in range(len(exemplars))]
    stated = filter_vectors(paths, incoming, ex_paths, exemplars).threshold
    # Stated, or withheld with the reason: never neither.
    assert stated.precision_interval is not None
    if stated.est_precision is None:
        assert "precision not stated" in stated.describe()
    else:
        assert stated.est_prevalence == pytest.approx(0.2, abs=0.1) and "keep-like" in stated.describe()
    few = filter_vectors(paths[:POOL_MIN - 1], incoming[:POOL_MIN - 1], ex_paths, exemplars).threshold
    too_few_exemplars = filter_vectors(paths, incoming, ex_paths[:2], exemplars[:2]).threshold
    for t in (few, too_few_exemplars):
        assert t.est_prevalence is None and t.est_precision is None
        assert t.precision_interval is None
    assert few.est_recall is not None
    # Two exemplars: the threshold is their one cosine, which both pass by construction: no recall stated.
    assert too_few_exemplars.est_recall is None and "recall not stated: 2 keep-like" in too_few_exemplars.describe()


def test_the_cli_and_the_library_default_to_the_same_normaliser():
    import inspect

    from filterkit.cli.collection import filter_command
    from filterkit.filtering import DEFAULT_NORMALIZE, ImageFilter

    assert inspect.signature(filter_command).parameters["normalize"].default == DEFAULT_NORMALIZE
    assert inspect.signature(ImageFilter).parameters["normalize"].default == DEFAULT_NORMALIZE


# -- review band, linear classifier, kNN smoothing ---------------------------------------------------
def _line(scores):
    """Unit vectors whose top-1 cosine with the exemplar [1, 0] is exactly each score."""
    return unit(*[[s, np.sqrt(1 - s * s)] for s in scores])


def test_a_threshold_outside_the_cosine_range_is_refused_but_not_for_a_classifier_s_scores():
    paths = [Path("a.jpg"), Path("b.jpg")]
    incoming = _line([0.9, 0.1])
    with pytest.raises(FilterkitError, match=r"threshold 1.5 is outside \[-1, 1\]"):
        filter_vectors(paths, incoming, [Path("ex.jpg")], unit([1, 0]), threshold=1.5, m=1, normalize="none")
    keep, reject = _line([0.9, 0.95]), _line([0.05, 0.1])
    result = filter_vectors(paths, incoming, [Path("k1.jpg"), Path("k2.jpg")], keep, threshold=1.5,
                            reject_paths=[Path("r1.jpg"), Path("r2.jpg")], reject_vectors=reject, scoring="linear",
                            normalize="none", review_band=0)
    assert [d.decision for d in result.decisions] == ["keep" if d.score >= 1.5 else "reject" for d in result.decisions]


def test_review_goes_to_scores_within_the_band_of_the_threshold():
    paths = [Path("far_above.jpg"), Path("at.jpg"), Path("just_below.jpg"), Path("far_below.jpg")]
    incoming = _line([0.95, 0.5, 0.47, 0.1])
    result = filter_vectors(paths, incoming, [Path("ex.jpg")], unit([1, 0]), threshold=0.5, m=1,
                            normalize="none", review_band=0.05)
    got = {d.path.name: d for d in result.decisions}
    assert [got[n].decision for n in ("far_above.jpg", "at.jpg", "just_below.jpg", "far_below.jpg")] == \
        ["keep", "review", "review", "reject"]
    assert "within +-0.050 of the threshold 0.500" in got["at.jpg"].reason
    assert result.counts() == {"keep": 1, "review": 2, "reject": 1, "error": 0}
    summary = result.to_dict()["summary"]
    assert (summary["review"], summary["review_band"], summary["review_band_source"]) == (2, 0.05, "given")
    assert "kept at or above the threshold" in summary["estimates_count_review_as"]
    assert dict((p.name, c) for p, c in result.categories())["at.jpg"] == "review"
    assert "review 2" in result.summary_line()
    # Band 0: no review; "auto" with a fixed threshold: no estimated error, so no band either.
    for band in (0, "auto"):
        plain = filter_vectors(paths, incoming, [Path("ex.jpg")], unit([1, 0]), threshold=0.5, m=1,
                               normalize="none", review_band=band)
        assert [d.decision for d in plain.decisions] == ["keep", "keep", "reject", "reject"]
        assert plain.threshold.review_band == 0.0
    with pytest.raises(FilterkitError, match="review-band"):
        filter_vectors(paths, incoming, [Path("ex.jpg")], unit([1, 0]), review_band=-0.1)


def test_an_image_more_like_the_reject_like_exemplars_is_rejected_even_in_the_band():
    result = filter_vectors([Path("x.jpg")], unit([0.5, 0.55]), [Path("k")], unit([1, 0]), [Path("n")],
                            unit([0, 1]), threshold=0.66, m=1, normalize="none", review_band=0.1)
    assert result.decisions[0].decision == "reject" and "more like reject-like" in result.decisions[0].reason


def test_the_auto_review_band_is_the_bootstrap_spread_of_the_threshold():
    from filterkit.filtering import leave_one_out_centroid_scores, threshold_spread

    rng = np.random.default_rng(0)
    x = rng.normal(size=400)
    spread = threshold_spread(lambda a: float(a.mean()), [(x,)], resamples=1000)
    assert spread == pytest.approx(x.std() / np.sqrt(len(x)), rel=0.1)  # the standard error of a mean
    # Arrays of one group are resampled with the same rows: a - a never moves.
    assert threshold_spread(lambda a, b: float((a - b).mean()), [(x, x.copy())]) == 0.0
    # filter_vectors' automatic band: the spread of auto_threshold over resamples of the held-out scores.
    exemplars, incoming = unit(*rng.normal(size=(6, 8)) + 1), unit(*rng.normal(size=(5, 8)))
    paths, ex_paths = [Path(f"{i}") for i in range(5)], [Path(f"e{i}") for i in range(6)]
    result = filter_vectors(paths, incoming, ex_paths, exemplars, normalize="none")
    held_out = leave_one_out_centroid_scores(exemplars)  # the default scoring's
    expected = threshold_spread(lambda a: auto_threshold(a).value, [(held_out,)])
    assert result.threshold.review_band == pytest.approx(expected) and expected > 0
    assert result.threshold.review_source == "bootstrap" and "review within" in result.threshold.describe()


def test_the_linear_scoring_is_a_balanced_logistic_regression_on_the_exemplars():
    from sklearn.linear_model import LogisticRegression

    from filterkit.filtering import LINEAR_C, linear_scores

    rng = np.random.default_rng(0)
    keep = rng.normal(size=(12, 4)) + [2, 0, 0, 0]
    reject = rng.normal(size=(4, 4)) - [2, 0, 0, 0]  # fewer: class_weight="balanced" weighs them up
    queries = rng.normal(size=(5, 4))
    expected = LogisticRegression(C=LINEAR_C, class_weight="balanced", max_iter=1000).fit(
        np.concatenate([keep, reject]), np.r_[np.ones(12), np.zeros(4)]).decision_function(queries)
    np.testing.assert_allclose(linear_scores(queries, keep, reject), expected, rtol=1e-5, atol=1e-6)
    norm_keep, norm_reject = unit(*keep), unit(*reject)
    result = filter_vectors([Path("like_keep"), Path("like_reject")], unit([1, 0.1, 0, 0], [-1, 0.1, 0, 0]),
                            [Path(f"k{i}") for i in range(12)], norm_keep, [Path(f"r{i}") for i in range(4)],
                            norm_reject, normalize="none", scoring="linear")
    assert [d.decision for d in result.decisions] == ["keep", "reject"]
    assert "classifier" in result.decisions[0].reason and result.decisions[0].reject_score is None
    assert result.summary()["scoring"] == "linear"
    with pytest.raises(FilterkitError, match="needs reject-like exemplars"):
        filter_vectors([Path("x")], unit([1, 0, 0, 0]), [Path("k")], norm_keep[:1], scoring="linear")
    with pytest.raises(FilterkitError, match="scoring must be one of"):
        filter_vectors([Path("x")], unit([1, 0, 0, 0]), [Path("k")], norm_keep[:1], scoring="topm+pagerank")


def test_knn_smoothing_moves_each_score_towards_its_neighbours_mean_by_the_formula():
    from filterkit.filtering import neighbour_mean, smooth_scores

    # Three images close together and one far off; the middle one scored low, alone.
    vectors = unit([1, 0.0], [1, 0.05], [1, 0.1], [0, 1])
    scores = np.array([0.9, 0.2, 0.8, 0.0], dtype=np.float32)
    means = neighbour_mean(scores, vectors, k=2)
    np.testing.assert_allclose(means[:3], [(0.2 + 0.8) / 2, (0.9 + 0.8) / 2, (0.2 + 0.9) / 2], atol=1e-6)
    smoothed = smooth_scores(scores, means, alpha=0.5)
    assert smoothed[1] == pytest.approx(0.5 * 0.2 + 0.5 * 0.85, abs=1e-6)  # pulled up to 0.525
    # An exact duplicate is a neighbour, never the image itself; queries from outside keep all k.
    twins = unit([1, 0], [1, 0], [0, 1])
    np.testing.assert_allclose(neighbour_mean(np.array([1.0, 3.0, 5.0]), twins, k=1)[:2], [3.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(neighbour_mean(scores, vectors, unit([0, 1]), k=1), [0.0], atol=1e-6)
    # Through filter_vectors: the decided score is the smoothed top-m score (default k and alpha).
    rng = np.random.default_rng(0)
    incoming, exemplars = unit(*rng.normal(size=(30, 6))), unit(*rng.normal(size=(5, 6)))
    paths = [Path(f"{i}") for i in range(30)]
    plain = filter_vectors(paths, incoming, [Path(f"e{i}") for i in range(5)], exemplars, threshold=0.0,
                           normalize="none", scoring="topm")
    knn = filter_vectors(paths, incoming, [Path(f"e{i}") for i in range(5)], exemplars, threshold=0.0,
                         normalize="none", scoring="topm+knn")
    raw = np.array([d.score for d in plain.decisions], dtype=np.float32)
    np.testing.assert_allclose([d.score for d in knn.decisions],
                               smooth_scores(raw, neighbour_mean(raw, incoming)), atol=1e-5)
    assert "kNN-smoothed" in knn.decisions[0].reason


def test_filter_cli_review_band_reaches_the_json_the_report_and_the_out_folder(tmp_path, capsys, small_model_dir):
    _photo_folders(tmp_path)
    out, report = tmp_path / "sorted", tmp_path / "r.html"
    base = ["filter", str(tmp_path / "incoming"), "--keep-like", str(tmp_path / "exemplars"),
            "--model", str(small_model_dir), "--json", "-q", "--workers", "0"]
    # A band wider than any cosine gap: every image that is read goes to review.
    assert main(base + ["--review-band", "5", "--action", "copy", "--out", str(out), "--report", str(report)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["summary"]["review"], doc["summary"]["keep"], doc["summary"]["reject"]) == (5, 0, 0)
    assert {p.name for p in (out / "review").iterdir()} == {Path(d["path"]).name for d in doc["images"]
                                                            if d["decision"] == "review"}
    assert not (out / "kept").exists() and not (out / "rejected").exists()
    assert "To review" in report.read_text() and '"review": 5' in report.with_suffix(".json").read_text()
    assert main(base + ["--review-band", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"]["review"] == 0
    assert main(base + ["--review-band", "wide"]) == 1
    assert "--review-band must be 'auto' or a score width" in capsys.readouterr().err


def test_the_recall_threshold_keeps_its_target_on_average_over_exemplar_draws():
    from scipy.special import ndtr
    from scipy.stats import norm

    from filterkit.filtering import pool_recall_threshold

    # 16 held-out exemplar scores from N(0, 1) per draw; the true recall of each threshold is
    # P(N(0, 1) >= t). The prediction quantile keeps 95 % on average; the plug-in normal did not.
    rng = np.random.default_rng(0)
    draws = rng.normal(0.0, 1.0, (4000, 16))
    kept = np.array([ndtr(-pool_recall_threshold(d, 0.95)) for d in draws])
    plug_in = ndtr(-norm.ppf(0.05, draws.mean(axis=1), draws.std(axis=1, ddof=1)))
    assert abs(kept.mean() - 0.95) < 0.003
    assert plug_in.mean() < 0.94


def test_the_predictive_quantile_inverts_the_predictive_recall_for_any_number_of_exemplars():
    from scipy.special import ndtr
    from scipy.stats import t as student

    from filterkit.filtering import pool_precision, predictive_quantile, predictive_recall

    for n in (1, 2, 5, 16, 200):
        t = predictive_quantile(0.9, 0.5, 0.1, n)
        assert float(predictive_recall(t, 0.5, 0.1, n)) == pytest.approx(0.9)
    assert float(predictive_recall(0.4, 0.5, 0.1, 1)) == pytest.approx(ndtr(1.0))  # one score: plug-in normal
    assert float(predictive_recall(0.4, 0.5, 0.1, 5)) == pytest.approx(student.cdf(1.0 / np.sqrt(1.2), 4))
    # fewer exemplars, a lower threshold for the same recall; many, close to the normal's
    assert predictive_quantile(0.9, 0.5, 0.1, 5) < predictive_quantile(0.9, 0.5, 0.1, 16) < predictive_quantile(0.9, 0.5, 0.1, 1)
    assert predictive_quantile(0.9, 0.5, 0.1, 200) == pytest.approx(predictive_quantile(0.9, 0.5, 0.1, 1), abs=0.002)
    pool = np.linspace(0, 1, 101)
    expected = min(1.0, 0.2 * student.cdf((0.6 - 0.5) / 0.1 / np.sqrt(1 + 1 / 5), 4) / (pool >= 0.5).mean())
    assert float(pool_precision(0.2, 0.6, 0.1, pool, 0.5, 5)) == pytest.approx(expected)


def _two_kinds(rng, n_keep, n_other):
    """(keep scores, reject scores) of keep-like and of other images: each scores higher against its own kind."""
    keep = np.concatenate([rng.normal(0.8, 0.06, n_keep), rng.normal(0.55, 0.08, n_other)])
    reject = np.concatenate([rng.normal(0.5, 0.08, n_keep), rng.normal(0.7, 0.06, n_other)])
    return keep, reject


def test_with_reject_like_exemplars_the_pool_precision_is_stated_near_the_truth_or_withheld():
    from filterkit.filtering import auto_threshold, negatives_pool_threshold

    truth = np.arange(1000) < 120  # 12 % of the pool keep-like
    stated_errors, covered = [], 0
    for seed in range(10):
        rng = np.random.default_rng(seed)
        pool_keep, pool_reject = _two_kinds(rng, 120, 880)
        pk, pr = _two_kinds(rng, 400, 0)
        nk, nr = _two_kinds(rng, 0, 400)
        t = auto_threshold(pk, pr, nk, nr)
        stated = negatives_pool_threshold(t, (pool_keep, pool_reject), (pk, pr), (nk, nr))
        kept = (pool_keep >= t.value) & (pool_keep > pool_reject)
        true_precision = (kept & truth).sum() / kept.sum()
        lo, hi = stated.precision_interval
        covered += lo <= true_precision <= hi
        assert t.est_precision - true_precision > 0.08  # the precision at equal prevalence is not the pool's
        if stated.est_precision is not None:
            assert stated.precision_note is None and hi - lo <= 0.2
            stated_errors.append(abs(stated.est_precision - true_precision))
            assert abs(stated.est_prevalence - 0.12) < 0.04
        else:
            assert stated.precision_note.startswith("precision not stated") and hi - lo > 0.2
    assert len(stated_errors) >= 4 and max(stated_errors) < 0.08
    assert covered >= 7  # a 90 % interval

    # 3 + 3 exemplars pin nothing, however they score: withheld, with the reason and the interval.
    rng = np.random.default_rng(0)
    pool = _two_kinds(rng, 120, 880)
    pos, neg = _two_kinds(rng, 3, 0), _two_kinds(rng, 0, 3)
    few = negatives_pool_threshold(auto_threshold(*pos, *neg), pool, pos, neg)
    assert few.est_precision is None and few.est_prevalence is None
    assert "3 keep-like and 3 reject-like exemplars do not pin" in few.precision_note
    assert np.subtract(*few.precision_interval[::-1]) > 0.2


def test_the_recall_stated_with_reject_like_exemplars_is_not_the_optimistic_kept_share_of_the_exemplars():
    from filterkit.filtering import _kept, auto_threshold, rule_recall

    kept_share, stated = [], []
    for seed in range(30):
        rng = np.random.default_rng(seed)
        pk, pr = _two_kinds(rng, 16, 0)
        nk, nr = _two_kinds(rng, 0, 16)
        t = auto_threshold(pk, pr, nk, nr)  # chosen on these exemplars: its est_recall is their kept share
        fresh_keep, fresh_reject = _two_kinds(rng, 20000, 0)  # new keep-like images: the true recall
        truth = _kept(fresh_keep, fresh_reject, t.value).mean()
        recall = rule_recall(t.value, pk, pr)
        assert 0 <= recall <= 1
        kept_share.append(t.est_recall - truth)
        stated.append(recall - truth)
    assert np.mean(kept_share) > 0.02
    assert abs(np.mean(stated)) < np.mean(kept_share) / 2
    assert np.mean(np.abs(stated)) < np.mean(np.abs(kept_share))


def test_reject_like_exemplars_unlike_the_incoming_images_give_no_confident_precision():
    """Kept more often than the incoming images, the reject-like exemplars would make the adjusted
    count a confident precision of 0 (seen on Imagenette: stated 0.00, true 0.49): withheld."""
    from filterkit.filtering import auto_threshold, negatives_pool_threshold

    rng = np.random.default_rng(0)
    pk, pr = _two_kinds(rng, 200, 0)
    nk = rng.normal(0.75, 0.06, 200)  # reject-like exemplars that look keep-like
    nr = rng.normal(0.70, 0.06, 200)
    pool = (np.concatenate([rng.normal(0.8, 0.06, 50), rng.normal(0.3, 0.05, 450)]),  # others far from both
            np.concatenate([rng.normal(0.5, 0.08, 50), rng.normal(0.3, 0.05, 450)]))
    t = auto_threshold(pk, pr, nk, nr)
    got = negatives_pool_threshold(t, pool, (pk, pr), (nk, nr))
    assert got.est_precision is None and got.est_prevalence is None
    assert "the exemplars do not describe the incoming images" in got.precision_note
    assert "give reject-like exemplars like the incoming images to be rejected" in got.precision_note
    assert got.precision_interval is None and got.prevalence_interval is None  # no confident-looking [0, 0]


def test_two_keep_like_exemplars_state_no_recall_with_reject_like_ones():
    """2 exemplars have one held-out score each, the same cosine: no spread to fit a normal to, and
    both pass the threshold they made."""
    from filterkit.filtering import rule_recall

    rng = np.random.default_rng(0)
    keep = rng.normal(size=(2, 8)) + 3.0
    reject = rng.normal(size=(1, 8)) - 3.0
    incoming = np.concatenate([keep + 0.1 * rng.normal(size=keep.shape), rng.normal(size=(6, 8))])
    paths = [Path(f"{i}.jpg") for i in range(len(incoming))]
    result = filter_vectors(paths, incoming, [Path("k0.jpg"), Path("k1.jpg")], keep, [Path("r.jpg")], reject,
                            normalize="none")
    t = result.threshold
    assert t.est_recall is None and "recall not stated" in t.recall_note and "recall not stated" in t.describe()
    assert result.summary()["recall_note"] == t.recall_note
    assert t.est_precision is None and "precision not stated" in t.precision_note
    json.dumps(result.to_dict(), allow_nan=False)  # valid JSON: no NaN anywhere
    assert rule_recall(0.5, np.array([0.8, 0.8]), np.array([0.1, 0.1])) == 1.0


def test_topm_centroid_scores_blend_the_top_m_and_the_exemplars_mean_direction_by_the_formula():
    from filterkit.filtering import (
        CENTROID_WEIGHT,
        centroid_scores,
        exemplar_scores,
        leave_one_out_centroid_scores,
        leave_one_out_scores,
    )

    rng = np.random.default_rng(1)
    exemplars, queries = unit(*rng.normal(size=(7, 5)) + 1), unit(*rng.normal(size=(4, 5)))
    w = CENTROID_WEIGHT
    centre = exemplars.mean(axis=0) / np.linalg.norm(exemplars.mean(axis=0))
    got = centroid_scores(queries, exemplars)
    np.testing.assert_allclose(got.values, (1 - w) * exemplar_scores(queries, exemplars).values + w * queries @ centre,
                               atol=1e-6)
    assert (got.nearest == exemplar_scores(queries, exemplars).nearest).all()  # explained by the nearest exemplar
    # Held out: each exemplar against the others' top-m and the others' mean, never its own.
    others = np.stack([np.delete(exemplars, i, axis=0).mean(axis=0) for i in range(7)])
    others /= np.linalg.norm(others, axis=1, keepdims=True)
    np.testing.assert_allclose(leave_one_out_centroid_scores(exemplars),
                               (1 - w) * leave_one_out_scores(exemplars) + w * (exemplars * others).sum(axis=1), atol=1e-6)
    # Against an image matching a few stray exemplars, one along what most exemplars share gains.
    shared = unit(*np.r_[[[1, 0, 0]] * 6] + rng.normal(scale=0.3, size=(6, 3)))
    stray = unit([0, 1, 0])
    both = np.concatenate([shared, stray, stray, stray])  # three copies: top-3 of a stray look-alike is 1.0
    q = unit([1, 0, 0], [0, 1, 0])
    top = exemplar_scores(q, both).values
    blended = centroid_scores(q, both).values
    assert top[1] > top[0] and blended[0] - blended[1] > top[0] - top[1]


def test_a_threshold_past_every_reject_like_exemplar_states_no_pool_precision():
    """Best F1 on the exemplars can put the threshold just past the last reject-like one: fpr 0 is then
    the threshold's choice, and precision 1.00 was stated against a true 0.25 (held-out Imagenette)."""
    from filterkit.filtering import Threshold, negatives_pool_threshold

    rng = np.random.default_rng(0)
    t = 0.5
    pool = (rng.uniform(0, 1, 1000), None)
    positives = (np.r_[np.full(160, 0.8), np.full(40, 0.2)], None)  # 80 % kept
    negatives = (np.full(200, 0.45), None)  # none kept: the threshold sits just above them
    stated = negatives_pool_threshold(Threshold(t, "auto"), pool, positives, negatives)
    assert stated.est_precision is None and "keeps none of the 200 reject-like exemplars" in stated.precision_note
    assert stated.precision_interval is None and stated.prevalence_interval is None  # confident and wrong: not shown
    # One reject-like exemplar past it and the same rates are a measurement: stated, from the adjusted count.
    negatives = (np.r_[np.full(199, 0.45), 0.6], None)
    measured = negatives_pool_threshold(Threshold(t, "auto"), pool, positives, negatives)
    share, tpr, fpr = 0.5, 0.8, 1 / 200
    assert measured.est_precision == pytest.approx((share - fpr) / (tpr - fpr) * tpr / share, abs=0.03)
