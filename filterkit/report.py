"""Reports: CSV and JSON with one row per image, next to a self-contained HTML page.

Thumbnails are embedded in the page (base64 JPEG), so it can be mailed or archived on its
own; every file name is HTML-escaped.

    >>> write_filter_report(result, "report.html")   # also report.csv and report.json
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
from pathlib import Path

from .errors import FilterkitError, ImageError
from .fsutil import atomic_write_text
from .images import load_image

THUMB = 128
MAX_THUMBS = 3000  # past this, rows are listed without pictures to keep the page small

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}
.grid{display:flex;flex-wrap:wrap;gap:10px}
.card{width:290px;border:1px solid #ddd;border-radius:6px;padding:6px;font-size:12px}
.card.keep{border-color:#2a2}.card.review{border-color:#36c}.card.reject{border-color:#c33}.card.error{border-color:#c90}
.pics{display:flex;gap:4px;align-items:flex-start}
.pics img{max-width:140px;max-height:140px}
.name{word-break:break-all;font-weight:600}.reason{color:#555}
.group{border:1px solid #ccc;border-radius:6px;padding:6px;margin:8px 0}
.group .pics img{max-width:160px;max-height:160px}
.sum{background:#f4f4f4;padding:8px;border-radius:6px}
"""


def _thumbnail(path: Path | None, budget: list[int]) -> str:
    """An <img> with an embedded JPEG thumbnail, or a placeholder."""
    if path is None or budget[0] <= 0:
        return ""
    try:
        image = load_image(path, draft_size=THUMB)
    except ImageError:
        return '<span class="reason">(no preview)</span>'
    budget[0] -= 1
    image.thumbnail((THUMB, THUMB))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(path.name)}" src="data:image/jpeg;base64,{data}">'


def _html_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        raise FilterkitError(f"--report {path}: name the HTML file (.html); the .csv and .json go beside it")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _page(title: str, summary: str, body: str) -> str:
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<div class=\"sum\">{summary}</div>{body}</body></html>\n")


def _write_table(base: Path, rows: list[dict], document: dict) -> None:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_text(base.with_suffix(".csv"), buffer.getvalue())
    atomic_write_text(base.with_suffix(".json"), json.dumps(document, indent=2) + "\n")


def write_filter_report(result, html_path: str | os.PathLike, title: str = "filterkit filter") -> list[Path]:
    """Write ``X.html``, ``X.csv`` and ``X.json`` for a FilterResult; returns their paths."""
    html_path = _html_path(html_path)
    document = result.to_dict()
    _write_table(html_path, document["images"], document)

    budget = [MAX_THUMBS]
    sections = []
    for label, kind in (("Kept", "keep"), ("To review (score near the threshold)", "review"), ("Rejected", "reject"),
                        ("Could not be read", "error")):
        chosen = sorted((d for d in result.decisions if d.decision == kind), key=lambda d: -(d.score or 0))
        cards = []
        for d in chosen:
            cards.append(
                f'<div class="card {kind}"><div class="pics">{_thumbnail(d.path, budget)}'
                f"{_thumbnail(d.nearest_exemplar, budget)}</div>"
                f'<div class="name">{html.escape(str(d.path))}</div>'
                f'<div class="reason">{html.escape(d.reason)}</div></div>')
        sections.append(f"<h2>{label} ({len(chosen)})</h2><div class=\"grid\">{''.join(cards)}</div>")
    summary = html.escape(f"{result.summary_line()}; {result.exemplars} keep-like and {result.negatives} "
                          "reject-like exemplars. Each card: the image, then its nearest keep-like exemplar.")
    atomic_write_text(html_path, _page(title, summary, "".join(sections)))
    return [html_path, html_path.with_suffix(".csv"), html_path.with_suffix(".json")]


def write_dedup_report(result, html_path: str | os.PathLike, title: str = "filterkit dedup") -> list[Path]:
    """Write ``X.html``, ``X.csv`` and ``X.json`` for a ``DedupResult`` (or a list of groups);
    returns their paths. The page states the threshold and its estimates, and each group its
    weakest link, so a reviewer sees what a move would rest on."""
    groups = result if isinstance(result, list) else result.groups
    html_path = _html_path(html_path)
    rows = []
    for n, g in enumerate(groups):
        rows.append({"group": n, "path": str(g.keep), "role": "keep", "score": 1.0, "exact": ""})
        rows += [{"group": n, "path": str(d.path), "role": "duplicate", "score": round(d.score, 6),
                  "exact": d.exact} for d in g.duplicates]
    doc = {"groups": [g.to_dict() for g in groups]} if isinstance(result, list) else result.to_dict()
    _write_table(html_path, rows, doc)
    budget = [MAX_THUMBS]
    blocks = []
    for g in groups:
        pics = [f'<div>{_thumbnail(g.keep, budget)}<div class="name">keep: {html.escape(str(g.keep))}</div></div>']
        pics += [f'<div>{_thumbnail(d.path, budget)}<div class="name">{html.escape(str(d.path))}</div>'
                 f'<div class="reason">{"identical bytes" if d.exact else f"score {d.score:.3f}"}</div></div>'
                 for d in g.duplicates]
        weakest = (f'<div class="reason">weakest link {g.weakest.score:.3f}: {html.escape(Path(str(g.weakest.b)).name)}'
                   '</div>' if g.weakest is not None else "")
        blocks.append(f'<div class="group"><div class="pics">{"".join(pics)}</div>{weakest}</div>')
    line = (f"{len(groups)} groups, {sum(len(g.duplicates) for g in groups)} duplicates"
            if isinstance(result, list) else result.summary_line())
    summary = html.escape(f"{line}. The first image of each group is kept.")
    atomic_write_text(html_path, _page(title, summary, "".join(blocks)))
    return [html_path, html_path.with_suffix(".csv"), html_path.with_suffix(".json")]
