"""Cross-set dedup (`dedup NEW --against REFERENCE`): which new images duplicate a reference
image, through the same verified machinery as folder dedup. Images are made here from
scikit-image's sample photos (no data download)."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import sample_photo
from filterkit import Encoder, FilterkitError, find_cross_duplicates, verify
from filterkit.cli import main

SHIPPED = "models/filterkit-vit-mini"


@pytest.fixture(scope="module")
def encoder():
    return Encoder.load(SHIPPED)


@pytest.fixture(scope="module")
def sets(tmp_path_factory, photos_dir):
    """reference: the 8 sample photos (coffee as its left half) and 3 noise textures; new: a
    rotated, a flipped-and-shrunk and a resized copy of reference photos, the right half of the
    coffee scene (a look-alike of the reference's left half), a byte copy of a reference file,
    and two unrelated photos that are copies of each other (a NEW-NEW pair)."""
    root = tmp_path_factory.mktemp("sets")
    ref, new = root / "reference", root / "new"
    ref.mkdir()
    new.mkdir()
    for p in photos_dir.iterdir():
        if p.stem != "coffee":
            shutil.copy(p, ref)
    coffee = sample_photo("coffee")
    w, h = coffee.size
    coffee.crop((0, 0, int(w * 0.45), h)).resize((128, 200)).save(ref / "coffee_left.jpg", quality=90)
    rng = np.random.default_rng(7)
    for k in range(3):
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(ref / f"noise{k}.png")
    for k in range(8):  # distinct scenes: more reference images to calibrate on
        x = np.linspace(0, 1, 160)[None, :, None] * rng.uniform(0, 255, 3) + rng.uniform(0, 120, (120, 160, 3))
        Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).save(ref / f"scene{k}.jpg")
    Image.open(ref / "astronaut.jpg").transpose(Image.Transpose.ROTATE_90).save(new / "astronaut_rot90.png")
    chelsea = Image.open(ref / "chelsea.jpg")
    chelsea.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((chelsea.width * 3 // 5, chelsea.height * 3 // 5)).save(
        new / "chelsea_flip_small.jpg", quality=60)
    rocket = Image.open(ref / "rocket.jpg")
    rocket.resize((rocket.width // 2, rocket.height // 2)).save(new / "rocket_half.png")
    coffee.crop((int(w * 0.55), 0, w, h)).resize((128, 200)).save(new / "coffee_right.jpg", quality=90)
    shutil.copy(ref / "retina.jpg", new / "retina_reupload.jpg")
    import skimage.data

    camera = Image.fromarray(skimage.data.camera()).convert("RGB").resize((256, 256))
    camera.save(new / "camera.jpg", quality=92)
    camera.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((160, 160)).save(new / "camera_flipped.png")
    return new, ref


def test_edited_copies_are_found_with_the_reference_image_they_copy(sets, encoder):
    new, ref = sets
    result = find_cross_duplicates(new, ref, encoder, workers=0)
    found = {d.path.name: (d.duplicate_of.name, d.exact) for d in result.duplicates}
    assert found == {"astronaut_rot90.png": ("astronaut.jpg", False),
                     "chelsea_flip_small.jpg": ("chelsea.jpg", False),
                     "rocket_half.png": ("rocket.jpg", False),
                     "retina_reupload.jpg": ("retina.jpg", True)}
    # the look-alike half of the coffee scene and the NEW-NEW pair (camera) are not cross-set links
    assert result.n_new == 7 and result.n_reference == 19
    c = result.calibration
    assert c.scope == "cross-set" and c.source == "calibrated" and c.images == 25  # 19 + 6 distinct new
    doc = result.to_dict()
    assert doc["duplicates"][0].keys() == {"path", "duplicate_of", "score", "exact"}
    assert 0 <= doc["estimated_precision"] <= 1 and 0 <= doc["precision_bound"] <= doc["estimated_precision"]
    assert all(d["score"] >= doc["threshold"] or d["exact"] for d in doc["duplicates"])
    assert "duplicate a reference image" in result.summary_line() and "at 75 % confidence" in result.summary_line()


def test_within_folder_dedup_of_new_does_find_the_pair_cross_set_leaves_out(sets, encoder):
    from filterkit import find_duplicates

    new, _ = sets
    groups = {frozenset([g.keep.name, *(d.path.name for d in g.duplicates)])
              for g in find_duplicates(new, encoder=encoder, workers=0).groups}
    assert frozenset({"camera.jpg", "camera_flipped.png"}) in groups  # a real NEW-NEW pair ...
    cross = find_cross_duplicates(new, sets[1], encoder, workers=0, threshold=0.5)
    assert not {"camera.jpg", "camera_flipped.png"} & {d.path.name for d in cross.duplicates}  # ... not reported


def test_a_reference_seen_before_is_not_embedded_again(tmp_path, sets, encoder):
    from filterkit import EmbeddingCache

    new, ref = sets
    with EmbeddingCache(tmp_path / "c.sqlite") as cache:
        first = find_cross_duplicates(new, ref, encoder, cache=cache, workers=0)
        batch = tmp_path / "batch2"
        batch.mkdir()
        chelsea = Image.open(ref / "chelsea.jpg")
        chelsea.crop((8, 6, 248, 164)).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(batch / "chelsea_crop.png")
        Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(batch / "grey.png")
        second = find_cross_duplicates(batch, ref, encoder, cache=cache, workers=0)
    assert first.embedded == {"new": 6, "reference": 19}  # the re-upload's bytes were embedded as the reference's
    assert second.embedded == {"new": 2, "reference": 0}
    assert [(d.path.name, d.duplicate_of.name) for d in second.duplicates] == [("chelsea_crop.png", "chelsea.jpg")]


def test_cli_json_and_actions_touch_only_the_new_folder(tmp_path, capsys, sets):
    new, ref = tmp_path / "new", tmp_path / "reference"
    shutil.copytree(sets[0], new)
    shutil.copytree(sets[1], ref)
    before_ref = sorted(p.name for p in ref.iterdir())
    base = ["dedup", str(new), "--against", str(ref), "--model", SHIPPED, "-q", "--workers", "0", "--json"]
    assert main(base) == 0
    doc = json.loads(capsys.readouterr().out)
    leaked = sorted(d["path"] for d in doc["duplicates"])
    assert len(leaked) == 4 and all(p.startswith(str(new)) for p in leaked)
    assert all(d["duplicate_of"].startswith(str(ref)) for d in doc["duplicates"])
    assert main(base + ["--action", "copy", "--out", str(tmp_path / "copied")]) == 0
    capsys.readouterr()
    assert sorted(str(p) for p in (tmp_path / "copied" / "duplicates").iterdir()) == sorted(
        str(tmp_path / "copied" / "duplicates" / p.split("/")[-1]) for p in leaked)
    # a low threshold links false pairs: the move is refused at the 0.99 target, and nothing moves
    assert main(base + ["--threshold", "0.2", "--action", "move", "--out", str(tmp_path / "refused")]) == 1
    assert "--action move refused" in capsys.readouterr().err and not (tmp_path / "refused").exists()
    # at the listed links' threshold (estimated at >= 0.90) and a target below it, the move goes ahead
    assert main(base + ["--threshold", str(doc["threshold"]), "--target-precision", "0.5", "--action", "move",
                        "--out", str(tmp_path / "moved")]) == 0
    moved = json.loads(capsys.readouterr().out)["actions"]
    assert sorted(a["source"] for a in moved) == leaked
    assert sorted(p.name for p in (tmp_path / "moved" / "duplicates").iterdir()) == sorted(
        p.split("/")[-1] for p in leaked)
    assert sorted(p.name for p in ref.iterdir()) == before_ref  # the reference is never touched
    assert sorted(p.name for p in new.iterdir()) == ["camera.jpg", "camera_flipped.png", "coffee_right.jpg"]


def test_cli_report_lists_each_duplicate_beside_its_reference(tmp_path, capsys, sets):
    new, ref = sets
    report = tmp_path / "leak.html"
    assert main(["dedup", str(new), "--against", str(ref), "--model", SHIPPED, "-q", "--workers", "0",
                 "--report", str(report), "--map", str(tmp_path / "leak.png")]) == 0
    out = capsys.readouterr().out
    assert "astronaut_rot90.png  duplicates" in out and "duplicate a reference image" in out
    page = report.read_text()
    assert page.count('class="card reject"') == 4 and 'data-label="reference"' in page
    assert 'data-label="duplicate"' in page and (tmp_path / "leak.png").stat().st_size > 0
    rows = (tmp_path / "leak.csv").read_text().splitlines()
    assert rows[0] == "path,duplicate_of,score,exact" and len(rows) == 5


@pytest.mark.parametrize("case, message", [
    ("same", "are the same folder"),
    ("inside", "overlap"),
    ("empty", "no images found"),
    ("index", "is an index directory"),
    ("copy-without-against", "--action must be one of report, move"),
])
def test_bad_input_is_one_line_error(tmp_path, capsys, sets, case, message):
    new, ref = sets
    (tmp_path / "empty").mkdir()
    index = tmp_path / "idx"
    index.mkdir()
    (index / "meta.json").write_text("{}")
    (index / "index.faiss").write_bytes(b"")
    args = {"same": [str(ref), "--against", str(ref)],
            "inside": [str(ref), "--against", str(ref.parent)],
            "empty": [str(tmp_path / "empty"), "--against", str(ref)],
            "index": [str(new), "--against", str(index)],
            "copy-without-against": [str(new), "--action", "copy", "--out", str(tmp_path / "o")]}[case]
    assert main(["dedup", *args, "--model", SHIPPED, "-q", "--workers", "0"]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_an_index_directory_is_refused_naming_what_to_pass(tmp_path, capsys, sets):
    # a real one, as `filterkit index build` writes it: on either side, or its index.faiss
    from filterkit.cache import EmbeddingCache
    from filterkit.ondisk import build_index_dir

    vectors = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    with EmbeddingCache(tmp_path / "c.sqlite") as cache:
        cache.put("m", [f"{i:064x}" for i in range(64)], vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    index = tmp_path / "idx"
    build_index_dir([tmp_path / "c.sqlite"], "m", index, nlist=2)
    capsys.readouterr()
    new, ref = sets
    for args in ([new, index], [index, ref], [new, index / "index.faiss"]):
        assert main(["dedup", str(args[0]), "--against", str(args[1]), "--model", SHIPPED, "-q", "--workers", "0"]) == 1
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert lines == [(f"error: {index} is an index directory (filterkit index build): cross-set dedup verifies "
                          "each candidate pair on its two images, which an index does not hold; pass the image folder "
                          "it was built from (its vectors come from the embedding cache, not embedded again)")], lines
    assert main(["dedup", str(new), "--against", str(tmp_path / "c.sqlite"), "--model", SHIPPED, "-q"]) == 1
    assert "reference is a file, not a folder of images" in capsys.readouterr().err


def test_cross_dihedral_search_pairs_only_across_the_two_sets():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, verify.SIDE ** 2)).astype(np.float32)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b = np.concatenate([a[:2], rng.normal(size=(3, verify.SIDE ** 2)).astype(np.float32)])  # b0, b1: copies of a0, a1
    b[2:] /= np.linalg.norm(b[2:], axis=1, keepdims=True)
    b[1] = np.rot90(b[1].reshape(verify.SIDE, verify.SIDE)).ravel()  # a rotated copy
    search = verify.DihedralSearch(a, 2, 0.9, others=b)
    assert sorted(zip(*(x.tolist() for x in search.pairs))) == [(0, 0), (1, 1)]  # (index of a, index of b)
    # a newcomer to b is asked about against a; a's own pairs (a0 with a copy of a0 in a) never count
    flipped = a[[3]].reshape(1, verify.SIDE, verify.SIDE)[:, :, ::-1].reshape(1, -1)
    assert search.proposes(np.array([3, 4]), np.concatenate([flipped, flipped])).tolist() == [True, False]
    with pytest.raises(FilterkitError, match="pair-score threshold"):
        find_cross_duplicates.__globals__["cross_duplicates"]([], [], np.empty((0, 4)), [], [], np.empty((0, 4)),
                                                              None, threshold=3.0)


def test_a_small_blocklist_is_calibrated_on_copies_from_both_folders(tmp_path, sets, encoder):
    # two reference images alone give too few synthetic copies: copies of the new images count too
    block = tmp_path / "blocklist"
    block.mkdir()
    for name in ("astronaut.jpg", "chelsea.jpg"):
        shutil.copy(sets[1] / name, block)
    result = find_cross_duplicates(sets[0], block, encoder, workers=0)
    assert {d.path.name: d.duplicate_of.name for d in result.duplicates} == {
        "astronaut_rot90.png": "astronaut.jpg", "chelsea_flip_small.jpg": "chelsea.jpg"}
    # 2 reference + 7 distinct new images: calibrated on 9, one short of stating a precision (move refuses)
    assert result.calibration.images == 9 and not result.estimated and "not estimated" in result.summary_line()


def test_would_pair_is_proposes_for_every_image():
    rng = np.random.default_rng(1)
    thumbs = rng.normal(size=(20, verify.SIDE ** 2)).astype(np.float32)
    thumbs /= np.linalg.norm(thumbs, axis=1, keepdims=True)
    search = verify.DihedralSearch(thumbs[:12], 3, 0.05, others=thumbs[12:])
    queries = np.concatenate([verify.dihedral(thumbs[[2]])[5], thumbs[15:18]])  # a flipped, rotated copy of 2
    q, t = search.would_pair(queries, chunk=2)
    expected = {(a, b) for a in range(4) for b in range(12)
                if search.proposes(np.array([b]), queries[[a]]).tolist() == [True]}
    assert set(zip(q.tolist(), t.tolist())) == expected and (0, 2) in expected
    assert [np.array_equal(verify.dihedral(verify.dihedral(thumbs[:1])[t])[verify.INVERSE[t]], thumbs[:1])
            for t in range(8)] == [True] * 8
