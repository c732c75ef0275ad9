"""A model's reference mean (reference.py): written and read back, refused when it belongs to
other weights or is malformed, fitted by `filterkit model reference`, and what `outliers`
centres on by default. Images are made here."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import assert_no_machine_path
from filterkit import Encoder, FilterkitError
from filterkit.cli import main
from filterkit.normalize import Normalizer
from filterkit.outliers import outlier_scores, rank_outliers
from filterkit.reference import MIN_IMAGES, REFERENCE_FILE, read_reference, write_reference


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_written_mean_reads_back_and_belongs_to_its_model_id(tmp_path):
    mean = np.linspace(-1, 1, 16).astype(np.float32)
    norm = Normalizer("center", mean, fitted_on=300, reference="a (150 of 900) + b (150 of 150)")
    write_reference(tmp_path, norm, "model-a")
    back = read_reference(tmp_path, "model-a")
    assert back.kind == "center" and back.fitted_on == 300 and back.reference == norm.reference
    np.testing.assert_array_equal(back.mean, mean)
    assert back.to_dict() == {"kind": "center", "fitted_on": 300, "reference": norm.reference}
    v = _unit(np.random.default_rng(0).normal(size=(5, 16)))
    np.testing.assert_allclose(back(v), _unit(v - mean), atol=1e-6)
    assert read_reference(tmp_path / "elsewhere", "model-a") is None and read_reference(None, "model-a") is None
    with pytest.raises(FilterkitError, match="computed for model 'model-a'.*filterkit model reference"):
        read_reference(tmp_path, "model-b")
    (tmp_path / REFERENCE_FILE).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(FilterkitError, match="malformed"):
        read_reference(tmp_path, "model-a")
    with pytest.raises(FilterkitError, match="a mean"):
        write_reference(tmp_path, Normalizer("none"), "model-a")
    with pytest.raises(FilterkitError, match="the model's embedding 8"):
        write_reference(tmp_path, norm, "model-a", dim=8)


def test_a_mean_of_another_width_or_dtype_is_malformed_not_a_traceback(tmp_path):
    import torch
    from safetensors.torch import save_file

    write_reference(tmp_path, Normalizer("center", np.ones(7, np.float32), fitted_on=300), "model-a")
    assert read_reference(tmp_path, "model-a").mean.shape == (7,)
    with pytest.raises(FilterkitError, match="malformed.*192 dimensions"):
        read_reference(tmp_path, "model-a", dim=192)
    save_file({"mean": torch.ones(192, dtype=torch.bfloat16)}, str(tmp_path / REFERENCE_FILE),
              metadata={"model_id": "model-a"})
    with pytest.raises(FilterkitError, match="malformed"):
        read_reference(tmp_path, "model-a", dim=192)


def test_replacing_the_weights_removes_the_reference_of_the_old_ones(tmp_path, small_model_dir, small_encoder):
    model = tmp_path / "model"
    shutil.copytree(small_model_dir, model)
    mine = Normalizer("center", np.zeros(small_encoder.dim, np.float32), fitted_on=300)
    write_reference(model, mine, small_encoder.model_id)
    small_encoder.save(model, overwrite=True)  # the same weights: the reference still belongs to them
    assert Encoder.load(model).reference() is not None
    Encoder.random("vit-tiny-8-64", seed=1, depth=2).save(model, overwrite=True)  # new weights
    assert not (model / REFERENCE_FILE).exists() and Encoder.load(model).reference() is None


def test_outliers_centre_on_the_reference_when_there_is_one_else_raw_cosine():
    rng = np.random.default_rng(1)
    common = rng.normal(size=12) * 4  # the component every vector shares
    v = _unit(common + rng.normal(size=(40, 12)))
    paths = [f"{i}.jpg" for i in range(40)]
    ref = Normalizer("center", common.astype(np.float32), fitted_on=500, reference="generic (500 of 500)")
    got = rank_outliers(paths, v, top=5, reference=ref)  # normalize="auto", the default
    assert got.normalize == ref.to_dict() and got.space is ref
    expected = outlier_scores(_unit(v - common), 10)[0]
    assert [o.score for o in got.ranked] == pytest.approx(sorted(expected, reverse=True), abs=1e-5)
    assert "centred on the model's 500 reference images" in got.summary_line()
    raw = rank_outliers(paths, v, top=5)
    assert raw.normalize["kind"] == "none" and "raw cosine" in raw.summary_line()
    assert rank_outliers(paths, v, top=5, normalize="none", reference=ref).normalize["kind"] == "none"
    with pytest.raises(FilterkitError, match="no reference mean.*filterkit model reference"):
        rank_outliers(paths, v, normalize="reference")
    with pytest.raises(FilterkitError, match="--normalize must be one of"):
        rank_outliers(paths, v, normalize="mahalanobis")


@pytest.fixture(scope="module")
def generic_and_odd(tmp_path_factory):
    """Two folders of made images (MIN_IMAGES in all: smooth colour fields and stripes), and a
    folder of 30 near-grey images with 2 saturated ones planted."""
    root = tmp_path_factory.mktemp("reference")
    rng = np.random.default_rng(0)
    for folder, n in (("fields", MIN_IMAGES // 2), ("stripes", MIN_IMAGES - MIN_IMAGES // 2)):
        (root / folder).mkdir()
        for i in range(n):
            base = rng.uniform(0, 255, size=3)
            y = np.linspace(0, 1, 48)[:, None, None]
            if folder == "stripes":
                y = (np.sin(np.arange(48) * rng.uniform(0.2, 1.5))[:, None, None] + 1) / 2
            im = np.clip(base * (0.5 + y) + rng.normal(0, 8, size=(48, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(im).save(root / folder / f"{i:03d}.png")
    (root / "odd").mkdir()
    for i in range(30):
        grey = np.clip(128 + rng.normal(0, 10, size=(48, 48, 1)).repeat(3, axis=2), 0, 255).astype(np.uint8)
        Image.fromarray(grey).save(root / "odd" / f"grey{i:02d}.png")
    for i, colour in enumerate(((255, 0, 0), (0, 0, 255))):
        Image.new("RGB", (48, 48), colour).save(root / "odd" / f"colour{i}.png")
    return root


def test_model_reference_command_then_outliers_report_the_space(tmp_path, capsys, small_model_dir, generic_and_odd):
    model = tmp_path / "model"
    shutil.copytree(small_model_dir, model)
    small = tmp_path / "small"
    (small / "few").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (32, 32), (i * 80, 0, 0)).save(small / "few" / f"{i}.png")
    assert main(["model", "reference", str(model), "--images", str(small / "few"), "-q", "--workers", "0"]) != 0
    assert f"needs at least {MIN_IMAGES} images" in capsys.readouterr().err
    assert not (model / REFERENCE_FILE).exists()

    args = ["model", "reference", str(model), "--images", str(generic_and_odd / "fields"), "--images",
            str(generic_and_odd / "stripes"), "--max-images", "300", "-q", "--workers", "0"]
    assert main(args) == 0
    assert "reference mean of 256 images" in capsys.readouterr().out
    ref = Encoder.load(model).reference()  # every image: the two folders hold 256 < 300
    assert ref.fitted_on == MIN_IMAGES and ref.reference.count(f" of {MIN_IMAGES // 2})") == 2
    # base names only, as config.json's data (no parent folder of the user's in a model directory)
    assert ref.reference in (f"fields ({MIN_IMAGES // 2} of {MIN_IMAGES // 2}) + stripes ({MIN_IMAGES // 2} of "
                             f"{MIN_IMAGES // 2})", f"stripes ({MIN_IMAGES // 2} of {MIN_IMAGES // 2}) + fields "
                             f"({MIN_IMAGES // 2} of {MIN_IMAGES // 2})")
    assert_no_machine_path(ref.to_dict(), tmp_path, generic_and_odd.parent, generic_and_odd.name)

    assert main(["outliers", str(generic_and_odd / "odd"), "--model", str(model), "--json", "-q", "--workers", "0",
                 "--top", "2"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["normalize"] == ref.to_dict() and "reference images" in doc["summary"]
    assert main(["outliers", str(generic_and_odd / "odd"), "--model", str(small_model_dir), "--json", "-q",
                 "--workers", "0", "--normalize", "reference"]) != 0
    assert "no reference mean" in capsys.readouterr().err
    assert main(["outliers", str(generic_and_odd / "odd"), "--model", str(small_model_dir), "-q", "--workers", "0"]) == 0
    assert "no reference mean, so raw cosine" in capsys.readouterr().out


def test_a_reference_left_beside_retrained_weights_is_refused(tmp_path, capsys, small_model_dir, generic_and_odd):
    model = tmp_path / "model"
    shutil.copytree(small_model_dir, model)
    write_reference(model, Normalizer("center", np.zeros(Encoder.load(model).dim, np.float32), fitted_on=300),
                    "an-older-model")
    assert main(["outliers", str(generic_and_odd / "odd"), "--model", str(model), "-q", "--workers", "0"]) != 0
    err = capsys.readouterr().err
    assert "computed for model 'an-older-model'" in err and "filterkit model reference" in err
    assert main(["model", "info", str(model), "--json"]) == 0  # the model itself still loads
    assert json.loads(capsys.readouterr().out)["reference"].startswith("unusable: ")
    assert main(["outliers", str(generic_and_odd / "odd"), "--model", str(model), "-q", "--workers", "0",
                 "--normalize", "none", "--json"]) == 0  # the raw space needs no reference
    assert json.loads(capsys.readouterr().out)["normalize"]["kind"] == "none"
