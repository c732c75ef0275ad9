import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from filterkit import FilterkitError
from filterkit.cli import main
from filterkit.filtering import (auto_threshold, exemplar_scores, filter_vectors, leave_one_out_scores,
                                 spherical_kmeans)

from conftest import sample_photo


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
    assert code == 1 and "k-means with k=50" in capsys.readouterr().err


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
        expected = np.sort(sims, axis=1)[:, -3:].mean(axis=1)  # mean of the top 3
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

    from filterkit.filtering import fit_pool, pool_threshold

    rng = np.random.default_rng(0)
    pool = np.concatenate([rng.normal(0.6, 0.05, 200), rng.normal(0.2, 0.1, 800)])  # 20 % keep-like
    held_out = rng.normal(0.6, 0.05, 16)  # the exemplars' leave-one-out scores
    model = fit_pool(pool, held_out)
    assert model.prevalence == pytest.approx(0.2, abs=0.03)
    assert (model.pos_mean, model.pos_std) == (pytest.approx(held_out.mean()), pytest.approx(held_out.std(ddof=1)))
    t = pool_threshold(pool, held_out, target_recall=0.9)
    assert t.value == pytest.approx(norm.ppf(0.1, model.pos_mean, model.pos_std))
    assert t.est_recall == pytest.approx(0.9)
    assert t.est_prevalence == pytest.approx(model.prevalence)
    assert t.est_precision == pytest.approx(min(1.0, model.prevalence * 0.9 / (pool >= t.value).mean()))
    true_precision = (pool[:200] >= t.value).sum() / (pool >= t.value).sum()
    assert abs(t.est_precision - true_precision) < 0.05
    strict = pool_threshold(pool, held_out, target_precision=0.99)
    # Well-separated populations: precision 0.99 is reached below the recall-0.9 threshold.
    assert strict.est_precision >= 0.99 and strict.value < t.value and strict.est_recall > 0.99


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
    assert stated.est_prevalence == pytest.approx(0.2, abs=0.1) and stated.est_precision is not None
    assert "est. 2" in stated.describe() or "est. 1" in stated.describe()
    few = filter_vectors(paths[:POOL_MIN - 1], incoming[:POOL_MIN - 1], ex_paths, exemplars).threshold
    too_few_exemplars = filter_vectors(paths, incoming, ex_paths[:2], exemplars[:2]).threshold
    for t in (few, too_few_exemplars):
        assert t.est_prevalence is None and t.est_precision is None and t.est_recall is not None


def test_the_cli_and_the_library_default_to_the_same_normaliser():
    import inspect

    from filterkit.cli.collection import filter_command
    from filterkit.filtering import DEFAULT_NORMALIZE, ImageFilter

    assert inspect.signature(filter_command).parameters["normalize"].default == DEFAULT_NORMALIZE
    assert inspect.signature(ImageFilter).parameters["normalize"].default == DEFAULT_NORMALIZE
