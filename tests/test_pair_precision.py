"""The pair-precision estimators of verified dedup (pair_precision.py): the look-alike tails'
formulas on hand-built pairs, the stated precision against the truth on simulated collections
(whose look-alikes follow the tails' exponential model: the real ones in benchmarks/README.md
are lighter, where the estimate errs low), and a folder of made images large enough for the
tails, where copies (a 90-degree rotation included) are linked and look-alikes are not."""

import numpy as np
import pytest
from PIL import Image

from conftest import sample_photo, write_edited_copies
from filterkit import Encoder
from filterkit.dedup import find_duplicates
from filterkit.pair_precision import (
    PRECISION_BOUND_Z,
    TAIL_MIN_IMAGES,
    calibrate,
    expected_false_links,
    look_alike_tails,
    precision_at,
    tail_estimate,
    tail_threshold,
)

SHIPPED = "models/filterkit-vit-mini"


def test_a_tail_is_fitted_on_an_image_s_next_best_scores_and_extrapolated_as_its_formula_says():
    # image 0 pairs with images 1..8 at 0.9 (its copy), 0.5, 0.45, ..., 0.2; k = 3 of them
    # make its tail (at most half its 8 pairs): level 0.4 (rank 4), the scale the mean of 0.5
    # and 0.45 less it; the others have one pair each and get the median tail (only image 0's)
    scores = np.array([0.9, 0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2])
    rows, cols = np.zeros(8, dtype=np.int64), np.arange(1, 9)
    tails = look_alike_tails(9, rows, cols, scores, k=3)
    assert tails.level[0] == pytest.approx(0.4) and tails.count[0] == 3
    assert tails.scale[0] == pytest.approx((0.5 + 0.45) / 2 - 0.4)
    assert np.allclose(tails.level, 0.4) and np.allclose(tails.scale, tails.scale[0])
    # no more look-alikes above the borrowed level (0.4) than their own scores there
    assert tails.count[1:].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    t = 0.6
    # every image's tail (images 1..4 over their one pair at or above 0.4); a pair has two ends
    false = (3 + 4 * 1) * np.exp(-(t - 0.4) / tails.scale[0]) / 2
    assert expected_false_links(np.array([t]), tails)[0] == pytest.approx(false)
    assert precision_at(np.array([t]), scores, tails)[0] == pytest.approx(1 - false / 1)  # one link >= 0.6
    bound = precision_at(np.array([t]), scores, tails, PRECISION_BOUND_Z)[0]
    assert bound == pytest.approx(max(0.0, 1 - (false + PRECISION_BOUND_Z * np.sqrt(false)) / 1))
    # below an image's level its own scores count, as observed: at 0.3 all 6 links >= 0.3, seen
    # from both ends, are possible look-alikes
    assert expected_false_links(np.array([0.3]), tails)[0] == pytest.approx(6)


def _simulated(rng, n_images, copy_share=0.1, per_image=30):
    """Pair scores of a collection whose look-alikes follow the tails' model: each image's are
    its own base ~ N(0.30, 0.03) plus an exponential of its own scale ~ U(0.02, 0.04); a tenth
    of the images are in a pair of real copies ~ N(0.75, 0.05), the 200 synthetic copies alike."""
    base, scale = rng.normal(0.30, 0.03, n_images), rng.uniform(0.02, 0.04, n_images)
    rows, cols, scores, truth = [], [], [], []
    for i in range(n_images):
        partners = rng.choice(np.delete(np.arange(n_images), i), per_image // 2, replace=False)
        rows += [i] * len(partners)
        cols += partners.tolist()
        # a pair's score: the larger of its two ends' draws (both images see it)
        scores += np.maximum(base[i] + rng.exponential(scale[i], len(partners)),
                             base[partners] + rng.exponential(scale[partners])).tolist()
        truth += [False] * len(partners)
    # the copies: pairs of two images of the collection, each image in one pair at most
    pairs = rng.permutation(n_images)[:2 * int(copy_share * n_images / 2)].reshape(-1, 2)
    for i, j in pairs:
        rows.append(int(i))
        cols.append(int(j))
        scores.append(rng.normal(0.75, 0.05))
        truth.append(True)
    positive = rng.normal(0.75, 0.05, 200)
    rows, cols = np.array(rows), np.array(cols)
    n = int(max(rows.max(), cols.max())) + 1
    return positive, n, rows, cols, np.array(scores), np.array(truth), len(pairs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_tail_threshold_s_stated_precision_and_recall_hold_on_a_simulated_collection(seed):
    positive, n, rows, cols, scores, truth, copies = _simulated(np.random.default_rng(seed), 2000)
    tails = look_alike_tails(n, rows, cols, scores)
    t, bound = tail_threshold(positive, scores, tails, 0.90)
    precision, recall, false, links = tail_estimate(t, positive, scores, tails)
    linked = scores >= t
    true_precision, true_recall = truth[linked].mean(), truth[linked].sum() / copies
    assert bound >= 0.90
    # stated within 0.10 of the truth (the tolerance) and recall within 0.05. On these
    # exactly exponential tails the estimate is optimistic by up to 0.04 (6 seeds: the mean
    # excess of the 9 scores under the best is a low scale); the benchmarks' real look-alike
    # tails are lighter, and there it errs low (benchmarks/README.md)
    assert true_precision >= 0.85 and true_recall >= 0.80
    assert abs(precision - true_precision) <= 0.10 and abs(recall - true_recall) <= 0.05
    assert links == linked.sum() and false == pytest.approx(expected_false_links(np.array([t]), tails)[0])


def test_calibrate_uses_the_tails_on_large_collections_and_the_anchor_on_small_ones():
    rng = np.random.default_rng(0)
    positive, n, rows, cols, scores, _, _ = _simulated(rng, 400)
    big = calibrate(positive, n, rows, cols, scores, n / 2, TAIL_MIN_IMAGES, 0.90)
    small = calibrate(positive, n, rows, cols, scores, n / 2, TAIL_MIN_IMAGES - 1, 0.90)
    assert big.estimator == "tails" and small.estimator == "anchor"
    assert big.links == int(np.sum(scores >= big.threshold))
    assert small.false_links == pytest.approx(small.links * (1 - small.precision))


def _texture(rng, size=96):
    """A smooth random colour field: sums of random plane waves per channel (distinct, textured)."""
    y, x = np.mgrid[0:size, 0:size] / size
    out = np.zeros((size, size, 3))
    for c in range(3):
        for _ in range(4):
            fx, fy = rng.uniform(-6, 6, 2)
            out[:, :, c] += np.sin(2 * np.pi * (fx * x + fy * y) + rng.uniform(0, 2 * np.pi))
    out = (out - out.min()) / (out.max() - out.min())
    return Image.fromarray((255 * out).astype(np.uint8))


@pytest.fixture(scope="module")
def large_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("large")
    rng = np.random.default_rng(0)
    for k in range(TAIL_MIN_IMAGES + 10):
        _texture(rng).save(root / f"t{k:03d}.png")
    astronaut, chelsea = sample_photo("astronaut"), sample_photo("chelsea")
    for name, im in (("astronaut", astronaut), ("chelsea", chelsea)):
        im.thumbnail((256, 256))
        im.save(root / f"{name}.jpg", quality=92)
    write_edited_copies(root, Image.open(root / "astronaut.jpg"), Image.open(root / "chelsea.jpg"))
    return root


def test_on_a_large_folder_copies_are_linked_and_look_alikes_are_not(large_folder):
    result = find_duplicates(large_folder, encoder=Encoder.load(SHIPPED), workers=0)
    groups = {frozenset([g.keep.name] + [d.path.name for d in g.duplicates]) for g in result.groups}
    assert result.calibration.estimator == "tails"
    assert groups == {frozenset({"astronaut.jpg", "astronaut_rot90.png"}),
                      frozenset({"chelsea.jpg", "chelsea_flip_small_q40.png"})}
    doc = result.to_dict()["calibration"]
    assert doc["estimator"] == "tails" and doc["links"] >= 2
    assert "look-alikes extrapolated" in doc["method"]


def test_a_target_just_out_of_reach_links_nothing_just_above_every_pair_and_one_in_reach_links():
    positive, n, rows, cols, scores, _, _ = _simulated(np.random.default_rng(4), 600)
    tails = look_alike_tails(n, rows, cols, scores)
    cuts = np.linspace(scores.min(), scores.max(), 2001)
    best = precision_at(cuts, scores, tails, PRECISION_BOUND_Z).max()  # the best bound of a linking cut
    t, bound = tail_threshold(positive, scores, tails, min(1.0, best + 1e-3))
    assert t == np.nextafter(scores.max(), np.inf) and bound == 1.0  # finite: JSON has no Infinity
    t, bound = tail_threshold(positive, scores, tails, best - 1e-3)
    assert np.sum(scores >= t) >= 1 and bound >= best - 1e-3


def test_a_target_out_of_reach_says_what_lowering_it_would_do_and_writes_strict_json(large_folder):
    import json

    strict = find_duplicates(large_folder, encoder=Encoder.load(SHIPPED), workers=0, target_precision=0.9999)
    assert strict.groups == [] and strict.calibration.links == 0
    assert "at the target 0.9999, so nothing links: a lower --target-precision" in strict.summary_line()
    assert json.loads(json.dumps(strict.to_dict(), allow_nan=False))["threshold"] is not None
    listed = find_duplicates(large_folder, encoder=Encoder.load(SHIPPED), workers=0)
    assert "a lower --target-precision" not in listed.summary_line()


def test_images_with_few_pairs_borrow_a_tail_that_predicts_their_false_links():
    # cross-set with a 5-image reference: each new image has only its 5 reference pairs (too
    # few for a tail of its own) and borrows the median one, over no more scores than it has;
    # 5 real copies among 2,000 pairs of look-alikes following the tails' model
    rng = np.random.default_rng(0)
    refs, new = 5, 400
    rows, cols = np.repeat(np.arange(refs), new), refs + np.tile(np.arange(new), refs)
    base, scale = rng.normal(0.30, 0.03, refs + new), rng.uniform(0.02, 0.04, refs + new)
    scores = np.maximum(base[rows] + rng.exponential(scale[rows]), base[cols] + rng.exponential(scale[cols]))
    truth = np.zeros(len(scores), dtype=bool)
    copies = rng.choice(len(scores), 5, replace=False)
    scores[copies], truth[copies] = rng.normal(0.75, 0.05, 5), True
    tails = look_alike_tails(refs + new, rows, cols, scores)
    cuts = np.linspace(0.3, 0.8, 51)
    false = expected_false_links(cuts, tails)
    assert np.all(np.diff(false) <= 1e-9)  # never more false links at a higher cut
    for t, f in zip(cuts, false):
        true_false = np.sum((scores >= t) & ~truth)
        assert abs(f - true_false) <= max(3.0, 0.25 * true_false), (t, f, true_false)


def test_expected_false_links_are_the_same_computed_in_small_blocks(monkeypatch):
    from filterkit import pair_precision

    positive, n, rows, cols, scores, _, _ = _simulated(np.random.default_rng(3), 300)
    tails = look_alike_tails(n, rows, cols, scores)
    cuts = np.linspace(0.3, 0.9, 257)
    whole = expected_false_links(cuts, tails)
    monkeypatch.setattr(pair_precision, "CHUNK", 1000)  # 3 cuts per block
    np.testing.assert_allclose(expected_false_links(cuts, tails), whole)
    assert np.all(np.diff(whole) <= 1e-9)  # fewer expected false links at a higher cut
