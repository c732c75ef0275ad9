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

import numpy as np

from .errors import FilterkitError, ImageError
from .fsutil import atomic_write_text
from .images import load_image

THUMB = 128
MAX_THUMBS = 3000  # past this, rows are listed without pictures to keep the page small
MAP_THUMB = 96  # the map's hover pictures, smaller than the cards'

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


def _thumb_uri(path: Path, size: int = THUMB) -> str | None:
    """A data: URI of the image's JPEG thumbnail, or None if it cannot be read."""
    try:
        image = load_image(path, draft_size=size)
    except ImageError:
        return None
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _thumbnail(path: Path | None, budget: list[int]) -> str:
    """An <img> with an embedded JPEG thumbnail, or a placeholder."""
    if path is None or budget[0] <= 0:
        return ""
    uri = _thumb_uri(path)
    if uri is None:
        return '<span class="reason">(no preview)</span>'
    budget[0] -= 1
    return f'<img alt="{html.escape(path.name)}" src="{uri}">'


REPORT_FORMAT = "filterkit-report/1"  # the JSON's "format": what marks a report as one filterkit may rewrite


def check_report_path(path: str | os.PathLike) -> Path:
    """``path`` as a report's HTML file: its .csv and .json go beside it. A rerun rewrites an earlier
    report's three files; any other file in their place is refused, never overwritten."""
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        raise FilterkitError(f"--report {path}: name the HTML file (.html); the .csv and .json go beside it")
    files = [path, path.with_suffix(".csv"), path.with_suffix(".json")]
    for f in files:
        if f.is_dir():
            raise FilterkitError(f"--report {path}: {f} is a folder")
    taken = [f for f in files if f.exists() or f.is_symlink()]
    if taken and not _is_report_json(files[2]):
        raise FilterkitError(f"--report {path}: {taken[0]} already exists and is not part of a filterkit report; "
                             "name another report, or move that file away")
    return path


# Reports written before the "format" key, known by their lists: filter, cluster, dedup,
# dedup --against, outliers.
_LEGACY_REPORT_KEYS = (("images", "summary"), ("clusters", "images"), ("groups",), ("duplicates",), ("outliers",))


def _is_report_json(path: Path) -> bool:
    """Whether ``path`` is a report's JSON that filterkit wrote."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    if not isinstance(doc, dict):
        return False
    if "format" in doc:
        return doc["format"] == REPORT_FORMAT
    return any(all(isinstance(doc.get(k), (list, dict)) for k in keys) for keys in _LEGACY_REPORT_KEYS)


def _html_path(path: str | os.PathLike) -> Path:
    path = check_report_path(path)
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
    atomic_write_text(base.with_suffix(".json"), json.dumps({"format": REPORT_FORMAT, **document}, indent=2) + "\n")


def _skipped_section(result, attribute: str = "skipped", title: str = "Could not be read") -> str:
    """The files that could not be read, each with its reason (a result's ``skipped``)."""
    skipped = getattr(result, attribute, None) or []
    if not skipped:
        return ""
    cards = [f'<div class="card error"><div class="name">{html.escape(str(s.path))}</div>'
             f'<div class="reason">{html.escape(s.reason)}</div></div>' for s in skipped]
    return f"<h2>{title} ({len(cards)})</h2><div class=\"grid\">{''.join(cards)}</div>"


def write_filter_report(result, html_path: str | os.PathLike, title: str = "filterkit filter",
                        embedding=None, run: dict | None = None, map_png=None) -> list[Path]:
    """Write ``X.html``, ``X.csv`` and ``X.json`` for a FilterResult; returns their paths.
    ``embedding``: (paths, vectors) of the incoming images, for the map coloured by decision;
    ``run``: how the result was made (folders, model, cache, options), stored in the JSON as
    ``run`` so ``filterkit review`` can re-score; ``map_png``: also write the map's picture."""
    html_path = _html_path(html_path)
    document = result.to_dict()
    if run is not None:
        document["run"] = run
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
    maps = map_section(*embedding, decision_label(result), png=map_png) if embedding is not None else ""
    skipped = _skipped_section(result, "skipped_exemplars", "Exemplars that could not be read")
    atomic_write_text(html_path, _page(title, summary, maps + "".join(sections) + skipped))
    return [html_path, html_path.with_suffix(".csv"), html_path.with_suffix(".json")]


def write_dedup_report(result, html_path: str | os.PathLike, title: str = "filterkit dedup",
                       embedding=None, map_png=None) -> list[Path]:
    """Write ``X.html``, ``X.csv`` and ``X.json`` for a ``DedupResult`` (or a list of groups);
    returns their paths. The page states the threshold and its estimates, and each group its
    weakest link, so a reviewer sees what a move would rest on. ``embedding``: (paths, vectors)
    of the folder's images, for the map coloured by group (the others "unique")."""
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
    maps = map_section(*embedding, group_label(result), png=map_png) if embedding is not None else ""
    atomic_write_text(html_path, _page(title, summary, maps + "".join(blocks) + _skipped_section(result)))
    return [html_path, html_path.with_suffix(".csv"), html_path.with_suffix(".json")]


def write_cross_report(result, html_path: str | os.PathLike, new=None, reference=None,
                       title: str = "filterkit dedup --against", map_png=None) -> list[Path]:
    """Write ``X.html``, ``X.csv`` and ``X.json`` for a ``leakage.CrossDedupResult``: each new
    image that duplicates a reference image beside it, with its score, under the threshold and
    its estimates. ``new``, ``reference``: (paths, vectors) of the two folders, for one map of
    both coloured reference / new / duplicate."""
    html_path = _html_path(html_path)
    _write_table(html_path, [d.to_dict() for d in result.duplicates], result.to_dict())
    budget = [MAX_THUMBS]
    cards = [f'<div class="card reject"><div class="pics">{_thumbnail(d.path, budget)}'
             f"{_thumbnail(d.duplicate_of, budget)}</div>"
             f'<div class="name">{html.escape(str(d.path))}</div>'
             f'<div class="reason">{"identical bytes" if d.exact else f"score {d.score:.3f}"}: duplicates '
             f"{html.escape(str(d.duplicate_of))}</div></div>" for d in result.duplicates]
    summary = html.escape(f"{result.summary_line()}. Each card: the new image, then the reference image it duplicates.")
    maps = ""
    if new is not None and reference is not None:
        maps = map_section([*reference[0], *new[0]], np.concatenate([reference[1], new[1]]),
                           cross_label(result, reference[0]), png=map_png)
    body = f"<h2>Duplicates of reference images ({len(cards)})</h2><div class=\"grid\">{''.join(cards)}</div>"
    atomic_write_text(html_path, _page(title, summary, maps + body + _skipped_section(result)))
    return [html_path, html_path.with_suffix(".csv"), html_path.with_suffix(".json")]


def write_outliers_report(result, html_path: str | os.PathLike, embedding=None,
                          title: str = "filterkit outliers", map_png=None) -> list[Path]:
    """Write ``X.html``, ``X.csv`` and ``X.json`` for an ``outliers.OutlierResult``: the top
    images, each beside its nearest neighbour with its score; the CSV and JSON rank every image.
    ``embedding``: (paths, vectors) in the space that was scored, for the map (outliers in red)."""
    html_path = _html_path(html_path)
    document = result.to_dict(everything=True)
    _write_table(html_path, document["outliers"], document)
    budget = [MAX_THUMBS]
    cards = [f'<div class="card reject"><div class="pics">{_thumbnail(o.path, budget)}{_thumbnail(o.nearest, budget)}'
             f'</div><div class="name">{o.rank}. {html.escape(str(o.path))}</div>'
             f'<div class="reason">score {o.score:.3f}; nearest {html.escape(str(o.nearest))} '
             f"(cosine {o.nearest_similarity:.3f})</div></div>" for o in result.outliers]
    summary = html.escape(f"{result.summary_line()}. Each card: the image, then its nearest other image.")
    maps = map_section(*embedding, outlier_label(result), png=map_png) if embedding is not None else ""
    body = f"<h2>Least like the rest ({len(cards)})</h2><div class=\"grid\">{''.join(cards)}</div>"
    atomic_write_text(html_path, _page(title, summary, maps + body + _skipped_section(result)))
    return [html_path, html_path.with_suffix(".csv"), html_path.with_suffix(".json")]


def outlier_label(result):
    """label_of for an outliers map: "outlier" for the top images, "typical" for the rest."""
    top = {str(o.path) for o in result.outliers}
    return lambda p: "outlier" if str(p) in top else "typical"


def write_cluster_report(result, html_path: str | os.PathLike, vectors=None,
                         title: str = "filterkit cluster", map_png=None) -> list[Path]:
    """Write ``X.html``, ``X.csv`` and ``X.json`` for ``cluster.FolderClusters``: each cluster's
    images nearest their prototype first, and with ``vectors`` (one per path) the map
    coloured by cluster."""
    html_path = _html_path(html_path)
    document = result.to_dict()
    _write_table(html_path, document["images"], document)
    budget = [MAX_THUMBS]
    assignment, distance = result.clustering.assignment, result.clustering.distance
    blocks = []
    for c, size in enumerate(result.clustering.sizes()):
        members = sorted(np.flatnonzero(assignment == c), key=lambda i: distance[i])
        cards = [f'<div class="card"><div class="pics">{_thumbnail(result.paths[i], budget)}</div>'
                 f'<div class="name">{html.escape(str(result.paths[i]))}</div>'
                 f'<div class="reason">distance {distance[i]:.3f}'
                 f'{"" if result.selected is None else (", selected" if result.selected[i] else ", pruned")}'
                 "</div></div>" for i in members]
        blocks.append(f'<h2>cluster {c} ({int(size)})</h2><div class="grid">{"".join(cards)}</div>')
    maps = map_section(result.paths, vectors, cluster_label(result), png=map_png) if vectors is not None else ""
    summary = html.escape(f"{len(result.paths)} images in {len(blocks)} clusters (spherical k-means); each "
                          "cluster's images nearest its prototype first.")
    atomic_write_text(html_path, _page(title, summary, maps + "".join(blocks) + _skipped_section(result)))
    return [html_path, html_path.with_suffix(".csv"), html_path.with_suffix(".json")]


def decision_label(result):
    """label_of for a FilterResult's map: each image's decision."""
    of = {str(d.path): d.decision for d in result.decisions}
    return lambda p: of.get(str(p), "error")


def group_label(result):
    """label_of for a dedup map: "group N" for the members of group N, "unique" for the rest."""
    groups = result if isinstance(result, list) else result.groups
    of = {str(p): f"group {n}" for n, g in enumerate(groups) for p in [g.keep, *(d.path for d in g.duplicates)]}
    return lambda p: of.get(str(p), "unique")


def cross_label(result, reference_paths):
    """label_of for a cross-set map: "reference", "new", or "duplicate" (a new image that
    duplicates a reference image)."""
    dups, ref = {str(d.path) for d in result.duplicates}, {str(p) for p in reference_paths}
    return lambda p: "duplicate" if str(p) in dups else "reference" if str(p) in ref else "new"


def cluster_label(result):
    """label_of for a FolderClusters map: "cluster N"."""
    of = {str(p): f"cluster {int(a)}" for p, a in zip(result.paths, result.clustering.assignment)}
    return lambda p: of.get(str(p), "unclustered")


def write_map(paths, vectors, label_of, png: str | os.PathLike, title: str = "Map of the collection",
              seed: int = 0) -> Path:
    """Only the static picture of the map (``--map`` without ``--report``)."""
    from . import embedmap

    paths, vectors = list(paths), np.asarray(vectors)
    rows = embedmap.sample_rows(len(paths), seed=seed)
    xy = embedmap.coordinates(vectors[rows], seed=seed)
    return embedmap.write_map_png(xy, [label_of(paths[i]) for i in rows], png, title)


def map_section(paths, vectors, label_of, title: str = "Map of the collection", png: str | os.PathLike | None = None,
                seed: int = 0) -> str:
    """The HTML of the embedding map (``embedmap.map_html``) of ``paths`` with their ``vectors``
    ([N, D], one row per path), each point coloured by ``label_of(path)`` (a decision, group,
    cluster...) and showing its thumbnail on hover; ``png``: also write the map there. Any
    report can call it (an outliers report too); above ``embedmap.MAX_POINTS`` images a
    seeded sample is mapped, and the caption says so."""
    from . import embedmap

    paths = [Path(p) for p in paths]
    vectors = np.asarray(vectors)
    if len(paths) != len(vectors):
        raise FilterkitError(f"map: {len(paths)} paths but {len(vectors)} vectors")
    rows = embedmap.sample_rows(len(paths), seed=seed)
    chosen = [paths[i] for i in rows]
    xy = embedmap.coordinates(vectors[rows], seed=seed)
    labels = [label_of(p) for p in chosen]
    if png is not None:
        embedmap.write_map_png(xy, labels, png, title)
    budget = MAX_THUMBS
    thumbs = [_thumb_uri(p, MAP_THUMB) if i < budget else None for i, p in enumerate(chosen)]
    note = ""
    if len(rows) < len(paths):
        note = (f"A seeded sample of {len(rows)} of the {len(paths)} images. PCA then t-SNE of the embeddings: near "
                "points are similar images; distances between far-apart groups mean little.")
    return embedmap.map_html(xy, labels, [str(p) for p in chosen], thumbs, title, note)
