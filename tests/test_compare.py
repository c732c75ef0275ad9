"""compare-methods: the label-free signals against their formulas, the method choice, and a
tiny end-to-end comparison of two methods."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_no_machine_path
from filterkit import Encoder, FilterkitError
from filterkit.cli import main
from filterkit.compare import alignment, choose_methods, exemplar_auroc, rankme, uniformity

TINY_CLI = ["--preset", "vit-mini-8-32", "--depth", "1", "--batch-size", "8", "--workers", "0", "-q"]


def test_rankme_is_the_effective_rank_of_the_singular_values():
    d = 8
    assert rankme(torch.eye(d)) == pytest.approx(d, rel=1e-5)  # all singular values equal: full rank
    rank1 = torch.outer(torch.arange(1.0, 11.0), torch.randn(d, generator=torch.Generator().manual_seed(0)))
    assert rankme(rank1) == pytest.approx(1.0, abs=1e-4)
    # two singular values 3 and 1: p = (0.75, 0.25), exp(entropy)
    z = torch.diag(torch.tensor([3.0, 1.0, 0.0]))
    p = np.array([0.75, 0.25]) + 1e-7
    assert rankme(z) == pytest.approx(math.exp(-(p * np.log(p)).sum() - 1e-7 * math.log(1e-7)), rel=1e-6)


def test_alignment_and_uniformity_equal_their_formulas():
    g = torch.Generator().manual_seed(1)
    z = F.normalize(torch.randn(6, 4, generator=g), dim=1)
    assert alignment(z, z) == 0.0
    other = F.normalize(torch.randn(6, 4, generator=g), dim=1)
    assert alignment(z, other) == pytest.approx(float(((z - other) ** 2).sum(1).mean()), rel=1e-6)
    # two antipodal points: one pair at squared distance 4, log exp(-2 * 4) = -8
    assert uniformity(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(-8.0)
    pairs = [float(((z[i] - z[j]) ** 2).sum()) for i in range(6) for j in range(i + 1, 6)]
    assert uniformity(z) == pytest.approx(math.log(np.mean(np.exp(-2.0 * np.array(pairs)))), rel=1e-6)
    assert uniformity(z[:1].repeat(3, 1)) == pytest.approx(0.0)  # one point: 0, the worst


def test_exemplar_auroc_separates_exemplars_that_stand_out():
    g = np.random.default_rng(0)
    centre = np.eye(16)[0]
    ex = centre + 0.1 * g.normal(size=(10, 16))
    pool = g.normal(size=(200, 16))
    unit = lambda v: (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    assert exemplar_auroc(unit(pool), unit(ex)) > 0.95
    assert 0.2 < exemplar_auroc(unit(pool), unit(g.normal(size=(10, 16)))) < 0.8  # exemplars like the rest


def test_supcon_is_offered_only_with_class_folders_and_errors_are_clear(tmp_path, train_dir, photos_dir):
    assert "supcon" in choose_methods(train_dir, None)
    assert "supcon" not in choose_methods(photos_dir, None) and "moco-v3" in choose_methods(photos_dir, None)
    with pytest.raises(FilterkitError, match="--methods supcon is supervised"):
        choose_methods(photos_dir, ["simclr", "supcon"])
    with pytest.raises(FilterkitError, match="unknown method 'dino'"):
        choose_methods(photos_dir, ["dino"])
    with pytest.raises(FilterkitError, match="lists a method twice"):
        choose_methods(photos_dir, ["byol", "byol"])


def test_cli_errors_are_one_line(tmp_path, train_dir, capsys):
    assert main(["compare-methods", str(train_dir), "--minutes", "1", "--methods", "mocov3", "--out",
                 str(tmp_path / "a"), "-q"]) == 1
    assert "error: unknown method 'mocov3'" in capsys.readouterr().err
    assert main(["compare-methods", str(train_dir), "--minutes", "-1", "--out", str(tmp_path / "b"), "-q"]) == 1
    assert "error: --minutes must be a positive number of minutes per method" in capsys.readouterr().err
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x").write_text("mine")
    assert main(["compare-methods", str(train_dir), "--minutes", "1", "--out", str(tmp_path / "c"), "-q"]) == 1
    assert "already holds files" in capsys.readouterr().err and (tmp_path / "c" / "x").read_text() == "mine"
    assert main(["compare-methods", str(train_dir), "--minutes", "0.0001", "--methods", "simclr", "--out",
                 str(tmp_path / "d"), *TINY_CLI]) == 1
    assert "is too small: one training step takes" in capsys.readouterr().err


def test_two_methods_at_a_tiny_budget_rank_by_knn_with_both_baselines(tmp_path, train_dir, capsys):
    out = tmp_path / "cmp"
    # A generous budget capped at 2 steps: the outcome must not depend on how loaded the machine is.
    code = main(["compare-methods", str(train_dir), "--minutes", "1", "--max-steps", "2", "--methods",
                 "moco-v3,simclr", "--labelled", str(train_dir), "--out", str(out), *TINY_CLI])
    printed = capsys.readouterr().out
    assert code == 0 and "winner:" in printed and "kNN▼" in printed and "random init" in printed
    doc = json.loads((out / "compare.json").read_text())
    assert_no_machine_path(doc, tmp_path)
    assert doc["ranked_by"] == "knn_top1" and sorted(doc["ranking"]) == ["moco-v3", "simclr"]
    assert doc["winner"]["method"] == doc["ranking"][0]
    knn = [r["signals"]["knn_top1"] for r in doc["runs"]]
    assert knn == sorted(knn, reverse=True) and all(0 <= v <= 1 for v in knn)
    assert set(doc["baselines"]) == {"random_init", "raw_pixels"}
    assert 0 <= doc["baselines"]["raw_pixels"]["knn_top1"] <= 1
    for run in doc["runs"]:
        assert run["stopped_by"] in ("steps", "minutes") and run["steps"] >= 1
        assert 1 <= run["signals"]["rankme"] <= 192 and 0 <= run["signals"]["alignment"] <= 4
        training = json.loads((out / run["model"] / "config.json").read_text())["training"]
        assert training["method_option"] == run["method"] and training["minutes"] == 1 and training["steps"] <= 2
        Encoder.load(out / run["model"], device="cpu")  # every run's model directory is kept and loads


def test_label_free_ranking_with_exemplars_and_json(tmp_path, train_dir, capsys):
    out = tmp_path / "cmp"
    code = main(["compare-methods", str(train_dir), "--minutes", "1", "--max-steps", "2", "--methods", "byol,simsiam",
                 "--exemplars", str(train_dir / "part0"), "--out", str(out), "--json", *TINY_CLI])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc == json.loads((out / "compare.json").read_text())
    assert doc["ranked_by"] == "exemplar_auroc" and doc["winner"]["method"] in ("byol", "simsiam")
    aurocs = [r["signals"]["exemplar_auroc"] for r in doc["runs"]]
    assert aurocs == sorted(aurocs, reverse=True) and all(r["signals"]["knn_top1"] is None for r in doc["runs"])
    assert "exemplar_auroc" in doc["baselines"]["raw_pixels"] and "knn_top1" not in doc["baselines"]["raw_pixels"]


def test_a_method_that_fails_its_health_check_is_ranked_last_and_the_others_still_run(tmp_path, train_dir,
                                                                                   monkeypatch, capsys):
    import filterkit.methods.simclr as simclr

    monkeypatch.setattr(simclr, "nt_xent", lambda z1, z2, t: (z1.sum() + z2.sum()) * float("nan"))
    out = tmp_path / "cmp"
    code = main(["compare-methods", str(train_dir), "--minutes", "1", "--max-steps", "2", "--methods", "simclr,moco-v3",
                 "--out", str(out), *TINY_CLI])
    printed = capsys.readouterr().out
    doc = json.loads((out / "compare.json").read_text())
    assert code == 0 and doc["ranked_by"] == "rankme" and doc["ranking"] == ["moco-v3", "simclr"]
    assert doc["winner"]["method"] == "moco-v3" and "simclr failed: loss became nan" in printed
    failed = doc["runs"][1]
    assert failed["signals"] is None and failed["error"].startswith("loss became nan")


def test_every_method_failing_is_a_one_line_error(tmp_path, train_dir, monkeypatch, capsys):
    import filterkit.methods.simclr as simclr

    monkeypatch.setattr(simclr, "nt_xent", lambda z1, z2, t: (z1.sum() + z2.sum()) * float("nan"))
    code = main(["compare-methods", str(train_dir), "--minutes", "1", "--max-steps", "2", "--methods", "simclr", "--out",
                 str(tmp_path / "cmp"), *TINY_CLI])
    assert code == 1 and "error: every method stopped on a health check" in capsys.readouterr().err
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["runs"][0]["error"].startswith("loss became")


# -- an interrupted comparison, resumed -----------------------------------------------------------
TWO = ["--minutes", "1", "--max-steps", "2", "--methods", "moco-v3,simclr"]


class _Trainer:
    """pretrain, watched: every call in ``calls`` as (method, resumed); while ``error`` is set,
    it is raised in ``method``'s training loop after its first step."""

    def __init__(self, monkeypatch, method, error):
        from filterkit import train
        from filterkit.train.monitor import Monitor

        self.calls, self.method, self.error = [], method, error
        real_pretrain, real_after_step = train.pretrain, Monitor.after_step

        def pretrain(data_dir, out_dir, options, **kw):
            self.calls.append((options.method, kw.get("resume", False)))
            return real_pretrain(data_dir, out_dir, options, **kw)

        def after_step(monitor, step, *args, **kw):
            if self.error is not None and self.calls[-1][0] == self.method and step == 1:
                raise self.error
            return real_after_step(monitor, step, *args, **kw)

        monkeypatch.setattr(train, "pretrain", pretrain)
        monkeypatch.setattr(Monitor, "after_step", after_step)


def test_ctrl_c_keeps_the_finished_method_and_resume_continues_the_interrupted_one(tmp_path, train_dir,
                                                                                    monkeypatch, capsys):
    out = tmp_path / "cmp"
    cmd = ["compare-methods", str(train_dir), *TWO, "--out", str(out), *TINY_CLI]
    trainer = _Trainer(monkeypatch, "simclr", KeyboardInterrupt())
    assert main(cmd) == 130
    err = capsys.readouterr().err
    assert "interrupted: 1 of 2 methods finished" in err and "Traceback" not in err
    assert "simclr was interrupted and will continue from its checkpoint (step 1)" in err
    assert f"--out {out}" in err and err.rstrip().endswith("--resume`")
    record = json.loads((out / "compare-record.json").read_text())
    assert_no_machine_path(record, tmp_path)
    assert list(record["runs"]) == ["moco-v3"] and record["settings"]["seed"] == 0
    first = record["runs"]["moco-v3"]
    assert first["model"] == "moco-v3" and first["steps"] == 2 and first["signals"]["rankme"] >= 1

    assert main(cmd) == 1  # the same command without --resume neither resumes nor deletes by surprise
    assert "holds this comparison already (1 of 2 methods finished): pass --resume" in capsys.readouterr().err

    trainer.calls, trainer.error = [], None
    assert main([*cmd, "--resume"]) == 0
    assert trainer.calls == [("simclr", True)]  # moco-v3 not trained again; simclr continued from its checkpoint
    assert "winner:" in capsys.readouterr().out
    doc = json.loads((out / "compare.json").read_text())
    assert sorted(doc["ranking"]) == ["moco-v3", "simclr"] and set(doc["baselines"]) == {"random_init", "raw_pixels"}
    runs = {r["method"]: r for r in doc["runs"]}
    assert runs["simclr"]["resumed_at_step"] == 1 and runs["simclr"]["steps"] == 2
    assert runs["moco-v3"]["resumed_at_step"] is None and runs["moco-v3"]["model_id"] == first["model_id"]
    assert json.loads((out / "compare-record.json").read_text())["runs"]["moco-v3"] == first
    Encoder.load(out / "simclr", device="cpu")


def test_a_crash_mid_method_reruns_that_method_from_scratch(tmp_path, train_dir, monkeypatch):
    from filterkit.compare import compare_methods

    out = tmp_path / "cmp"
    kw = {"methods": ["moco-v3", "simclr"], "preset": "vit-mini-8-32", "depth": 1, "batch_size": 8, "workers": 0,
          "progress": False, "max_steps": 2, "device": "cpu"}
    trainer = _Trainer(monkeypatch, "simclr", RuntimeError("the machine fell over"))
    with pytest.raises(RuntimeError, match="fell over"):
        compare_methods(train_dir, out, 1, **kw)
    assert list(json.loads((out / "compare-record.json").read_text())["runs"]) == ["moco-v3"]
    assert not (out / "simclr" / "training" / "checkpoint.pt").exists()  # no checkpoint before step 500
    trainer.calls, trainer.error = [], None
    result = compare_methods(train_dir, out, 1, resume=True, **kw)
    assert trainer.calls == [("simclr", False)]  # started again (its partial folder held only the log)
    assert sorted(r.method for r in result.ranked()) == ["moco-v3", "simclr"] and result.baselines
    assert {r.method: r.resumed_at_step for r in result.runs} == {"moco-v3": None, "simclr": None}


def test_a_method_folder_replaced_by_a_symbolic_link_is_refused_not_written_through(tmp_path, train_dir,
                                                                                    monkeypatch):
    import shutil

    from filterkit.compare import compare_methods

    out, elsewhere = tmp_path / "cmp", tmp_path / "elsewhere"
    kw = {"methods": ["moco-v3", "simclr"], "preset": "vit-mini-8-32", "depth": 1, "batch_size": 8, "workers": 0,
          "progress": False, "max_steps": 2, "device": "cpu"}
    _Trainer(monkeypatch, "simclr", RuntimeError("the machine fell over"))
    with pytest.raises(RuntimeError, match="fell over"):
        compare_methods(train_dir, out, 1, **kw)
    shutil.rmtree(out / "simclr", ignore_errors=True)
    (elsewhere / "training").mkdir(parents=True)
    (elsewhere / "training" / "checkpoint.pt").write_bytes(b"someone else's run")  # would be resumed into
    (out / "simclr").symlink_to(elsewhere, target_is_directory=True)
    monkeypatch.undo()
    with pytest.raises(FilterkitError, match="is a symbolic link"):
        compare_methods(train_dir, out, 1, resume=True, **kw)
    assert [p.name for p in elsewhere.rglob("*")] == ["training", "checkpoint.pt"]
    assert (elsewhere / "training" / "checkpoint.pt").read_bytes() == b"someone else's run"


def test_a_recorded_run_that_cannot_be_read_is_a_clear_error(tmp_path, train_dir, monkeypatch):
    from filterkit.compare import compare_methods

    out = tmp_path / "cmp"
    kw = {"methods": ["moco-v3", "simclr"], "preset": "vit-mini-8-32", "depth": 1, "batch_size": 8, "workers": 0,
          "progress": False, "max_steps": 2, "device": "cpu"}
    _Trainer(monkeypatch, "simclr", RuntimeError("the machine fell over"))
    with pytest.raises(RuntimeError, match="fell over"):
        compare_methods(train_dir, out, 1, **kw)
    record = json.loads((out / "compare-record.json").read_text())
    record["runs"]["moco-v3"]["signals"]["rank_me"] = record["runs"]["moco-v3"]["signals"].pop("rankme")
    (out / "compare-record.json").write_text(json.dumps(record))
    with pytest.raises(FilterkitError, match="the run of moco-v3 cannot be read"):
        compare_methods(train_dir, out, 1, resume=True, **kw)


def test_a_different_comparison_in_the_folder_is_refused_naming_the_options(tmp_path, train_dir, photos_dir,
                                                                           capsys):
    out = tmp_path / "cmp"
    run = ["--minutes", "1", "--max-steps", "1", "--methods", "simsiam"]
    one = [*run, "--out", str(out), *TINY_CLI]
    assert main(["compare-methods", str(train_dir), *one]) == 0
    model_id = json.loads((out / "simsiam" / "config.json").read_text())["model_id"]
    capsys.readouterr()
    assert main(["compare-methods", str(train_dir), *one, "--seed", "1", "--max-images", "5", "--resume"]) == 1
    err = capsys.readouterr().err
    assert "holds another comparison (1 of 1 methods finished)" in err
    assert "--seed (recorded 0, now 1); --max-images (recorded 1000, now 5)" in err and "--overwrite" in err
    assert main(["compare-methods", str(photos_dir), *one, "--resume"]) == 1
    assert "FOLDER (recorded 'train" in capsys.readouterr().err
    assert TINY_CLI[2:4] == ["--depth", "1"]
    no_depth = TINY_CLI[:2] + TINY_CLI[4:]  # the preset's own depth: another comparison
    assert main(["compare-methods", str(train_dir), *run, "--out", str(out), *no_depth, "--resume"]) == 1
    assert "--depth (recorded 1, now not given)" in capsys.readouterr().err
    assert main(["compare-methods", str(train_dir), *one, "--resume", "--overwrite"]) == 1
    assert "give one or the other" in capsys.readouterr().err
    # An option that cannot run is refused before overwrite deletes anything (the API has no CLI checks).
    from filterkit.compare import compare_methods

    for bad, message in (({"preset": "vit-nope"}, "unknown preset 'vit-nope'"),
                         ({"batch_size": 1}, "--batch-size 1 is too small")):
        kw = {"methods": ["simsiam"], "preset": "vit-mini-8-32", "depth": 1, "batch_size": 8, "workers": 0,
              "progress": False, "max_steps": 1, "device": "cpu", **bad}
        with pytest.raises(FilterkitError, match=message):
            compare_methods(train_dir, out, 1, seed=1, overwrite=True, **kw)
        assert (out / "compare-record.json").is_file()
    # Nothing was touched by the refusals; a file of the user's in a method's folder is not deleted:
    # --overwrite is refused, whole, until it is moved away; then it replaces the comparison.
    assert json.loads((out / "simsiam" / "config.json").read_text())["model_id"] == model_id
    (out / "simsiam" / "notes.txt").write_text("what I saw")
    (out / "simsiam" / "training" / ".checkpoint.pt.k3j9.tmp").write_bytes(b"cut off")  # an atomic write's
    capsys.readouterr()
    assert main(["compare-methods", str(train_dir), *one, "--seed", "1", "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert f"--overwrite would delete {out / 'simsiam' / 'notes.txt'}, which the comparison did not write" in err
    assert (out / "simsiam" / "notes.txt").read_text() == "what I saw" and (out / "compare-record.json").is_file()
    (out / "simsiam" / "notes.txt").unlink()
    (out / "simsiam" / "photos").symlink_to(tmp_path, target_is_directory=True)  # a link of the user's, to a folder
    assert main(["compare-methods", str(train_dir), *one, "--seed", "1", "--overwrite"]) == 1
    assert f"--overwrite would delete {out / 'simsiam' / 'photos'}" in capsys.readouterr().err
    (out / "simsiam" / "photos").unlink()
    assert main(["compare-methods", str(train_dir), *one, "--seed", "1", "--overwrite"]) == 0
    assert not (out / "simsiam" / "training" / ".checkpoint.pt.k3j9.tmp").exists()
    assert json.loads((out / "compare-record.json").read_text())["settings"]["seed"] == 1
    assert json.loads((out / "compare.json").read_text())["seed"] == 1
    again = [*one, "--seed", "1", "--resume"]
    # A recorded method whose folder was deleted is trained again; one that holds another model is refused.
    shutil.rmtree(out / "simsiam")
    assert main(["compare-methods", str(train_dir), *again]) == 0
    config = json.loads((out / "simsiam" / "config.json").read_text())
    assert config["model_id"] == json.loads((out / "compare-record.json").read_text())["runs"]["simsiam"]["model_id"]
    (out / "simsiam" / "config.json").write_text(json.dumps({**config, "model_id": "0123456789abcdef"}))
    assert main(["compare-methods", str(train_dir), *again]) == 1
    assert "holds model 0123456789abcdef, not the model" in capsys.readouterr().err
    # A folder whose files are no comparison's is refused even with --overwrite, and left as it was.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "x").write_text("mine")
    assert main(["compare-methods", str(train_dir), *run, "--out", str(tmp_path / "mine"), *TINY_CLI,
                 "--overwrite"]) == 1
    assert "no compare-record.json of a comparison to resume" in capsys.readouterr().err
    assert (tmp_path / "mine" / "x").read_text() == "mine"


def test_the_record_is_never_half_written(tmp_path, train_dir, monkeypatch):
    """A kill while the record is being replaced leaves the previous record whole (and no
    temporary file); the rerun then measures the method whose training had finished."""
    import os

    from filterkit.compare import ComparisonInterrupted, compare_methods

    out = tmp_path / "cmp"
    real_replace, seen = os.replace, []

    def replace(src, dst):
        if os.path.basename(dst) == "compare-record.json":
            seen.append(json.loads(Path(src).read_text()))
            if seen[-1]["runs"]:  # the write that records the first method: killed before the rename
                raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    kw = {"methods": ["byol"], "preset": "vit-mini-8-32", "depth": 1, "batch_size": 8, "workers": 0,
          "progress": False, "max_steps": 2, "device": "cpu"}
    with pytest.raises(ComparisonInterrupted) as stopped:
        compare_methods(train_dir, out, 1, **kw)
    assert stopped.value.finished == [] and stopped.value.method == "byol" and stopped.value.step == 2
    on_disk = json.loads((out / "compare-record.json").read_text())
    assert on_disk["runs"] == {} and on_disk["settings"] == seen[-1]["settings"]
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []
    monkeypatch.setattr(os, "replace", real_replace)
    result = compare_methods(train_dir, out, 1, resume=True, **kw)
    (run,) = result.runs
    assert run.resumed_at_step == 2 and run.steps == 2 and run.signals is not None and run.final_loss is not None
