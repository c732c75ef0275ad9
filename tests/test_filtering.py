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
