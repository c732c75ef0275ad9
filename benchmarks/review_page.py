"""How quickly `filterkit review` shows a 300-image filter report, in a real headless Chromium.

Makes N photos (crops, scales and colour shifts of scikit-image's sample photos: no data set
needed), filters them against 8 exemplars with the shipped model (or --model) into a report,
starts `filterkit review --no-browser` in a subprocess, and for each round opens the page in a
fresh browser context and measures:

- startup: from starting the server to its URL line (session loaded, vectors from the cache);
- first contentful paint (the browser's own `paint` timing) and the time until every card is
  in the page (`domContentLoaded`: the cards are drawn by a script at the end of the body);
- thumbnails requested before any scrolling (lazy loading: only those on screen) out of N;
- one mark: click Keep on the first review card until the page shows the re-scored state.

    OMP_NUM_THREADS=1 python benchmarks/review_page.py [--n 300 --rounds 3 --model DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance


def make_photos(root: Path, n: int, seed: int = 0) -> None:
    import skimage.data

    names = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "immunohistochemistry"]
    photos = [Image.fromarray(np.asarray(getattr(skimage.data, k)())).convert("RGB") for k in names]
    rng = np.random.default_rng(seed)
    (root / "incoming").mkdir(parents=True)
    (root / "exemplars").mkdir()
    for i in range(n + 8):
        src = photos[1] if i >= n else photos[rng.integers(len(photos))]  # exemplars: the cat
        w, h = src.size
        side = int(rng.uniform(0.4, 0.9) * min(w, h))
        x, y = rng.integers(0, w - side + 1), rng.integers(0, h - side + 1)
        im = src.crop((x, y, x + side, y + side)).resize((256, 256))
        im = ImageEnhance.Color(im).enhance(rng.uniform(0.5, 1.5))
        im.save(root / ("exemplars" if i >= n else "incoming") / f"img{i:04d}.jpg", quality=90)


def start_server(report: Path) -> tuple[subprocess.Popen, str, float]:
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "filterkit", "review", str(report), "--no-browser"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    match = re.search(r"http://127\.0\.0\.1:\d+/", line)
    if not match:
        raise SystemExit(f"the server did not start: {line}{proc.stderr.read()}")
    return proc, match.group(0), time.perf_counter() - t0


def measure(url: str, chromium: str, mark: bool) -> dict:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        thumbs = []
        page.on("request", lambda r: thumbs.append(r.url) if "/thumb/" in r.url else None)
        page.goto(url, wait_until="load")
        page.wait_for_timeout(500)  # let the on-screen thumbnails be asked for
        timing = page.evaluate("""() => {
            const paint = performance.getEntriesByName('first-contentful-paint')[0];
            const nav = performance.getEntriesByType('navigation')[0];
            return {fcp: paint ? paint.startTime : null, dom: nav.domContentLoadedEventEnd,
                    cards: document.querySelectorAll('.card').length}}""")
        out = {"fcp_ms": timing["fcp"], "all_cards_ms": timing["dom"], "cards": timing["cards"],
               "thumbs_requested": len(set(thumbs))}
        if mark:
            before = page.evaluate("document.body.dataset.round")
            t0 = time.perf_counter()
            page.locator(".card button[data-act=keep]").first.click()
            page.wait_for_function(f"document.body.dataset.round !== '{before}'", timeout=120_000)
            out["mark_ms"] = 1000 * (time.perf_counter() - t0)
        browser.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default=None, help="model directory (default: the shipped model)")
    parser.add_argument("--review-band", default="auto")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("needs chromium (and pip install playwright; no browser is downloaded)")
    from filterkit.cli import main as cli

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_photos(root, args.n)
        report = root / "report" / "filter.html"
        model = ["--model", args.model] if args.model else []
        t0 = time.perf_counter()
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # the CLI's table
            code = cli(["filter", str(root / "incoming"), "--keep-like", str(root / "exemplars"), "--report", str(report),
                       "--cache", str(root / "cache.sqlite"), "--review-band", args.review_band, "-q", *model])
        if code:
            raise SystemExit(code)
        summary = json.loads(report.with_suffix(".json").read_text())["summary"]
        print(f"filter + report of {args.n} images: {time.perf_counter() - t0:.1f} s; "
              f"keep {summary['keep']}, review {summary['review']}, reject {summary['reject']}")
        rows = []
        for r in range(args.rounds):
            (report.parent / "filter.labels.json").unlink(missing_ok=True)
            proc, url, startup = start_server(report.with_suffix(".json"))
            try:
                rows.append({"startup_s": startup, **measure(url, chromium, mark=True)})
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.communicate(timeout=30)
            print(f"round {r}: " + ", ".join(f"{k} {v:.0f}" if isinstance(v, float) and k.endswith("ms")
                                              else f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in rows[-1].items()))
        for key in ("startup_s", "fcp_ms", "all_cards_ms", "mark_ms"):
            values = [row[key] for row in rows if row.get(key) is not None]
            if values:
                print(f"{key}: median {statistics.median(values):.2f} (min {min(values):.2f}, max {max(values):.2f}) "
                      f"over {len(values)} rounds")
        print(f"cores: {os.cpu_count()}, thumbnails requested before scrolling: "
              f"{[row['thumbs_requested'] for row in rows]} of {args.n}")


if __name__ == "__main__":
    main()
