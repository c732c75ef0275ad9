import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import sample_photo
from filterkit.cli import main


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_model_init_and_info(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "model", "init", "--preset", "vit-tiny-4-32", "--out", tmp_path / "m")
    assert code == 0 and "vit-tiny-4-32" in out
    code, out, _ = run_cli(capsys, "model", "info", tmp_path / "m", "--json")
    info = json.loads(out)
    assert code == 0
    assert info["embedding_dim"] == 192 and info["architecture"]["img_size"] == 32
    assert info["timm"]["model_name"] == "vit_tiny_patch16_224"


def test_model_init_force_replaces_a_model_but_never_mixes_into_other_folders(tmp_path, capsys):
    init = ("model", "init", "--preset", "vit-tiny-4-32", "--out")
    model = tmp_path / "m"
    assert run_cli(capsys, *init, model)[0] == 0
    code, _, err = run_cli(capsys, *init, model)
    assert code == 1 and "pass --force" in err
    assert run_cli(capsys, *init, model, "--seed", "1", "--force")[0] == 0  # a model directory: replaced

    photos = tmp_path / "holiday"
    photos.mkdir()
    (photos / "beach.jpg").write_bytes(b"mine")
    code, _, err = run_cli(capsys, *init, photos, "--force")
    assert code == 1 and "is not a model directory" in err and sorted(p.name for p in photos.iterdir()) == ["beach.jpg"]
    browsed = tmp_path / "browsed"  # only a file browser's litter: as good as empty, with --force
    browsed.mkdir()
    (browsed / ".DS_Store").write_bytes(b"\0")
    assert run_cli(capsys, *init, browsed, "--force")[0] == 0 and (browsed / "config.json").is_file()

    # a pretrain output: its checkpoint would outlive the new weights, and --resume carry on the old run
    (model / "training").mkdir()
    (model / "training" / "checkpoint.pt").write_bytes(b"hours of training")
    weights = (model / "model.safetensors").read_bytes()
    code, _, err = run_cli(capsys, *init, model, "--force")
    assert code == 1 and "holds a training run" in err and (model / "model.safetensors").read_bytes() == weights


def test_embed_then_search_json(tmp_path, capsys, photos_dir, small_model_dir):
    code, out, _ = run_cli(capsys, "embed", photos_dir, "--model", small_model_dir, "--json", "-q")
    summary = json.loads(out)
    assert code == 0 and summary["embedded"] == 8 and summary["skipped"] == []
    code, out, _ = run_cli(capsys, "embed", photos_dir, "--model", small_model_dir, "--json", "-q")
    assert json.loads(out)["embedded"] == 0 and json.loads(out)["cached"] == 8

    query = photos_dir / "chelsea.jpg"
    code, out, _ = run_cli(capsys, "search", query, "--in", photos_dir, "-k", "3",
                           "--model", small_model_dir, "--json", "-q")
    found = json.loads(out)
    answers = found["queries"]
    assert code == 0 and len(answers) == 1 and found["skipped"] == []
    assert answers[0]["query"] == str(query)
    assert [r["path"] for r in answers[0]["results"]][0] == str(query)
    assert len(answers[0]["results"]) == 3
    scores = [r["score"] for r in answers[0]["results"]]
    assert scores == sorted(scores, reverse=True)


def test_search_prints_a_table(capsys, photos_dir, small_model_dir):
    code, out, _ = run_cli(capsys, "search", photos_dir / "coffee.jpg", "--in", photos_dir, "-k", "2",
                           "--model", small_model_dir, "-q")
    assert code == 0 and "coffee.jpg" in out and "score" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["embed", "{tmp}/nope", "--model", "{model}"], "folder not found"),
        (["embed", "{tmp}/empty", "--model", "{model}"], "no images found"),
        (["embed", "{tmp}/empty"], "no images found"),  # the shipped default model, then the folder
        (["embed", "{tmp}/empty", "--model", "{tmp}/no_model"], "model directory not found"),
        (["embed", "{tmp}/empty", "--model", "{tmp}/empty"], "config.json missing"),
        (["search", "{tmp}/missing.jpg", "--in", "{tmp}/empty", "--model", "{model}"], "query image not found"),
        (["search", "{tmp}/empty", "--in", "{tmp}/empty", "--model", "{model}"],
         "is a folder: a query must be an image file"),
        (["model", "init", "--preset", "vit-giant", "--out", "{tmp}/m"], "unknown preset"),
        (["model", "info", "{tmp}/broken"], "malformed"),
        # nan compares false with every score: it would keep every image
        (["filter", "{tmp}/empty", "--keep-like", "{tmp}/empty", "--threshold", "nan"], "finite number"),
        (["search", "{tmp}/missing.jpg", "--index", "{tmp}/empty", "--normalize", "center"],
         "--normalize applies to --in"),
        # exemplars inside INCOMING would be scored as incoming, and --action move would move them away
        (["filter", "{tmp}/empty", "--keep-like", "{tmp}/empty/exemplars"], "is inside INCOMING"),
        (["filter", "{tmp}/empty", "--keep-like", "{tmp}/k", "--reject-like", "{tmp}/k"], "are the same folder"),
        (["filter", "{tmp}/empty", "--keep-like", "{tmp}/k", "--map", "{tmp}/empty/map.png"],
         "is inside the input folder"),
        # options that would be ignored
        (["filter", "{tmp}/empty", "--keep-like", "{tmp}/k", "--out", "{tmp}/o"], "add --action, or drop --out"),
        (["filter", "{tmp}/empty", "--keep-like", "{tmp}/k", "--dry-run"], "--dry-run shows what --action"),
        (["filter", "{tmp}/empty", "--keep-like", "{tmp}/k", "--reject-like", "{tmp}/r", "--target-recall", "0.5"],
         "--target-recall sets the threshold without --reject-like"),
        (["dedup", "{tmp}/empty", "--threshold", "1.6"], "lies in [-1.5, 1.5]"),
        (["filter", "{tmp}/empty", "--keep-like", "{tmp}/k", "--threshold", "0.8", "--target-recall", "0.9"],
         "a fixed --threshold is used as given"),
    ],
)
def test_user_mistakes_are_one_line_errors(tmp_path, capsys, small_model_dir, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{")
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"")
    args = [a.format(tmp=tmp_path, model=small_model_dir) for a in args]
    code, out, err = run_cli(capsys, *args)
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["dedupe", "."], "No such command"),
        (["dedup", ".", "--no-such-option"], "No such option"),
        (["filter", ".", "--keep-like"], "requires an argument"),
        (["model", "inf"], "No such command"),
    ],
)
def test_usage_mistakes_get_typers_message_not_a_traceback(capsys, args, message):
    # Whatever click typer bundles (typer 0.29 vendors its own), its usage errors reach the
    # user as a message and exit status 2.
    code, out, err = run_cli(capsys, *args)
    assert code == 2, (out, err)
    assert message in err and "Traceback" not in err + out


@pytest.mark.parametrize("how", ["console script", "python -m"])
def test_the_installed_command_reports_a_typo_without_a_traceback(how):
    script = Path(sys.executable).parent / "filterkit"  # what `pip install` put beside this python
    assert how != "console script" or script.exists(), f"filterkit is not installed in {script.parent}"
    command = [str(script)] if how == "console script" else [sys.executable, "-m", "filterkit"]
    done = subprocess.run([*command, "dedup", ".", "--no-such-option"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "No such option" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("command", ["embed", "model info"])  # the top app and a sub-app
def test_ctrl_c_in_any_command_is_one_line_and_status_130(tmp_path, capsys, monkeypatch, command):
    import filterkit.encoder
    import filterkit.pipeline

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(filterkit.pipeline, "embed_folder", interrupt)
    monkeypatch.setattr(filterkit.encoder.Encoder, "load", interrupt)
    (tmp_path / "in").mkdir()
    args = ["embed", tmp_path / "in", "--cache", tmp_path / "c.sqlite"] if command == "embed" else ["model", "info"]
    code, out, err = run_cli(capsys, *args)
    assert code == 130 and err.strip() == "interrupted" and "Traceback" not in out + err


def test_version(capsys):
    from filterkit import __version__

    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"filterkit {__version__}"


def test_help_does_not_import_torch():
    code = "import sys; from filterkit.cli import app; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_kill_9_mid_embed_then_rerun_gives_a_complete_valid_cache(tmp_path, small_model_dir):
    folder = tmp_path / "many"
    folder.mkdir()
    photo = sample_photo("rocket")
    n = 240
    for i in range(n):
        photo.crop((i, i // 2, i + 200, i // 2 + 150)).save(folder / f"{i:03d}.jpg", quality=80)
    cache = tmp_path / "kill.sqlite"
    cmd = [sys.executable, "-m", "filterkit", "embed", str(folder), "--model", str(small_model_dir),
           "--cache", str(cache), "--batch-size", "4", "--workers", "0", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done_at_kill = 0
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if cache.exists():
                try:
                    with sqlite3.connect(cache, timeout=1) as db:
                        done_at_kill = db.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0]
                except sqlite3.OperationalError:
                    pass  # schema not created yet
            if done_at_kill >= 20:
                break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "embed finished before it could be killed"
    assert 0 < done_at_kill < n

    rerun = subprocess.run(cmd + ["--json"], capture_output=True, text=True, check=True)
    summary = json.loads(rerun.stdout)
    assert summary["embedded"] + summary["cached"] == n
    assert summary["cached"] >= done_at_kill
    with sqlite3.connect(cache) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0] == n
        assert db.execute("SELECT COUNT(*) FROM files").fetchone()[0] == n


def test_the_error_list_in_docs_is_current():
    """docs/ERRORS.md lists every user-facing error; regenerate it when a message changes."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, str(root / "scripts" / "list_errors.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_pretrain_help_shows_defaults(capsys, monkeypatch):
    # Help texts once wrote "[default: ...]" themselves; rich read it as markup and dropped it.
    monkeypatch.setenv("COLUMNS", "250")
    code, out, _ = run_cli(capsys, "pretrain", "--help")
    assert code == 0
    lines: dict[str, str] = {}  # option -> its help, wrapped lines joined
    for line in out.splitlines():
        text = line.strip("│ ")
        if text.lstrip("* ").startswith("--"):
            option = text.lstrip("* ").split()[0]
            lines[option] = text
        elif lines and text and not text.startswith(("╭", "╰")):
            lines[option] += " " + text
    assert "0.99" in lines["--momentum"] and "1.5e-4 x batch / 256" in lines["--lr"]
    assert not any(" ." in line for line in lines.values())
    # The CLI cannot import train.py (torch) to render --help, so it repeats these defaults.
    from filterkit.train import DEFAULTS

    for field in ("weight_decay", "temperature", "momentum", "seed", "checkpoint_every"):
        shown = lines["--" + field.replace("_", "-")]
        assert f"[default: ({DEFAULTS[field]})" in shown, (field, shown)


def test_pretrain_lr_help_names_every_base_lr_of_the_preset_table(capsys, monkeypatch):
    import re

    from filterkit.presets import PRESETS, _short

    monkeypatch.setenv("COLUMNS", "400")
    code, out, _ = run_cli(capsys, "pretrain", "--help")
    text = re.sub(r"[│\s]+", " ", out)  # rich may wrap the long default onto a second line
    lrs = {_short(r.base_lr) for p in PRESETS.values() for r in (p.cpu, p.gpu) if r is not None}
    missing = lrs - set(re.findall(r"(\S+) x batch / 256", text))
    assert code == 0 and not missing, missing
    assert _short(0.0005) == "5e-4" and _short(0.00015) == "1.5e-4"
    # The resolved lr of the CPU default is what the help says for its arch: 5e-4 x 128 / 256.
    from filterkit.presets import default_preset, get_preset
    from filterkit.train import TrainOptions

    preset = get_preset(default_preset("cpu"))
    assert f"5e-4 x batch / 256 for {preset.arch};" in text
    assert TrainOptions().resolved("cpu").lr == pytest.approx(5e-4 * preset.cpu.batch_size / 256)


def test_model_init_help_lists_every_preset(capsys, monkeypatch):
    from filterkit.presets import PRESETS

    monkeypatch.setenv("COLUMNS", "400")
    code, out, _ = run_cli(capsys, "model", "init", "--help")
    assert code == 0
    missing = [name for name in PRESETS if name not in out]
    assert not missing, missing
