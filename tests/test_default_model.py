"""The default encoder that ships in models/: found with no --model from a source checkout,
an editable install and a built wheel; its metadata; the examples that use it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_no_machine_path
from filterkit import Encoder
from filterkit.cli import main
from filterkit.errors import FilterkitError
from filterkit.modeldir import DEFAULT_MODEL, default_model_path

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "models" / DEFAULT_MODEL
EXAMPLES = REPO / "examples"


def test_default_model_ships_in_models_and_loads_as_fp32():
    assert default_model_path().resolve() == SHIPPED.resolve()
    enc = Encoder.load(device="cpu")
    assert all(p.dtype.is_floating_point and p.dtype == __import__("torch").float32
               for p in enc.backbone.parameters())
    assert sum(f.stat().st_size for f in SHIPPED.iterdir()) < 25 * 2**20
    doc = json.loads((SHIPPED / "config.json").read_text())
    assert 0.5 < doc["thresholds"]["dedup"] < 1.0  # calibrated by `filterkit model calibrate`
    for name in ("imagenette_heldout", "cifar10_test"):
        q = doc["quality"][name]
        assert q["knn_top1"] > max(q["baselines"]["random_init"]["knn_top1"],
                                   q["baselines"]["raw_pixels"]["knn_top1"])
    assert "MoCo v3" in (SHIPPED / "MODEL_CARD.md").read_text()


def test_shipped_provenance_is_names_and_counts_with_the_device_that_trained_it():
    doc = json.loads((SHIPPED / "config.json").read_text())
    assert_no_machine_path(doc)
    assert doc["model_id"] == Encoder.load(SHIPPED, device="cpu").model_id  # metadata edits keep the id
    t = doc["training"]
    assert (t["method"], t["steps"], t["total_steps"], doc["data"]["images"]) == ("MoCo v3", 9740, 9740, 72710)
    assert t["compute"]["device"] and t["compute"]["wall_seconds"] > 0
    assert "stages" not in t and t["init_from"] is None  # one run from random init
    card = (SHIPPED / "MODEL_CARD.md").read_text()
    assert t["compute"]["device"] in card and "fp16" in card


def test_shipped_reference_mean_belongs_to_the_shipped_weights_and_names_its_images():
    enc = Encoder.load(device="cpu")
    ref = enc.reference()
    assert ref is not None and ref.kind == "center" and ref.fitted_on >= 1024
    assert ref.mean.shape == (enc.dim,) and np.isfinite(ref.mean).all()
    assert "imagenette" in ref.reference and "cifar10" in ref.reference
    assert_no_machine_path(ref.to_dict(), REPO, Path.home())


def test_model_card_regenerates_from_the_model_directory_alone(tmp_path):
    copy = tmp_path / "any-name"
    shutil.copytree(SHIPPED, copy)
    (copy / "MODEL_CARD.md").unlink()
    done = _run([sys.executable, str(REPO / "scripts" / "write_model_card.py"), str(copy)], cwd=tmp_path,
                env_extra={"PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert (copy / "MODEL_CARD.md").read_text() == (SHIPPED / "MODEL_CARD.md").read_text()
    assert (copy / "config.json").read_bytes() == (SHIPPED / "config.json").read_bytes()


def test_env_var_overrides_and_missing_default_is_a_clear_error(tmp_path, monkeypatch, small_encoder):
    small_encoder.save(tmp_path / "mine")
    monkeypatch.setenv("FILTERKIT_MODEL", str(tmp_path / "mine"))
    assert Encoder.load(device="cpu").model_id == small_encoder.model_id
    monkeypatch.delenv("FILTERKIT_MODEL")
    monkeypatch.setattr("filterkit.modeldir.DEFAULT_MODEL", "no-such-model")
    with pytest.raises(FilterkitError, match="default model 'no-such-model' is not installed"):
        Encoder.load()


def test_commands_without_model_use_the_default(capsys):
    assert main(["model", "info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert Path(info["path"]).resolve() == SHIPPED.resolve()
    assert info["reference"]["kind"] == "center" and info["reference"]["fitted_on"] == 4096
    assert main(["search", str(EXAMPLES / "exemplars" / "cat.jpg"), "--in", str(EXAMPLES / "incoming"),
                 "-k", "1", "--json", "--quiet"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert Path(hits["queries"][0]["results"][0]["path"]).name.startswith("cat_")


def _run(args, cwd, env_extra=None, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("FILTERKIT_MODEL", "PYTHONPATH")}
    env.update(env_extra or {})
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_editable_install_finds_the_model_from_anywhere(tmp_path):
    code = "from filterkit.modeldir import default_model_path; print(default_model_path())"
    done = _run([sys.executable, "-c", code], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).resolve() == SHIPPED.resolve()


def test_wheel_ships_the_model_and_filter_runs_from_it(tmp_path):
    """Build a wheel from a copy of the tracked sources, install it into a bare target folder and
    run `filterkit filter` from there with no --model: the model must come from the wheel."""
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split("\0")
    for name in files:
        if name and (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                  "-w", str(tmp_path / "dist"), str(src)], cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "dist").glob("filterkit-*.whl"))
    site = tmp_path / "site"
    installed = _run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                     cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr
    shutil.rmtree(src)  # nothing may come from the source tree
    # Every subpackage ships (an editable install in this venv would otherwise hide a missing one).
    packages = sorted(str(d.relative_to(REPO)) for d in (REPO / "filterkit").rglob("__init__.py"))
    missing = [name for name in packages if not (site / name).is_file()]
    assert not missing, f"the wheel lacks {missing}"
    shipped = sorted(p.name for p in (site / "filterkit" / "models" / DEFAULT_MODEL).iterdir())
    assert shipped == sorted(p.name for p in SHIPPED.iterdir()), "the wheel's model directory differs from models/"
    env = {"PYTHONPATH": str(site), "FILTERKIT_CACHE": str(tmp_path / "cache.sqlite")}
    where = _run([sys.executable, "-c", "import filterkit.modeldir as e; print(e.__file__); print(e.default_model_path())"],
                 cwd=tmp_path, env_extra=env)
    assert where.returncode == 0, where.stderr
    module_file, model_dir = where.stdout.split()
    assert Path(module_file).is_relative_to(site) and Path(model_dir).is_relative_to(site)
    ran = _run([sys.executable, "-m", "filterkit", "filter", str(EXAMPLES / "incoming"), "--keep-like",
                str(EXAMPLES / "exemplars"), "--json", "--quiet"], cwd=tmp_path, env_extra=env)
    assert ran.returncode == 0, ran.stderr
    summary = json.loads(ran.stdout)["summary"]
    assert summary["keep"] + summary["review"] + summary["reject"] == len(list((EXAMPLES / "incoming").iterdir()))


@pytest.mark.parametrize("script", ["filter_photos.py", "dedup_photos.py", "search_photos.py",
                                    "cluster_photos.py", "pretrain_photos.py"])
def test_example_scripts_run_offline_with_the_default_model(script, tmp_path):
    done = _run([sys.executable, str(EXAMPLES / script)], cwd=tmp_path,
                env_extra={"FILTERKIT_CACHE": str(tmp_path / "cache.sqlite")})
    assert done.returncode == 0, done.stderr
    out = done.stdout
    if script == "filter_photos.py":
        decisions = dict(line.split()[1::-1] for line in out.splitlines() if line.split()[:1] in (["keep"], ["reject"]))
        assert len(decisions) == len(list((EXAMPLES / "incoming").iterdir()))
    elif script == "dedup_photos.py":
        assert "astronaut_small.jpg" in out  # the half-size recompressed copy is found
    elif script == "search_photos.py":
        assert out.splitlines()[0].split()[1].startswith("cat_")  # an edited copy of the cat comes first
    elif script == "cluster_photos.py":
        assert sum(len(line.split(": ", 1)[1].split(", ")) for line in out.splitlines()) == \
            len(list((EXAMPLES / "incoming").iterdir()))
    else:
        assert "steps, final loss" in out and "(1, " in out
