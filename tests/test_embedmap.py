import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from filterkit.cli import main
from filterkit.embedmap import coordinates, map_html, write_map_png
from filterkit.errors import FilterkitError
from test_filtering import _photo_folders


def _blobs(n_per=30, dim=32, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(2, dim)) * 5
    x = np.concatenate([c + rng.normal(size=(n_per, dim)) for c in centres])
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), np.repeat([0, 1], n_per)


def test_coordinates_are_deterministic_finite_and_keep_neighbours():
    x, blob = _blobs()
    a, b = coordinates(x, seed=0), coordinates(x, seed=0)
    assert a.shape == (60, 2) and np.isfinite(a).all() and np.array_equal(a, b)
    assert a.min() >= 0 and a.max() <= 1 + 1e-9
    # Two well-separated blobs stay apart: every point's nearest map neighbour is in its own blob.
    d = np.linalg.norm(a[:, None] - a[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    assert (blob[d.argmin(axis=1)] == blob).all()


@pytest.mark.parametrize("n", [0, 1, 2, 5])
def test_tiny_sets_get_a_pca_map(n):
    x, _ = _blobs(5)
    xy = coordinates(x[:n])
    assert xy.shape == (n, 2) and np.isfinite(xy).all()
    if n >= 2:
        assert len({tuple(p) for p in xy.round(6)}) == n  # distinct points stay distinct


def test_coordinates_refuse_nan():
    x, _ = _blobs()
    x[3, 0] = np.nan
    with pytest.raises(FilterkitError, match="NaN"):
        coordinates(x)


def test_map_html_has_one_point_per_image_with_its_colour_class():
    xy = coordinates(_blobs(6)[0])
    labels = ["keep"] * 5 + ["reject"] * 6 + ["review"]
    names = [f"img{i}.jpg" for i in range(11)] + ["</script><b>x.jpg"]
    page = map_html(xy, labels, names, [None] * 12)
    points = re.findall(r'<circle class="pt (l\d+)" data-i="(\d+)" data-label="([^"]+)"', page)
    assert len(points) == 12 and [int(i) for _, i, _ in points] == list(range(12))
    by_label = {}
    for cls, _, label in points:
        by_label.setdefault(label, set()).add(cls)
    assert all(len(c) == 1 for c in by_label.values()) and len({next(iter(c)) for c in by_label.values()}) == 3
    assert "keep (5)" in page and "reject (6)" in page and "review (1)" in page  # the legend with counts
    assert "</script><b>" not in page  # names reach the page only as escaped JSON ...
    data = json.loads(re.search(r'<script type="application/json">(.*?)</script>', page).group(1))
    assert data["names"] == names and data["labels"] == labels  # ... which reads back exactly


def test_map_png_is_a_valid_picture(tmp_path):
    xy = coordinates(_blobs()[0])
    out = write_map_png(xy, ["cluster 0"] * 30 + ["cluster 1"] * 30, tmp_path / "sub" / "map.png")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (800, 600)
        colours = im.convert("RGB").getcolors(1 << 16)
    assert colours is None or len(colours) > 20  # points, legend and text were drawn
    with pytest.raises(FilterkitError, match="png"):
        write_map_png(xy, ["a"] * 60, tmp_path / "map.jpg")


def test_filter_report_and_map_from_the_cli(tmp_path, capsys, small_model_dir):
    _photo_folders(tmp_path)
    report, png = tmp_path / "out" / "filter.html", tmp_path / "out" / "map.png"
    assert main(["filter", str(tmp_path / "incoming"), "--keep-like", str(tmp_path / "exemplars"),
                 "--model", str(small_model_dir), "--report", str(report), "--map", str(png),
                 "-q", "--workers", "0"]) == 0
    assert f"map: {png}" in capsys.readouterr().out
    doc = json.loads(report.with_suffix(".json").read_text())
    decided = {Path(d["path"]).name: d["decision"] for d in doc["images"] if d["decision"] != "error"}
    page = report.read_text()
    points = re.findall(r'data-label="([^"]+)"', page)
    assert sorted(points) == sorted(decided.values())  # one point per readable image, its decision
    data = json.loads(re.search(r'<script type="application/json">(.*?)</script>', page).group(1))
    assert {Path(n).name: lab for n, lab in zip(data["names"], data["labels"])} == decided
    assert all(t and t.startswith("data:image/jpeg;base64,") for t in data["thumbs"])  # hover pictures
    assert doc["run"]["keep_like"] == str((tmp_path / "exemplars").absolute())  # for filterkit review
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (800, 600)


def test_cluster_and_dedup_reports_have_maps(tmp_path, capsys, photos_dir, small_model_dir):
    folder = tmp_path / "p"
    shutil.copytree(photos_dir, folder)
    shutil.copy(folder / "rocket.jpg", folder / "rocket_copy.jpg")
    common = ["--model", str(small_model_dir), "-q", "--workers", "0"]
    assert main(["cluster", str(folder), "--k", "3", "--report", str(tmp_path / "c.html")] + common) == 0
    page = (tmp_path / "c.html").read_text()
    labels = re.findall(r'data-label="([^"]+)"', page)
    rows = json.loads((tmp_path / "c.json").read_text())["images"]
    assert sorted(labels) == sorted(f"cluster {r['cluster']}" for r in rows) and len(labels) == 9
    assert main(["dedup", str(folder), "--threshold", "0.999", "--map", str(tmp_path / "d.png"),
                 "--report", str(tmp_path / "d.html")] + common) == 0
    labels = re.findall(r'data-label="([^"]+)"', (tmp_path / "d.html").read_text())
    assert sorted(labels) == ["group 0", "group 0"] + ["unique"] * 7
    assert (tmp_path / "d.png").stat().st_size > 5000


def test_map_hover_shows_the_thumbnail_in_headless_chromium(tmp_path, capsys, small_model_dir):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (.ci/run installs it): cannot hover the map")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright (the test extra) drives chromium")
    _photo_folders(tmp_path)
    report = tmp_path / "filter.html"
    assert main(["filter", str(tmp_path / "incoming"), "--keep-like", str(tmp_path / "exemplars"),
                 "--model", str(small_model_dir), "--report", str(report), "-q", "--workers", "0"]) == 0
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(report.as_uri())
        tip = page.locator(".fkmap .tip")
        assert tip.is_hidden()
        point = page.locator(".fkmap circle.pt").nth(2)
        point.hover()
        assert tip.is_visible() and tip.locator("img").get_attribute("src").startswith("data:image/jpeg")
        name = point.get_attribute("data-i")
        assert tip.locator(".tipname").text_content().endswith(Path(json.loads(
            page.locator('.fkmap script[type="application/json"]').text_content())["names"][int(name)]).name)
        page.mouse.move(0, 0)
        assert tip.is_hidden()
        browser.close()
