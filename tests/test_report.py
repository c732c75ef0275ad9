import csv
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from filterkit.cli import main
from test_filtering import _photo_folders


@pytest.fixture
def filter_report(tmp_path, capsys, small_model_dir):
    _photo_folders(tmp_path)
    # ("/" cannot appear in a file name, so no closing </script>; this is the classic instead.)
    hostile = tmp_path / "incoming" / "<img src=x onerror=alert(1)>.jpg"
    shutil.copy(tmp_path / "incoming" / "coffee.jpg", hostile)
    report = tmp_path / "reports" / "filter.html"
    code = main(["filter", str(tmp_path / "incoming"), "--keep-like", str(tmp_path / "exemplars"),
                 "--model", str(small_model_dir), "--report", str(report), "-q", "--workers", "0"])
    assert code == 0 and str(report) in capsys.readouterr().out
    return report


def test_filter_report_files_exist_parse_and_escape_names(filter_report):
    rows = list(csv.DictReader(filter_report.with_suffix(".csv").open()))
    assert len(rows) == 7 and {r["decision"] for r in rows} <= {"keep", "reject", "error"}
    doc = json.loads(filter_report.with_suffix(".json").read_text())
    assert len(doc["images"]) == 7 and doc["summary"]["exemplars"] == 4
    page = filter_report.read_text()
    assert "<img src=x onerror" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;.jpg" in page
    assert page.count("data:image/jpeg;base64,") >= 6  # self-contained thumbnails
    assert "Kept (" in page and "Rejected (" in page and "Could not be read (1)" in page


def test_dedup_report(tmp_path, capsys, photos_dir, small_model_dir):
    folder = tmp_path / "p"
    shutil.copytree(photos_dir, folder)
    shutil.copy(folder / "rocket.jpg", folder / "rocket_copy.jpg")
    report = tmp_path / "dedup.html"
    assert main(["dedup", str(folder), "--threshold", "0.999", "--model", str(small_model_dir),
                 "--report", str(report), "-q", "--workers", "0"]) == 0
    rows = list(csv.DictReader(report.with_suffix(".csv").open()))
    roles = {(Path(r["path"]).name, r["role"]) for r in rows}
    assert ("rocket.jpg", "keep") in roles and ("rocket_copy.jpg", "duplicate") in roles
    page = report.read_text()
    assert "identical bytes" in page and "weakest link" in page
    assert "verified at pair score &gt;= 0.9990" in page  # the threshold and its estimates, as the CLI states them
    assert json.loads(report.with_suffix(".json").read_text())["threshold"] == 0.999


def test_report_renders_in_headless_chromium(filter_report, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (.ci/run installs it): cannot check the HTML renders")
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,900",
                    filter_report.as_uri()], check=True, capture_output=True, timeout=120)
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 900)
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 100  # thumbnails drew real pixels, not a blank page


def test_report_is_written_before_a_move_and_must_be_html(tmp_path, capsys, small_model_dir):
    _photo_folders(tmp_path)
    base = ["filter", str(tmp_path / "incoming"), "--keep-like", str(tmp_path / "exemplars"),
            "--model", str(small_model_dir), "-q", "--workers", "0"]
    assert main(base + ["--report", str(tmp_path / "r.json")]) == 1
    assert "name the HTML file" in capsys.readouterr().err
    report = tmp_path / "r.html"
    assert main(base + ["--report", str(report), "--action", "move", "--out", str(tmp_path / "sorted")]) == 0
    assert [p.name for p in (tmp_path / "incoming").iterdir()] == ["broken.jpg"]  # the rest moved
    assert report.read_text().count("data:image/jpeg;base64,") >= 5  # previews made before the move


def test_a_report_or_map_replaces_only_filterkit_s_own_earlier_files(tmp_path, capsys, small_model_dir):
    _photo_folders(tmp_path)
    base = ["filter", str(tmp_path / "incoming"), "--keep-like", str(tmp_path / "exemplars"),
            "--model", str(small_model_dir), "-q", "--workers", "0"]
    report, picture = tmp_path / "r.html", tmp_path / "map.png"
    assert main(base + ["--report", str(report), "--map", str(picture)]) == 0
    assert json.loads(report.with_suffix(".json").read_text())["format"] == "filterkit-report/1"
    capsys.readouterr()
    assert main(base + ["--report", str(report), "--map", str(picture)]) == 0  # a rerun rewrites them

    # someone's own table where the report's would go: refused before any work, left as it was
    mine = tmp_path / "mine.csv"
    mine.write_text("name,grade\nada,A\n")
    assert main(base + ["--report", str(tmp_path / "mine.html")]) == 1
    err = capsys.readouterr().err
    assert f"{mine} already exists and is not part of a filterkit report" in err and "Traceback" not in err
    assert mine.read_text() == "name,grade\nada,A\n" and not (tmp_path / "mine.html").exists()

    # --map naming an image of the collection (same extension, not a map): refused, the image kept
    photo = tmp_path / "incoming" / "photo.png"
    Image.open(tmp_path / "incoming" / "coffee.jpg").save(photo)
    before = photo.read_bytes()
    assert main(base + ["--map", str(photo)]) == 1
    assert "is inside the input folder" in capsys.readouterr().err and photo.read_bytes() == before
    # ... and outside the inputs too, where it is no map of filterkit's
    elsewhere = tmp_path / "photo.png"
    elsewhere.write_bytes(before)
    assert main(base + ["--map", str(elsewhere)]) == 1
    assert "is not a filterkit map" in capsys.readouterr().err and elsewhere.read_bytes() == before


@pytest.mark.parametrize("legacy", [{"images": [], "summary": {}}, {"clusters": [], "images": []},
                                    {"groups": [], "threshold": 0.9}, {"duplicates": [], "summary": "1 found"},
                                    {"outliers": [], "summary": "top 10"}])
def test_reports_and_maps_from_before_the_format_marks_are_still_rewritten(tmp_path, legacy):
    import io

    from matplotlib.figure import Figure

    from filterkit.embedmap import check_map_path
    from filterkit.errors import FilterkitError
    from filterkit.report import check_report_path

    report = tmp_path / "r.html"
    report.write_text("<html></html>")
    report.with_suffix(".csv").write_text("path\n")
    report.with_suffix(".json").write_text(json.dumps(legacy))
    assert check_report_path(report) == report
    report.with_suffix(".json").write_text(json.dumps({**legacy, "format": "someone-else/1"}))
    with pytest.raises(FilterkitError, match="is not part of a filterkit report"):
        check_report_path(report)

    def matplotlib_png(path, inches):  # as write_map_png wrote maps before its Software text
        buffer = io.BytesIO()
        Figure(figsize=inches, dpi=100).savefig(buffer, format="png")
        path.write_bytes(buffer.getvalue())

    matplotlib_png(tmp_path / "old_map.png", (8.0, 6.0))
    assert check_map_path(tmp_path / "old_map.png") == tmp_path / "old_map.png"
    matplotlib_png(tmp_path / "my_plot.png", (6.4, 4.8))  # matplotlib's default figure: someone's own plot
    with pytest.raises(FilterkitError, match="is not a filterkit map"):
        check_map_path(tmp_path / "my_plot.png")
