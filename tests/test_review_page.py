"""filterkit review: the HTTP API in-process, stopping by signal in a subprocess, and the page
driven in a real headless Chromium (playwright on the system's browser; skipped without one)."""

import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from filterkit.cli import main
from filterkit.errors import FilterkitError
from filterkit.review import labels_path, make_server, open_session
from test_filtering import _photo_folders


@pytest.fixture
def filter_report(tmp_path, small_model_dir, capsys):
    """A filter report of 5 readable images + 1 broken; cat_copy and coffee are in the review band."""
    _photo_folders(tmp_path)
    report = tmp_path / "reports" / "filter.html"
    assert main(["filter", str(tmp_path / "incoming"), "--keep-like", str(tmp_path / "exemplars"),
                 "--model", str(small_model_dir), "--report", str(report), "--review-band", "0.05",
                 "-q", "--workers", "0"]) == 0
    capsys.readouterr()
    doc = json.loads(report.with_suffix(".json").read_text())
    review = sorted(Path(d["path"]).name for d in doc["images"] if d["decision"] == "review")
    assert review == ["cat_copy.jpg", "coffee.jpg"]  # what the tests below mark
    return report.with_suffix(".json")


def _name(doc, short):
    """The report's path of the image called ``short``."""
    return next(d["path"] for d in doc["images"] if Path(d["path"]).name == short)


@pytest.fixture
def serve_report():
    """start(report) -> (session, url): a review server in a thread, stopped after the test."""
    servers = []

    def start(report):
        session = open_session(report)
        server = make_server(session, 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return session, f"http://127.0.0.1:{server.server_address[1]}"
    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def served(filter_report, serve_report):
    return serve_report(filter_report)


def _call(url, body=None, headers=None, method=None):
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(url, data, {"Content-Type": "application/json", **(headers or {})},
                                     method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.read(), r.headers.get("Content-Type")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("Content-Type")


def test_marks_are_saved_beside_the_report_and_rescore(served, filter_report):
    session, url = served
    doc = json.loads(filter_report.read_text())
    cat = _name(doc, "cat_copy.jpg")
    before = set(p.name for p in filter_report.parent.iterdir())
    status, body, _ = _call(url + "/api/mark", {"name": cat, "label": "keep"})
    assert status == 200
    state = json.loads(body)
    assert state["round"] == 1 and state["exemplars"] == 5  # the marked image joined the keep-like exemplars
    assert state["threshold"] != doc["summary"]["threshold"]  # recalibrated on them
    labels = json.loads(labels_path(filter_report).read_text())
    assert labels["format"] == "filterkit-labels/1" and labels["marks"] == {cat: "keep"}
    assert set(p.name for p in filter_report.parent.iterdir()) - before == {"filter.labels.json"}
    coffee = _name(doc, "coffee.jpg")
    state = json.loads(_call(url + "/api/mark", {"name": coffee, "label": "reject"})[1])
    assert state["negatives"] == 1 and state["history"][-1]["review"] < state["history"][0]["review"]
    reasons = {Path(i["name"]).name: i["reason"] for i in state["items"] if not i["mark"]}
    assert any("reject-like coffee.jpg" in r or "below the threshold" in r for r in reasons.values())
    # A new session picks the marks up again from the labels file.
    again = open_session(filter_report)
    assert again.marks == {cat: "keep", coffee: "reject"} and again.state()["exemplars"] == 5
    # Unmarking removes the mark from the file.
    _call(url + "/api/mark", {"name": coffee, "label": None})
    assert json.loads(labels_path(filter_report).read_text())["marks"] == {cat: "keep"}


def test_server_refuses_what_it_should(served):
    session, url = served
    status, body, kind = _call(url + "/thumb/0")
    assert status == 200 and kind == "image/jpeg" and body[:2] == b"\xff\xd8"
    assert _call(url + f"/thumb/{len(session.files)}")[0] == 404  # only files the report lists
    assert _call(url + "/thumb/..%2f..%2fetc%2fpasswd")[0] == 404
    assert _call(url + "/api/state", headers={"Host": "attacker.example"})[0] == 403  # DNS rebinding
    assert _call(url + "/api/mark", b"name=x&label=keep",
                 headers={"Content-Type": "application/x-www-form-urlencoded"})[0] == 415
    status, body, _ = _call(url + "/api/mark", {"name": "not/in/the/report.jpg", "label": "keep"})
    assert status == 400 and "not an image of this report" in json.loads(body)["error"]
    status, body, _ = _call(url + "/api/mark", {"name": session.items[0].name, "label": "maybe"})
    assert status == 400 and "keep, reject" in json.loads(body)["error"]
    assert not labels_path(session.report).exists()  # nothing was saved by refused requests


def test_dedup_groups_are_confirmed_or_split(tmp_path, photos_dir, small_model_dir, capsys):
    folder = tmp_path / "p"
    shutil.copytree(photos_dir, folder)
    shutil.copy(folder / "rocket.jpg", folder / "rocket_copy.jpg")
    assert main(["dedup", str(folder), "--threshold", "0.999", "--model", str(small_model_dir),
                 "--report", str(tmp_path / "d.html"), "-q", "--workers", "0"]) == 0
    session = open_session(tmp_path / "d.html")  # the .html names its .json
    assert session.kind == "dedup" and len(session.entries) == 1
    session.verdict(0, "split")
    labels = json.loads((tmp_path / "d.labels.json").read_text())
    keep = session.entries[0]["key"]
    assert labels["kind"] == "dedup" and labels["groups"] == {keep: "split"} and len(labels["members"][keep]) == 2
    with pytest.raises(FilterkitError, match="no group"):
        session.verdict(5, "confirm")


EXPECTED = "give the .html or .json that --report of filter, dedup, dedup --against or outliers wrote"


@pytest.mark.parametrize("content, message", [
    (None, f"report not found: {{path}} ({EXPECTED})"), ("{", "cannot read report {path}: not JSON"),
    ("[1]", f"is not a JSON object; {EXPECTED}"),
    ('{"clusters": [], "images": []}',  # a cluster report
     "not a report filterkit review opens (filter, dedup, dedup --against or outliers)"),
    ('{"duplicates": [{"path": "a.jpg"}]}', "an entry without path and duplicate_of")])
def test_bad_reports_are_clear_errors(tmp_path, capsys, content, message):
    path = tmp_path / "r.json"
    if content is not None:
        path.write_text(content)
    assert main(["review", str(path), "--no-browser"]) == 1
    err = capsys.readouterr().err
    assert message.format(path=path) in err and "Traceback" not in err


@pytest.mark.parametrize("what", ["folder", "image"])
def test_review_of_a_folder_or_a_non_json_file_says_what_it_wants(tmp_path, capsys, photos_dir, what):
    target = photos_dir if what == "folder" else photos_dir / "rocket.jpg"
    assert main(["review", str(target), "--no-browser"]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].endswith(EXPECTED), lines
    assert ("is a folder, not a report" if what == "folder" else "not JSON") in lines[0]


@pytest.fixture
def cross_report(tmp_path, photos_dir):
    """A dedup --against report (the writer `filterkit dedup --against` uses) of two pairs; each
    folder also holds an image the report does not name."""
    from filterkit.leakage import CrossDedupResult, CrossDuplicate
    from filterkit.report import write_cross_report

    new, ref = tmp_path / "new", tmp_path / "ref"
    new.mkdir(), ref.mkdir()
    for folder, names in ((ref, ("astronaut", "coffee", "rocket")), (new, ("chelsea", "retina"))):
        for name in names:
            shutil.copy(photos_dir / f"{name}.jpg", folder)
    Image.open(ref / "coffee.jpg").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(new / "coffee_flipped.jpg")
    shutil.copy(ref / "astronaut.jpg", new / "astronaut_copy.jpg")
    pairs = [CrossDuplicate(new / "astronaut_copy.jpg", ref / "astronaut.jpg", 1.0, True),
             CrossDuplicate(new / "coffee_flipped.jpg", ref / "coffee.jpg", 0.912, False)]
    result = CrossDedupResult(pairs, 0.85, None, 4, 3, {"new": 4, "reference": 3})
    report = tmp_path / "reports" / "leak.html"
    report.parent.mkdir()
    write_cross_report(result, report)
    return report.with_suffix(".json")


def test_cross_dedup_pairs_are_confirmed_or_rejected(cross_report, serve_report):
    session, url = serve_report(cross_report)
    state = json.loads(_call(url + "/api/state")[1])
    assert state["kind"] == "cross-dedup" and [v for v, _, _ in state["verdicts"]] == ["confirm", "reject"]
    pair = state["entries"][1]  # each pair: the new image, then its reference match, with why
    assert [(Path(m["name"]).name, m["caption"]) for m in pair["members"]] == [
        ("coffee_flipped.jpg", "new"), ("coffee.jpg", "reference")]
    assert pair["why"] == "pair score 0.912 (threshold 0.850)" and state["entries"][0]["why"] == "identical bytes"
    # thumbnails of the four files the report names, both folders', and of nothing else
    assert sorted(p.name for p in session.files) == ["astronaut.jpg", "astronaut_copy.jpg", "coffee.jpg",
                                                     "coffee_flipped.jpg"]
    assert all(_call(url + f"/thumb/{n}")[2] == "image/jpeg" for n in range(4))
    assert _call(url + "/thumb/4")[0] == 404
    assert _call(url + "/api/mark", {"name": pair["key"], "label": "keep"})[0] == 404  # a filter report's call
    status, body, _ = _call(url + "/api/verdict", {"entry": 1, "verdict": "split"})
    assert status == 400 and "confirm, reject" in json.loads(body)["error"]
    assert _call(url + "/api/verdict", {"entry": 2, "verdict": "confirm"})[0] == 400
    assert not labels_path(cross_report).exists()
    before = {p.name for p in cross_report.parent.iterdir()}
    state = json.loads(_call(url + "/api/verdict", {"entry": 1, "verdict": "reject"})[1])
    assert state["entries"][1]["verdict"] == "reject"
    _call(url + "/api/verdict", {"entry": 0, "verdict": "confirm"})
    labels = json.loads(labels_path(cross_report).read_text())
    assert labels["format"] == "filterkit-labels/1" and labels["kind"] == "cross-dedup"
    assert labels["pairs"] == {pair["key"]: "reject", state["entries"][0]["key"]: "confirm"}
    assert labels["members"][pair["key"]] == [m["name"] for m in pair["members"]]
    assert {p.name for p in cross_report.parent.iterdir()} - before == {"leak.labels.json"}
    _call(url + "/api/verdict", {"entry": 0, "verdict": None})  # undo
    assert open_session(cross_report).verdicts == {pair["key"]: "reject"}  # picked up again


def test_outliers_are_marked_outlier_or_fine(tmp_path, photos_dir, small_model_dir, capsys):
    report = tmp_path / "out" / "outliers.html"
    assert main(["outliers", str(photos_dir), "--top", "2", "--model", str(small_model_dir), "--report", str(report),
                 "-q", "--workers", "0"]) == 0
    capsys.readouterr()
    doc = json.loads(report.with_suffix(".json").read_text())
    assert len(doc["outliers"]) == len(list(photos_dir.iterdir()))  # the report ranks every image ...
    session = open_session(report)
    assert session.kind == "outliers" and len(session.entries) == 2  # ... the top ones are asked about
    top = doc["outliers"][:2]
    assert [[m["name"] for m in e["members"]] for e in session.entries] == [[o["path"], o["nearest"]] for o in top]
    assert {str(p) for p in session.files} == {p for o in top for p in (o["path"], o["nearest"])}  # served: no more
    assert session.entries[0]["why"].startswith(f"rank 1: mean cosine distance {top[0]['score']:.3f}")
    session.verdict(1, "fine")
    session.verdict(0, "outlier")
    labels = json.loads(labels_path(report.with_suffix(".json")).read_text())
    assert labels["kind"] == "outliers" and labels["outliers"] == {top[1]["path"]: "fine", top[0]["path"]: "outlier"}
    with pytest.raises(FilterkitError, match="a verdict is one of outlier, fine"):
        session.verdict(0, "keep")
    with pytest.raises(FilterkitError, match="no outlier 2"):
        session.verdict(2, "fine")
    # a labels file of another kind beside it (the report rewritten by another command) is not overwritten
    labels_path(report.with_suffix(".json")).write_text(json.dumps({**labels, "kind": "dedup"}))
    with pytest.raises(FilterkitError, match="holds dedup labels, not outliers ones"):
        open_session(report)


def _start(report, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "filterkit", "review", str(report), "--no-browser", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a shell's background job may ignore SIGINT; this one takes Ctrl-C
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    line = proc.stdout.readline()
    match = re.search(r"http://127\.0\.0\.1:\d+/", line)
    assert match, line + proc.stderr.read()
    return proc, match.group(0)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_a_signal_stops_the_server_cleanly(filter_report, tmp_path, sig, code):
    proc, url = _start(filter_report, tmp_path)
    assert _call(url + "api/state")[0] == 200
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == code and "Traceback" not in err
    assert ("stopped" in out) if code == 0 else ("interrupted" in err)


def _chromium():
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("chromium is not installed (.ci/run installs it): cannot drive the review page")
    try:
        from playwright.sync_api import sync_playwright  # noqa: F401
    except ImportError:
        pytest.skip("playwright is not installed (the test extra has it): cannot drive the review page")
    return path


@contextlib.contextmanager
def _page_of(report, tmp_path):
    """A headless Chromium page on `filterkit review REPORT` run as a subprocess, stopped after."""
    chromium = _chromium()
    from playwright.sync_api import sync_playwright

    proc, url = _start(report, tmp_path)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            yield page
            browser.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


def test_review_page_in_headless_chromium(filter_report, tmp_path):
    with _page_of(filter_report, tmp_path) as page:
        headings = page.locator("h2").all_text_contents()
        assert headings[0] == "To review (score near the threshold) (2)"  # the review band first
        assert page.locator(".card").count() == 6  # every image of the report
        cat = page.locator(".card", has=page.locator(".name", has_text="cat_copy.jpg"))
        cat.locator("button[data-act=keep]").click()  # a click ...
        page.wait_for_selector("body[data-round='1']")
        coffee = page.locator(".card", has=page.locator(".name", has_text="coffee.jpg"))
        coffee.locator(".reason").click()  # focus the card
        page.keyboard.press("r")  # ... and a keyboard shortcut
        page.wait_for_selector("body[data-round='2']")
        page.wait_for_function("[...document.images].every(i => i.complete)")
        marks = json.loads(labels_path(filter_report).read_text())["marks"]
        assert {Path(k).name: v for k, v in marks.items()} == {"cat_copy.jpg": "keep", "coffee.jpg": "reject"}
        stats = page.locator("#stats").text_content()
        assert "round 2" in stats and "(was 2)" in stats and "5 keep-like, 1 reject-like" in stats
        review_now = json.loads(labels_path(filter_report).read_text())["history"][-1]["review"]
        assert f"{review_now} to review" in stats and review_now < 2  # the band shrank
        assert page.locator(".card.marked").count() == 2
        assert page.evaluate("[...document.images].filter(i => i.naturalWidth > 0).length") >= 6
        shot = tmp_path / "review.png"
        page.screenshot(path=str(shot), full_page=True)
    with Image.open(shot) as image:
        assert image.format == "PNG" and image.width == 1280 and image.height >= 900
        colours = image.convert("RGB").getcolors(1 << 20)
    assert colours is None or len(colours) > 200  # photos drew real pixels: not a blank page


def test_cross_dedup_page_in_headless_chromium(cross_report, tmp_path):
    with _page_of(cross_report, tmp_path) as page:
        assert page.locator(".group").count() == 2 and page.locator(".group figure").count() == 4
        flipped = page.locator(".group", has_text="coffee_flipped.jpg")
        assert "reference: " in flipped.locator("figure").nth(1).text_content()
        flipped.locator("button[data-act=reject]").click()  # a click ...
        page.wait_for_selector(".group.v1")
        page.locator(".group", has_text="astronaut_copy.jpg").locator(".reason").click()  # focus it
        page.keyboard.press("c")  # ... and a keyboard shortcut
        page.wait_for_selector(".group.v0")
        page.wait_for_function("[...document.images].every(i => i.complete)")
        assert page.evaluate("[...document.images].filter(i => i.naturalWidth > 0).length") == 4
        assert "2 pairs" in page.locator("#stats").text_content()
        assert "marked not a duplicate by you" in flipped.text_content()
    pairs = json.loads(labels_path(cross_report).read_text())["pairs"]
    assert {Path(k).name: v for k, v in pairs.items()} == {"coffee_flipped.jpg": "reject", "astronaut_copy.jpg": "confirm"}
