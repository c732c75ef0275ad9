import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import pytest

from filterkit import FilterkitError
from filterkit.actions import JOURNAL, apply_actions, finish_interrupted_moves, plan_actions, run_actions
from filterkit.cli import main
from test_filtering import _photo_folders


def tree_hashes(root: Path) -> Counter:
    return Counter(hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*")
                   if p.is_file() and not p.is_symlink() and p.name != JOURNAL)


@pytest.fixture
def sources(tmp_path):
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    for rel in ("a.jpg", "b.jpg", "sub/a.jpg"):
        (root / rel).write_bytes(rel.encode() * 10)
    return root


def items(root):
    return [(root / "a.jpg", "kept"), (root / "b.jpg", "rejected"), (root / "sub" / "a.jpg", "kept")]


def test_copy_keeps_relative_paths_and_never_overwrites(tmp_path, sources):
    out = tmp_path / "out"
    (out / "kept").mkdir(parents=True)
    (out / "kept" / "a.jpg").write_bytes(b"already here")
    done = apply_actions(plan_actions(items(sources), sources, out, "copy"), out)
    assert len(done) == 3
    assert (out / "kept" / "a.jpg").read_bytes() == b"already here"
    assert (out / "kept" / "a-1.jpg").read_bytes() == (sources / "a.jpg").read_bytes()
    assert (out / "kept" / "sub" / "a.jpg").is_file() and (out / "rejected" / "b.jpg").is_file()
    assert tree_hashes(sources) == Counter({hashlib.sha256(r.encode() * 10).hexdigest(): 1
                                            for r in ("a.jpg", "b.jpg", "sub/a.jpg")})


def test_link_points_at_the_sources(tmp_path, sources):
    out = tmp_path / "out"
    apply_actions(plan_actions(items(sources), sources, out, "link"), out)
    link = out / "kept" / "sub" / "a.jpg"
    assert link.is_symlink() and link.resolve() == (sources / "sub" / "a.jpg").resolve()


def test_move_loses_and_duplicates_nothing(tmp_path, sources):
    before = tree_hashes(sources)
    out = tmp_path / "out"
    apply_actions(plan_actions(items(sources), sources, out, "move"), out)
    assert tree_hashes(sources) == Counter()
    assert tree_hashes(out) == before


def test_an_interrupted_move_is_finished_by_the_next_run(tmp_path, sources):
    before = tree_hashes(sources)
    out = tmp_path / "out"
    plan = plan_actions(items(sources), sources, out, "move")
    # Simulate kills: move 1 copied across file systems but its source was not yet removed;
    # move 2 was journaled and then killed before anything moved.
    first, second = plan[0], plan[1]
    for p in (first, second):
        p.destination.parent.mkdir(parents=True, exist_ok=True)
        with open(out / JOURNAL, "a") as f:
            f.write(json.dumps({"state": "start", "source": str(p.source), "destination": str(p.destination),
                                "sha256": hashlib.sha256(p.source.read_bytes()).hexdigest()}) + "\n")
    first.destination.write_bytes(first.source.read_bytes())
    with open(out / JOURNAL, "a") as f:
        f.write('{"state": "do')  # the kill cut a line
    assert finish_interrupted_moves(out) == 2
    assert not first.source.exists() and not second.source.exists()
    # The rerun plans what is left and completes it.
    remaining = [(s, c) for s, c in items(sources) if s.exists()]
    apply_actions(plan_actions(remaining, sources, out, "move"), out)
    assert tree_hashes(sources) == Counter()
    assert tree_hashes(out) == before


def test_nothing_is_written_outside_out(tmp_path, sources):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(outside, out / "kept")  # a symlinked category folder leading out
    plan = plan_actions(items(sources), sources, out, "copy")
    with pytest.raises(FilterkitError, match="outside"):
        apply_actions(plan, out)
    assert list(outside.iterdir()) == []
    with pytest.raises(FilterkitError, match="inside the input folder"):
        plan_actions(items(sources), sources, sources / "out", "copy")
    # A source outside the input folder keeps only its name (no ../ in the destination).
    stray = tmp_path / "stray.jpg"
    stray.write_bytes(b"x")
    (p,) = plan_actions([(stray, "kept")], sources, tmp_path / "out2", "copy")
    assert p.destination == tmp_path / "out2" / "kept" / "stray.jpg"


def test_filter_cli_dry_run_then_copy(tmp_path, capsys, small_model_dir):
    _photo_folders(tmp_path)
    incoming, out = tmp_path / "incoming", tmp_path / "sorted"
    args = ["filter", str(incoming), "--keep-like", str(tmp_path / "exemplars"), "--model", str(small_model_dir),
            "--action", "copy", "--out", str(out), "-q", "--workers", "0", "--json"]
    assert main(args + ["--dry-run"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert dry["dry_run"] and len(dry["actions"]) == 5 and not out.exists()
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    kept = {Path(d["path"]).name for d in result["images"] if d["decision"] == "keep"}
    assert {p.name for p in (out / "kept").iterdir()} == kept
    assert len(list((out / "rejected").iterdir())) == 5 - len(kept)
    assert (incoming / "cat_copy.jpg").is_file()  # copy leaves the sources alone
    code = main(["filter", str(incoming), "--keep-like", str(tmp_path / "exemplars"),
                 "--model", str(small_model_dir), "--action", "move", "-q"])
    assert code == 1 and "needs --out" in capsys.readouterr().err


def test_a_rerun_of_a_copy_or_link_into_the_same_out_does_not_double_it(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    for name in ("a.jpg", "b.jpg"):
        (root / name).write_bytes(name.encode() * 10)
    items = [(root / "a.jpg", "kept"), (root / "b.jpg", "rejected")]
    for action in ("copy", "link"):
        out = tmp_path / f"out-{action}"
        run_actions(items, root, out, action)
        plan, done = run_actions(items, root, out, action)
        assert [p.already for p in plan] == [True, True] and done == []
        assert sorted(p.name for p in out.rglob("*.jpg")) == ["a.jpg", "b.jpg"]  # no a-1.jpg
        # A different file under a taken name still gets a free name, never an overwrite.
        (root / "a.jpg").write_bytes(b"changed")
        plan, done = run_actions(items, root, out, action)
        if action == "copy":
            assert plan[0].destination.name == "a-1.jpg" and not plan[0].already and len(done) == 1
            assert (out / "kept" / "a.jpg").read_bytes() == b"a.jpg" * 10
        else:  # a link to the same file is the same file, whatever its bytes now
            assert plan[0].already
        (root / "a.jpg").write_bytes(b"a.jpg" * 10)
    # A move is never skipped: its source stays behind otherwise.
    out = tmp_path / "out-move"
    (out / "kept").mkdir(parents=True)
    (out / "kept" / "a.jpg").write_bytes((root / "a.jpg").read_bytes())
    plan, done = run_actions(items[:1], root, out, "move")
    assert not plan[0].already and plan[0].destination.name == "a-1.jpg" and not (root / "a.jpg").exists()


def test_a_rerun_finds_files_an_earlier_run_copied_under_a_suffixed_name(tmp_path):
    # Two batches with one file name: the second batch's copy is kept/IMG-1.jpg.
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "IMG.jpg").write_bytes(b"first batch")
    (b / "IMG.jpg").write_bytes(b"second batch")
    out = tmp_path / "out"
    run_actions([(a / "IMG.jpg", "kept")], a, out, "copy")
    for _ in range(3):
        plan, _ = run_actions([(b / "IMG.jpg", "kept")], b, out, "copy")
    assert plan[0].already and plan[0].destination.name == "IMG-1.jpg"
    assert sorted(p.name for p in (out / "kept").iterdir()) == ["IMG-1.jpg", "IMG.jpg"]


def test_the_input_folder_may_not_lie_inside_out(tmp_path):
    # A second pass over --out/review: each review image would be its own destination.
    review = tmp_path / "out" / "review"
    review.mkdir(parents=True)
    (review / "x.jpg").write_bytes(b"x")
    with pytest.raises(FilterkitError, match="is inside --out"):
        run_actions([(review / "x.jpg", "review")], review, tmp_path / "out", "copy")
    assert [p.name for p in review.iterdir()] == ["x.jpg"]


def test_an_exemplar_folder_reached_through_a_followed_symlink_is_refused_before_any_move(tmp_path, capsys,
                                                                                          small_model_dir):
    _photo_folders(tmp_path)
    os.symlink(tmp_path / "exemplars", tmp_path / "incoming" / "linked")
    before = sorted(p.name for p in (tmp_path / "exemplars").iterdir())
    code = main(["filter", str(tmp_path / "incoming"), "--keep-like", str(tmp_path / "exemplars"), "--follow-symlinks",
                 "--action", "move", "--out", str(tmp_path / "out"), "--model", str(small_model_dir), "-q",
                 "--workers", "0"])
    err = capsys.readouterr().err
    assert code == 1 and "reached through a symbolic link" in err and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "exemplars").iterdir()) == before and not (tmp_path / "out").exists()


def test_the_filter_report_records_its_scoring_for_the_review_page(tmp_path, capsys, small_model_dir):
    _photo_folders(tmp_path)
    report = tmp_path / "r.html"
    assert main(["filter", str(tmp_path / "incoming"), "--keep-like", str(tmp_path / "exemplars"), "--report",
                 str(report), "--model", str(small_model_dir), "-q", "--workers", "0"]) == 0
    doc = json.loads(report.with_suffix(".json").read_text())
    assert doc["run"]["scoring"] == doc["summary"]["scoring"] == "topm-centroid"
    assert "Could not be read (1)" in report.read_text()  # broken.jpg, with its reason
