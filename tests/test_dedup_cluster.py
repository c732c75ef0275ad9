import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import PHOTO_NAMES
from filterkit import FilterkitError
from filterkit.cli import main
from filterkit.cluster import cluster_vectors, select_fraction
from filterkit.dedup import duplicate_groups, group_indices, keeper_order


def test_union_find_groups_connected_pairs():
    groups = group_indices(7, (np.array([0, 1, 4]), np.array([1, 2, 5])))
    assert sorted(sorted(g) for g in groups) == [[0, 1, 2], [4, 5]]
    assert group_indices(3, (np.array([], dtype=int), np.array([], dtype=int))) == []


def test_keeper_is_largest_resolution_then_larger_file_then_path(tmp_path):
    Image.new("RGB", (100, 100), "red").save(tmp_path / "small.png")
    Image.new("RGB", (200, 100), "red").save(tmp_path / "big.png")
    noisy = np.random.default_rng(0).integers(0, 255, (100, 100, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(tmp_path / "small_but_heavy.png")
    paths = [tmp_path / n for n in ("small.png", "small_but_heavy.png", "big.png")]
    order = keeper_order(paths)
    assert [paths[i].name for i in order] == ["big.png", "small_but_heavy.png", "small.png"]
    shutil.copy(tmp_path / "small.png", tmp_path / "a_copy.png")
    tied = [tmp_path / "small.png", tmp_path / "a_copy.png"]
    assert [tied[i].name for i in keeper_order(tied)] == ["a_copy.png", "small.png"]


def test_groups_from_vectors_mix_exact_and_near_duplicates():
    v = np.array([[1, 0], [1, 0], [0.999, 0.045], [0, 1], [-1, 0]], dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    paths = [Path(f"/nonexistent/{c}.jpg") for c in "abcde"]
    hashes = ["h1", "h1", "h2", "h3", "h1"]  # e has a's bytes but (impossibly) another vector
    groups = duplicate_groups(paths, hashes, v, threshold=0.99)
    assert len(groups) == 1
    g = groups[0]
    members = {g.keep.name} | {d.path.name for d in g.duplicates}
    assert members == {"a.jpg", "b.jpg", "c.jpg", "e.jpg"}
    assert g.keep.name == "a.jpg"  # no file to measure: path order decides
    by_name = {d.path.name: d for d in g.duplicates}
    assert by_name["b.jpg"].exact and by_name["b.jpg"].score == 1.0
    assert not by_name["c.jpg"].exact and by_name["c.jpg"].score == pytest.approx(0.999, abs=1e-3)
    with pytest.raises(FilterkitError, match="threshold"):
        duplicate_groups(paths, hashes, v, threshold=2.0)


@pytest.fixture
def dup_folder(tmp_path, photos_dir):
    root = tmp_path / "photos"
    shutil.copytree(photos_dir, root)
    shutil.copy(root / "coffee.jpg", root / "renamed_coffee.jpg")  # exact copy, other name
    im = Image.open(root / "chelsea.jpg")
    im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((im.width // 2, im.height // 2)).save(
        root / "chelsea_flipped_small.jpg", quality=85)
    # Two distinct textures: 10 distinct images, as many as near-duplicate estimates need to move files.
    (root / "extra").mkdir()
    rng = np.random.default_rng(7)
    for k in range(2):
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(root / "extra" / f"noise{k}.png")
    return root


def test_dedup_cli_groups_copies_and_moves_only_duplicates(tmp_path, capsys, dup_folder, small_model_dir):
    args = ["dedup", str(dup_folder), "--threshold", "0.6", "--target-precision", "0.5", "--model",
            str(small_model_dir), "--json", "-q", "--workers", "0"]
    assert main(args) == 0
    groups = {Path(g["keep"]).name: g for g in json.loads(capsys.readouterr().out)["groups"]}
    assert set(groups) == {"chelsea.jpg", "coffee.jpg"}  # keepers: the larger image; path order for copies
    assert [Path(d["path"]).name for d in groups["chelsea.jpg"]["duplicates"]] == ["chelsea_flipped_small.jpg"]
    assert groups["coffee.jpg"]["duplicates"] == [{"path": str(dup_folder / "renamed_coffee.jpg"), "score": 1.0,
                                                   "exact": True}]
    assert groups["coffee.jpg"]["weakest_link"]["score"] == 1.0
    out = tmp_path / "dups"
    assert main(args + ["--action", "move", "--out", str(out)]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in (out / "duplicates").iterdir()) == ["chelsea_flipped_small.jpg", "renamed_coffee.jpg"]
    assert sorted(p.stem for p in dup_folder.iterdir() if p.is_file()) == sorted(PHOTO_NAMES)


def test_vectors_auto_threshold_needs_a_calibrated_model(small_encoder):
    from filterkit.dedup import find_duplicates

    with pytest.raises(FilterkitError, match="no calibrated dedup threshold"):
        find_duplicates(np.eye(3, dtype=np.float32), encoder=small_encoder)


def test_cluster_vectors_and_pruning_fractions():
    rng = np.random.default_rng(0)
    centres = np.eye(4, dtype=np.float32)[:2]
    v = np.concatenate([c + 0.1 * rng.normal(size=(30, 4)) for c in centres]).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    c = cluster_vectors(v, 2)
    assert sorted(c.sizes().tolist()) == [30, 30]
    assert len(set(c.assignment[:30])) == 1 and c.assignment[0] != c.assignment[30]
    assert np.all(c.distance >= -1e-6)
    hard, easy = select_fraction(c.distance, 0.25, "hard"), select_fraction(c.distance, 0.25, "easy")
    assert hard.sum() == easy.sum() == 15 and not np.any(hard & easy)
    assert c.distance[hard].min() >= c.distance[easy].max()
    assert select_fraction(c.distance, 1.0).all()
    with pytest.raises(FilterkitError, match="keep-fraction"):
        select_fraction(c.distance, 0.0)


def test_cluster_cli_json_and_selection(tmp_path, capsys, photos_dir, small_model_dir):
    base = ["cluster", str(photos_dir), "--k", "3", "--model", str(small_model_dir), "--json", "-q", "--workers", "0"]
    assert main(base + ["--keep-fraction", "0.5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert sum(c["size"] for c in out["clusters"]) == len(out["images"]) == 8
    assert sum(r["selected"] for r in out["images"]) == 4
    assert main(base + ["--keep-fraction", "0.5", "--action", "link", "--out", str(tmp_path / "o")]) == 0
    capsys.readouterr()
    assert len(list((tmp_path / "o" / "selected").iterdir())) == 4
    assert main(base[:-3] + ["--k", "99", "-q"]) == 1
    assert "--k 99 is more than the 8 images that could be embedded: give --k 8 or fewer" in capsys.readouterr().err
    assert main(base + ["--keep", "easy"]) == 1  # selects nothing without a fraction: said, not ignored
    assert "--keep easy goes with --keep-fraction" in capsys.readouterr().err


def test_threshold_for_precision_takes_whole_runs_of_equal_scores():
    from filterkit.dedup import threshold_for_precision

    sims = np.array([0.99, 0.98, 0.95, 0.95, 0.90, 0.80])
    dup = np.array([1, 1, 1, 0, 1, 0], dtype=bool)
    t, precision, recall = threshold_for_precision(sims, dup, 0.99)
    assert (t, precision, recall) == (0.98, 1.0, 0.5)  # 0.95 would admit the tied non-duplicate
    t, precision, recall = threshold_for_precision(sims, dup, 0.75)
    assert (t, precision, recall) == (0.90, 0.8, 1.0)


def test_model_calibrate_writes_a_dedup_threshold_that_dedup_auto_uses(tmp_path, capsys, photos_dir, dup_folder):
    from filterkit import Encoder
    from filterkit.dedup import find_duplicates, near_duplicate_variant

    rng = np.random.default_rng(0)
    images = tmp_path / "held_out"
    images.mkdir()
    for name in PHOTO_NAMES:  # 8 real photos and 8 distinct synthetic scenes
        shutil.copy(photos_dir / f"{name}.jpg", images)
    for k in range(8):
        x = np.linspace(0, 1, 160)[None, :, None] * rng.uniform(0, 255, 3) + rng.uniform(0, 120, (120, 160, 3))
        Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).save(images / f"scene_{k}.jpg")
    variant = near_duplicate_variant(Image.open(photos_dir / "coffee.jpg"), rng)
    assert variant.mode == "RGB" and variant.size != Image.open(photos_dir / "coffee.jpg").size
    model = tmp_path / "m"
    Encoder.random("vit-tiny-8-64", depth=2).save(model)
    assert main(["model", "calibrate", str(model), "--images", str(images)]) == 0
    assert "dedup threshold" in capsys.readouterr().out
    doc = json.loads((model / "config.json").read_text())
    t = doc["thresholds"]["dedup"]
    assert -1 <= t <= 1 and doc["thresholds"]["dedup_calibration"]["images"] == 16
    assert Encoder.load(model).meta["thresholds"]["dedup"] == t
    assert main(["dedup", str(dup_folder), "--model", str(model), "--json", "-q", "--workers", "0"]) == 0
    doc = json.loads(capsys.readouterr().out)  # a folder: calibrated on itself, not on the model's threshold
    assert doc["verified"] and doc["calibration"]["threshold_source"] == "calibrated"
    vectors = Encoder.load(model).embed([Image.open(dup_folder / "coffee.jpg")] * 2)
    result = find_duplicates(vectors, encoder=Encoder.load(model))
    assert result.threshold == t and not result.verified and "calibrated on other images" in result.summary_line()
