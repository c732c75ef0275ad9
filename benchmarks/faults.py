"""Fault injection: SIGKILL `filterkit embed`, `filterkit filter --action move` and `filterkit
pretrain` at random moments, then rerun them, and check that nothing was lost.

    python benchmarks/faults.py [--n 20] [--photos 120] [--seed 0] [--work /tmp/fk-faults]

After each kill + rerun:
  embed     the cache passes PRAGMA integrity_check and holds every photo's vector;
  move      the sha256 multiset of incoming/ + out/ equals the one before (no file lost or
            duplicated) and nothing is left in incoming/ (the move completed);
  pretrain  the rerun resumes from the last checkpoint (or starts over if none was written
            yet) and reaches the final step; the model directory loads.
Finally two `embed` processes fill one cache at the same time. Prints one line per trial and
a summary (faults injected, files lost, caches corrupted). tests/test_faults.py runs a short
version of the same trials.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

FK = [sys.executable, "-m", "filterkit"]


def make_photos(folder: Path, n: int, seed: int = 0) -> None:
    """``n`` distinct JPEGs cut from scikit-image's sample photos."""
    import skimage.data

    rng = np.random.default_rng(seed)
    sources = [Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB")
               for name in ("astronaut", "chelsea", "coffee", "rocket")]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        src = sources[i % len(sources)]
        x, y = (int(v) for v in rng.integers(0, 120, 2))
        src.crop((x, y, x + 240, y + 180)).save(folder / f"{i:04d}.jpg", quality=int(rng.integers(70, 95)))


def sha_multiset(*folders: Path) -> Counter:
    found: Counter = Counter()
    for folder in folders:
        for p in folder.rglob("*"):
            if p.is_file() and not p.name.startswith(".filterkit-journal"):
                found[hashlib.sha256(p.read_bytes()).hexdigest()] += 1
    return found


def kill_when(cmd: list[str], ready, env: dict, delay: float = 0.0, timeout: float = 600) -> bool:
    """Start ``cmd`` and SIGKILL it once ``ready()`` (a sign of progress chosen at random by
    the caller) holds, plus ``delay`` seconds; True if it was killed before finishing. Progress
    markers instead of wall-clock delays put the kill mid-work on a fast or a loaded machine."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + timeout
    try:
        while proc.poll() is None and time.time() < deadline:
            try:
                if ready():
                    time.sleep(delay)
                    break
            except (OSError, sqlite3.Error):
                pass  # the marker is being written
            time.sleep(0.02)
        if proc.poll() is not None:
            return False
        os.kill(proc.pid, signal.SIGKILL)
        return True
    finally:
        proc.wait()


def _rows(cache: Path) -> int:
    if not cache.exists():
        return 0
    with sqlite3.connect(cache, timeout=1) as db:
        return db.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0]


def _run(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")
    return done


def integrity(cache: Path) -> str:
    with sqlite3.connect(cache) as db:
        return db.execute("PRAGMA integrity_check").fetchone()[0]


def embed_trial(work: Path, photos: Path, model: Path, rng, env) -> dict:
    cache = work / "embed.sqlite"
    for p in work.glob("embed.sqlite*"):
        p.unlink()
    cmd = [*FK, "embed", str(photos), "--model", str(model), "--cache", str(cache), "--batch-size", "8", "-q"]
    n = len(list(photos.glob("*.jpg")))
    target = int(rng.integers(1, n))  # kill once this many vectors are committed (+ a little)
    killed = kill_when(cmd, lambda: _rows(cache) >= target, env, float(rng.uniform(0, 0.3)))
    ok_after_kill = not cache.exists() or integrity(cache) == "ok"
    summary = json.loads(_run([*cmd, "--json"], env).stdout)
    return {"killed": killed, "corrupted": not (ok_after_kill and integrity(cache) == "ok"),
            "lost": n - (summary["embedded"] + summary["cached"])}


def move_trial(work: Path, photos: Path, exemplars: Path, model: Path, rng, env) -> dict:
    incoming, out = work / "incoming", work / "moved"
    shutil.rmtree(incoming, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(photos, incoming)
    before = sha_multiset(incoming)
    cmd = [*FK, "filter", str(incoming), "--keep-like", str(exemplars), "--action", "move", "--out", str(out),
           "--model", str(model), "--cache", str(work / "move.sqlite"), "-q"]
    n = sum(1 for p in incoming.iterdir() if p.is_file())
    target = int(rng.integers(0, n))  # kill once this many files have left incoming/
    gone = lambda: n - sum(1 for p in incoming.iterdir() if p.is_file()) >= target  # noqa: E731
    killed = kill_when(cmd, gone, env, float(rng.uniform(0, 0.05)))
    if any(p.is_file() for p in incoming.iterdir()):  # (killed after the last move: nothing to rerun)
        _run(cmd, env)  # the rerun finishes any journaled move, then moves what is left
    after = sha_multiset(incoming, out)
    left = [p for p in incoming.rglob("*") if p.is_file()]
    return {"killed": killed, "lost": sum((before - after).values()), "duplicated": sum((after - before).values()),
            "left_in_incoming": len(left)}


def pretrain_trial(work: Path, photos: Path, rng, env, steps: int = 8) -> dict:
    out = work / "pretrained"
    shutil.rmtree(out, ignore_errors=True)
    base = [*FK, "pretrain", str(photos), "--out", str(out), "--preset", "vit-mini-8-32", "--depth", "1",
            "--batch-size", "8", "--epochs", "100", "--max-steps", str(steps), "--checkpoint-every", "1",
            "--workers", "0", "-q"]
    log = out / "training" / "log.jsonl"
    target = int(rng.integers(0, steps))  # kill once this many steps are logged
    logged = lambda: log.is_file() and sum(1 for _ in log.open()) >= target  # noqa: E731
    killed = kill_when(base, logged, env, float(rng.uniform(0, 0.5)))
    resumed = (out / "training" / "checkpoint.pt").is_file()
    if not resumed:
        shutil.rmtree(out, ignore_errors=True)  # killed before the first checkpoint: start over
    done = _run(base + (["--resume"] if resumed else []), env)
    from filterkit.encoder import Encoder

    Encoder.load(out, device="cpu")
    finished = f"trained {steps} steps" in done.stdout
    return {"killed": killed, "resumed": resumed, "lost": 0 if finished else 1}


def concurrent_embed(work: Path, photos: Path, model: Path, env) -> dict:
    cache = work / "shared.sqlite"
    for p in work.glob("shared.sqlite*"):
        p.unlink()
    cmd = [*FK, "embed", str(photos), "--model", str(model), "--cache", str(cache), "--batch-size", "8", "-q"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env) for _ in range(2)]
    codes = [p.wait() for p in procs]
    with sqlite3.connect(cache) as db:
        count = db.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0]
    return {"exit_codes": codes, "corrupted": integrity(cache) != "ok",
            "lost": len(list(photos.glob("*.jpg"))) - count}


def run_all(work: Path, n: int, n_photos: int, seed: int, say=print,
            kinds: tuple[str, ...] = ("embed", "move", "pretrain")) -> dict:
    from filterkit.encoder import Encoder

    rng = np.random.default_rng(seed)
    work.mkdir(parents=True, exist_ok=True)
    photos, exemplars, model = work / "photos", work / "exemplars", work / "model"
    if not photos.exists():
        make_photos(photos, n_photos, seed)
        make_photos(exemplars, 4, seed + 1)
    if not model.exists():
        Encoder.random("vit-mini-8-32", depth=2).save(model)
    env = dict(os.environ, FILTERKIT_CACHE=str(work / "default.sqlite"))
    totals = Counter()
    for kind in kinds:
        for i in range(n):
            t = time.perf_counter()
            if kind == "embed":
                r = embed_trial(work, photos, model, rng, env)
            elif kind == "move":
                r = move_trial(work, photos, exemplars, model, rng, env)
            else:
                r = pretrain_trial(work, photos, rng, env)
            totals["faults"] += r["killed"]
            totals["lost"] += r.get("lost", 0) + r.get("duplicated", 0) + r.get("left_in_incoming", 0)
            totals["corrupted"] += r.get("corrupted", 0)
            say(f"{kind} {i + 1}/{n}: {json.dumps(r)} ({time.perf_counter() - t:.1f} s)")
    r = concurrent_embed(work, photos, model, env)
    totals["lost"] += r["lost"]
    totals["corrupted"] += r["corrupted"] + (r["exit_codes"] != [0, 0])
    say(f"two embeds on one cache: {json.dumps(r)}")
    return dict(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20, help="kills per command")
    parser.add_argument("--photos", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/fk-faults"))
    parser.add_argument("--kinds", nargs="+", default=["embed", "move", "pretrain"])
    args = parser.parse_args()
    totals = run_all(args.work, args.n, args.photos, args.seed, kinds=tuple(args.kinds))
    print(f"faults injected: {totals.get('faults', 0)} of {len(args.kinds) * args.n} runs (the rest finished before the kill); "
          f"files lost or duplicated: {totals.get('lost', 0)}; caches corrupted: {totals.get('corrupted', 0)}")


if __name__ == "__main__":
    main()
