"""A 2-D map of a collection's embeddings: coordinates, an inline SVG for HTML reports, a PNG.

Coordinates are PCA to at most 50 dimensions, then t-SNE (van der Maaten & Hinton 2008,
scikit-learn's Barnes-Hut implementation, PCA initialisation): t-SNE places images so that
the neighbour probabilities p_ij ∝ exp(-||x_i - x_j||² / 2σ_i²) of the embedding are matched
by q_ij ∝ (1 + ||y_i - y_j||²)⁻¹ in the plane, minimising KL(P || Q). Near neighbours stay
near; distances between far-apart groups mean little. Sets too small for t-SNE get the first
two principal components. Everything is seeded, so a report redrawn shows the same map.

    >>> xy = coordinates(vectors)                      # [N, 2] in [0, 1]
    >>> html = map_html(xy, labels, names, thumbs)     # <section> with the SVG, legend, hover
    >>> write_map_png(xy, labels, "map.png")
"""

from __future__ import annotations

import html
import io
import json
import os
from pathlib import Path

import numpy as np

from .errors import FilterkitError
from .fsutil import atomic_write_bytes

PCA_DIMS = 50
TSNE_MIN = 10  # fewer points than this: PCA only (t-SNE's perplexity needs neighbours to match)
MAX_POINTS = 5000  # beyond, a seeded sample is drawn (t-SNE's cost, the page's size)
PERPLEXITY = 30.0
# Fixed colours where the label is a decision, so map and cards agree (report.py's card borders).
DECISION_COLOURS = {"keep": "#22aa22", "review": "#3366cc", "reject": "#cc3333", "unique": "#b0b0b0",
                    "selected": "#22aa22", "pruned": "#b0b0b0", "duplicate": "#cc3333", "reference": "#3366cc",
                    "new": "#b0b0b0", "outlier": "#cc3333", "typical": "#b0b0b0"}
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
            "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
            "#f7b6d2", "#dbdb8d", "#9edae5", "#393b79")
_SIZE = (640, 440)  # SVG view box


def sample_rows(n: int, limit: int = MAX_POINTS, seed: int = 0) -> np.ndarray:
    """Row indices to map: all of them up to ``limit``, else a seeded sample in row order."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def coordinates(vectors: np.ndarray, seed: int = 0) -> np.ndarray:
    """[N, 2] float64 map coordinates scaled into [0, 1] (aspect kept), deterministic for a seed."""
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2:
        raise FilterkitError(f"expected vectors [N, D], got shape {x.shape}")
    n = len(x)
    if n == 0:
        return np.empty((0, 2))
    if not np.isfinite(x).all():
        raise FilterkitError("cannot map vectors holding NaN or infinity")
    if n < 3:
        out = np.zeros((n, 2))
        out[:, 0] = np.arange(n)  # one or two points: nothing to project, place them side by side
        return _unit_square(out)
    from sklearn.decomposition import PCA

    dims = min(PCA_DIMS, n - 1, x.shape[1])
    reduced = PCA(dims, svd_solver="full", random_state=seed).fit_transform(x - x.mean(axis=0))
    if n < TSNE_MIN or dims < 2:
        out = np.zeros((n, 2))
        out[:, :min(2, dims)] = reduced[:, :2]
        return _unit_square(out)
    from sklearn.manifold import TSNE

    perplexity = min(PERPLEXITY, (n - 1) / 3)
    tsne = TSNE(2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed, n_jobs=1)
    return _unit_square(tsne.fit_transform(reduced.astype(np.float32)))


def _unit_square(xy: np.ndarray) -> np.ndarray:
    xy = xy - xy.min(axis=0)
    span = float(xy.max()) if len(xy) else 0.0
    return xy / span if span > 0 else np.full_like(xy, 0.5)


def colours_for(labels: list[str]) -> dict[str, str]:
    """A colour per distinct label: decisions their fixed colour, the others the palette in
    legend order (so a map redrawn from the same labels is coloured the same)."""
    out: dict[str, str] = {}
    others = 0
    for label in _legend_order(labels):
        if label in DECISION_COLOURS:
            out[label] = DECISION_COLOURS[label]
        else:
            out[label] = _PALETTE[others % len(_PALETTE)]
            others += 1
    return out


def _legend_order(labels: list[str]) -> list[str]:
    seen = list(dict.fromkeys(labels))
    fixed = [k for k in DECISION_COLOURS if k in seen]
    return fixed + sorted((k for k in seen if k not in DECISION_COLOURS), key=_natural)


def _natural(label: str):
    head, _, tail = label.rpartition(" ")
    return (head, int(tail)) if tail.isdigit() else (label, -1)


def _script_json(value) -> str:
    # Inside <script> no "<" is left ("</script>" or "<!--" would change how the page parses):
    # JSON writes it as \u003c, which JSON.parse reads back.
    return json.dumps(value).replace("<", "\\u003c")


def map_html(xy: np.ndarray, labels: list[str], names: list[str], thumbs: list[str | None] | None = None,
             title: str = "Map of the collection", note: str = "") -> str:
    """A self-contained ``<section>``: an SVG with one ``<circle class="pt" data-label=...>`` per
    point, coloured by label, a legend, and hover cards showing ``thumbs[i]`` (a data: URI or
    None) and ``names[i]``. Safe to include several times in one page."""
    if not (len(xy) == len(labels) == len(names)) or (thumbs is not None and len(thumbs) != len(xy)):
        raise FilterkitError("map_html: coordinates, labels, names and thumbnails differ in length")
    colours = colours_for(labels)
    order = _legend_order(labels)
    cls = {label: f"l{i}" for i, label in enumerate(order)}
    w, h, pad = *_SIZE, 12
    r = _radius(len(xy))
    circles = []
    for i, ((cx, cy), label) in enumerate(zip(_fit(np.asarray(xy, dtype=float).reshape(-1, 2), w, h, pad), labels)):
        circles.append(f'<circle class="pt {cls[label]}" data-i="{i}" data-label="{html.escape(label)}" '
                       f'cx="{cx:.1f}" cy="{cy:.1f}" r="{r}"></circle>')
    style = "".join(f".fkmap .{cls[k]}{{fill:{colours[k]}}}" for k in order)
    legend = "".join(f'<span class="key"><i style="background:{colours[k]}"></i>{html.escape(k)} '
                     f'({labels.count(k)})</span>' for k in order)
    data = _script_json({"names": list(names), "labels": list(labels), "thumbs": list(thumbs or [None] * len(xy))})
    caption = html.escape(note or "PCA then t-SNE of the embeddings: near points are similar images; distances "
                          "between far-apart groups mean little. Hover a point for its image.")
    return (f'<section class="fkmap"><h2>{html.escape(title)}</h2><style>{_MAP_STYLE}{style}</style>'
            f'<div class="legend">{legend}</div><div class="frame">'
            f'<svg viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" '
            f'aria-label="{html.escape(title)}">{"".join(circles)}</svg>'
            f'<div class="tip" hidden><img alt=""><div class="tipname"></div></div></div>'
            f'<p class="reason">{caption}</p><script type="application/json">{data}</script>'
            f"<script>{_MAP_SCRIPT}</script></section>")


def _radius(n: int) -> float:
    return 6 if n <= 300 else 4 if n <= 2000 else 2.5


def _fit(xy: np.ndarray, w: float, h: float, pad: float) -> np.ndarray:
    """The points scaled (aspect kept) and centred into a w x h box less its padding."""
    if not len(xy):
        return xy
    lo, span = xy.min(axis=0), np.ptp(xy, axis=0)
    scale = min((w - 2 * pad) / span[0] if span[0] > 0 else np.inf, (h - 2 * pad) / span[1] if span[1] > 0 else np.inf)
    scale = 0.0 if not np.isfinite(scale) else scale
    offset = (np.array([w, h]) - span * scale) / 2
    return (xy - lo) * scale + offset


_MAP_STYLE = """
.fkmap .frame{position:relative;display:inline-block;border:1px solid #ddd;border-radius:6px;background:#fff}
.fkmap svg{display:block;max-width:100%;height:auto}
.fkmap .pt{stroke:#fff;stroke-width:.8;cursor:pointer;opacity:.9}.fkmap .pt:hover{stroke:#000;stroke-width:1.5}
.fkmap .legend{margin:4px 0;font-size:12px}.fkmap .key{margin-right:12px;white-space:nowrap}
.fkmap .key i{display:inline-block;width:10px;height:10px;border-radius:50%;margin-right:4px}
.fkmap .tip{position:absolute;pointer-events:none;background:#fff;border:1px solid #888;border-radius:4px;
padding:4px;font-size:11px;max-width:180px;box-shadow:0 2px 6px rgba(0,0,0,.2);z-index:5}
.fkmap .tip img{max-width:170px;max-height:130px;display:block}.fkmap .tipname{word-break:break-all}
"""

# Finds its own section (document.currentScript), so several maps can share a page.
_MAP_SCRIPT = """(function(){var s=document.currentScript.parentNode,d=JSON.parse(s.querySelector(
'script[type="application/json"]').textContent),f=s.querySelector('.frame'),t=s.querySelector('.tip'),
im=t.querySelector('img'),nm=t.querySelector('.tipname');
f.addEventListener('mouseover',function(e){var i=e.target.getAttribute&&e.target.getAttribute('data-i');
if(i===null)return;var u=d.thumbs[i];im.hidden=!u;if(u)im.src=u;nm.textContent=d.labels[i]+': '+d.names[i];
var r=f.getBoundingClientRect(),x=e.clientX-r.left,y=e.clientY-r.top;t.style.left=(x>r.width/2?x-190:x+12)+'px';
t.style.top=(y>r.height/2?y-150:y+12)+'px';t.hidden=false;});
f.addEventListener('mouseout',function(e){if(e.target.getAttribute&&e.target.getAttribute('data-i')!==null)
t.hidden=true;});})();"""


MAP_SOFTWARE = "filterkit map"  # the PNG's Software text: what marks a map as one filterkit may rewrite
_LEGACY_MAP_SIZE = (800, 600)  # write_map_png's default figure, 8 x 6 in at 100 dpi


def check_map_path(path: str | os.PathLike) -> Path:
    """``path`` as a map's PNG: a rerun rewrites an earlier map; any other file there (an image of
    the collection, say) is refused, never overwritten."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise FilterkitError(f"--map {path}: name a .png file")
    if path.is_dir():
        raise FilterkitError(f"--map {path}: is a folder")
    if path.exists() or path.is_symlink():
        try:
            from PIL import Image

            with Image.open(path) as image:
                software = str(image.info.get("Software", ""))
                # before the Software text was ours, a map was matplotlib's PNG at the map's size
                ours = not path.is_symlink() and image.format == "PNG" and (
                    software == MAP_SOFTWARE or (software.startswith("Matplotlib") and image.size == _LEGACY_MAP_SIZE))
        except (OSError, ValueError):
            ours = False
        if not ours:
            raise FilterkitError(f"--map {path}: already exists and is not a filterkit map; name another file, "
                                 "or move that one away")
    return path


def write_map_png(xy: np.ndarray, labels: list[str], path: str | os.PathLike, title: str = "Map of the collection",
                  size: tuple[float, float] = (8.0, 6.0), dpi: int = 100) -> Path:
    """A scatter plot of the map, coloured by label with a legend, written atomically as PNG."""
    path = check_map_path(path)
    if len(xy) != len(labels):
        raise FilterkitError("write_map_png: coordinates and labels differ in length")
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display needed; a no-op where a backend already runs
    from matplotlib.figure import Figure

    colours = colours_for(labels)
    fig = Figure(figsize=size, dpi=dpi)
    ax = fig.add_subplot()
    xy = np.asarray(xy, dtype=float).reshape(-1, 2)
    labels_arr = np.asarray(labels, dtype=object)
    order = _legend_order(labels)
    for label in order:
        rows = labels_arr == label
        ax.scatter(xy[rows, 0], 1 - xy[rows, 1], s=2.5 * _radius(len(xy)) ** 2, c=colours[label], label=f"{label} ({int(rows.sum())})",
                   edgecolors="white", linewidths=0.4)
    ax.set_title(title)
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xticks([])
    ax.set_yticks([])
    if len(order) <= 25:
        ax.legend(loc="best", fontsize=8, markerscale=0.8, framealpha=0.8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": MAP_SOFTWARE})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())
    return path
