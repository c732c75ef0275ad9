"""Outliers: the images least like the rest (mean cosine distance to the k nearest others).
Images are made here from scikit-image's sample photos."""

import json

import numpy as np
import pytest
from PIL import Image

from conftest import sample_photo
from filterkit import Encoder, FilterkitError, find_outliers
from filterkit.cli import main
from filterkit.outliers import outlier_scores, rank_outliers

SHIPPED = "models/filterkit-vit-mini"
PLANTED = ("coffee", "rocket", "hubble_deep_field")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """40 views of one cat photo (crops, scales, flips) and 3 photos of other kinds."""
    root = tmp_path_factory.mktemp("mixed")
    cat = sample_photo("chelsea")
    rng = np.random.default_rng(0)
    w, h = cat.size
    for i in range(40):
        cw, ch = int(w * rng.uniform(0.5, 0.9)), int(h * rng.uniform(0.5, 0.9))
        x, y = int(rng.integers(0, w - cw)), int(rng.integers(0, h - ch))
        view = cat.crop((x, y, x + cw, y + ch)).resize((96, 96))
        if i % 2:
            view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        view.save(root / f"cat{i:02d}.jpg", quality=90)
    for name in PLANTED:
        im = sample_photo(name)
        im.thumbnail((128, 128))
        im.save(root / f"{name}.jpg", quality=90)
    return root


def test_mean_distance_to_the_k_nearest_others_written_from_the_definition():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(30, 8)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    score, nearest, nearest_sim = outlier_scores(v, k=4)
    sims = v @ v.T
    np.fill_diagonal(sims, -np.inf)
    expected = np.array([np.mean(1 - np.sort(row)[::-1][:4]) for row in sims])
    np.testing.assert_allclose(score, expected, atol=1e-5)
    assert nearest.tolist() == np.argmax(sims, axis=1).tolist()
    np.testing.assert_allclose(nearest_sim, sims.max(axis=1), atol=1e-5)
    # k above the number of others: all of them
    np.testing.assert_allclose(outlier_scores(v[:3], k=10)[0], [np.mean(1 - np.delete(sims[i, :3], i)) for i in range(3)],
                               atol=1e-5)
    with pytest.raises(FilterkitError, match="at least 2"):
        outlier_scores(v[:1])
    with pytest.raises(FilterkitError, match="--top"):
        rank_outliers([f"{i}" for i in range(30)], v, top=0)


def test_planted_images_of_another_kind_come_out_on_top(mixed):
    result = find_outliers(mixed, Encoder.load(SHIPPED), top=3, workers=0)
    assert {o.path.stem for o in result.outliers} == set(PLANTED)
    assert [o.rank for o in result.ranked] == list(range(1, 44)) and len(result.outliers) == 3
    scores = [o.score for o in result.ranked]
    # centred on the shipped model's reference mean (test_reference.py tests that space itself)
    assert scores == sorted(scores, reverse=True) and result.normalize["kind"] == "center"
    assert "reference" in result.normalize
    assert all(o.nearest != o.path for o in result.ranked)
    assert "3 outlier(s) of 43 images" in result.summary_line()


def test_cli_json_top_and_copy_only_the_top(tmp_path, capsys, mixed):
    base = ["outliers", str(mixed), "--model", SHIPPED, "-q", "--workers", "0", "--json"]
    assert main(base + ["--top", "2", "--k", "5"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["top"] == 2 and doc["k"] == 5 and doc["images"] == 43 and len(doc["outliers"]) == 2
    assert doc["outliers"][0].keys() == {"rank", "path", "score", "nearest", "nearest_similarity"}
    assert {p.split("/")[-1][:-4] for p in (o["path"] for o in doc["outliers"])} <= set(PLANTED)
    out = tmp_path / "odd"
    assert main(base + ["--top", "3", "--action", "copy", "--out", str(out)]) == 0
    capsys.readouterr()
    assert sorted(p.stem for p in (out / "outliers").iterdir()) == sorted(PLANTED)
    assert len(list(mixed.iterdir())) == 43  # copied, not moved


def test_cli_report_and_map(tmp_path, capsys, mixed):
    report = tmp_path / "o.html"
    assert main(["outliers", str(mixed), "--model", SHIPPED, "-q", "--workers", "0", "--top", "3",
                 "--report", str(report), "--map", str(tmp_path / "o.png")]) == 0
    assert "3 outlier(s)" in capsys.readouterr().out
    page = report.read_text()
    assert page.count('class="card reject"') == 3 and page.count('data-label="outlier"') == 3
    assert page.count('data-label="typical"') == 40 and (tmp_path / "o.png").stat().st_size > 0
    rows = (tmp_path / "o.csv").read_text().splitlines()
    assert len(rows) == 44 and rows[0] == "rank,path,score,nearest,nearest_similarity"


def test_too_few_images_is_a_one_line_error(tmp_path, capsys):
    sample_photo("coffee").save(tmp_path / "only.jpg")
    assert main(["outliers", str(tmp_path), "--model", SHIPPED, "-q", "--workers", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "at least 2" in err[0]
