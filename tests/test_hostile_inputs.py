"""The bad-input corpus, made here (no network), mixed with good photos, through every
command: exit 0, every good image processed, every bad one reported with a reason, nothing
retried on the next run."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import sample_photo
from filterkit.cli import main
from test_images import _jpeg_bytes, _png_bytes, _png_with_declared_size

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _exif_rotated(photo: Image.Image) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    return _jpeg_bytes(photo.transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes())


def _corrupt_exif(photo: Image.Image) -> bytes:
    data = bytearray(_jpeg_bytes(photo, exif=b"Exif\x00\x00MM\x00\x2a" + b"\xff" * 40))
    return bytes(data)


def _gif(photo: Image.Image) -> bytes:
    buf = io.BytesIO()
    photo.save(buf, format="GIF", save_all=True, append_images=[photo.rotate(90)], duration=50)
    return buf.getvalue()


def _tiff16(photo: Image.Image) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(photo.convert("L"), dtype=np.uint16) * 257).save(buf, format="TIFF")
    return buf.getvalue()


@pytest.fixture
def hostile(tmp_path):
    """(folder, names expected to embed, names expected to be reported, kinds tried)."""
    root = tmp_path / "hostile"
    (root / "sub").mkdir(parents=True)
    photos = {n: sample_photo(n).resize((160, 120)) for n in ("astronaut", "chelsea", "coffee", "rocket")}
    good: dict[str, bytes] = {
        "astronaut.jpg": _jpeg_bytes(photos["astronaut"]),
        "chelsea.png": _png_bytes(photos["chelsea"]),
        "one_pixel.png": _png_bytes(Image.new("RGB", (1, 1), (200, 10, 10))),
        "sliver_20000x10.png": _png_bytes(Image.new("RGB", (20000, 10), (10, 200, 10))),
        "cmyk.jpg": _jpeg_bytes(photos["coffee"].convert("CMYK")),
        "grey16.png": _png_bytes(Image.fromarray(np.asarray(photos["rocket"].convert("L"), dtype=np.uint16) * 257)),
        "grey16.tif": _tiff16(photos["rocket"]),
        "palette_alpha.png": b"",  # filled below
        "la.png": _png_bytes(photos["chelsea"].convert("LA")),
        "animated.gif": _gif(photos["coffee"]),
        "exif_rotated.jpg": _exif_rotated(photos["astronaut"]),
        "corrupt_exif.jpg": _corrupt_exif(photos["rocket"]),
        "x" * 240 + ".jpg": _jpeg_bytes(photos["coffee"]),  # a very long name
    }
    pa = photos["chelsea"].convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pa.info["transparency"] = 0
    good["palette_alpha.png"] = _png_bytes(pa)
    bad: dict[str, bytes] = {
        "truncated.jpg": _jpeg_bytes(photos["coffee"])[:2500],
        "truncated.png": _png_bytes(photos["coffee"])[:3000],
        "empty.jpg": b"",
        "random.png": np.random.default_rng(1).bytes(4096),
        "text.jpg": b"this is a text file\n" * 20,
        "bomb.png": _png_with_declared_size(40000, 40000),
        "photo.heic": b"\x00\x00\x00\x18ftypheic" + b"\x00" * 200,
    }
    for name, data in {**good, **bad}.items():
        (root / "sub" / name).write_bytes(data)
    # A non-UTF-8 name (bytes that decode to nothing valid), holding a good photo.
    os.close(os.open(os.fsencode(root / "sub") + b"/caf\xe9.jpg", os.O_WRONLY | os.O_CREAT, 0o644))
    Path(os.fsdecode(os.fsencode(root / "sub") + b"/caf\xe9.jpg")).write_bytes(_jpeg_bytes(photos["chelsea"]))
    good[os.fsdecode(b"caf\xe9.jpg")] = b""
    # Links and odd entries.
    (root / "broken_link.jpg").symlink_to(root / "does_not_exist.jpg")
    (root / "loop.jpg").symlink_to(root / "loop.jpg")
    (root / "same_as_astronaut.jpg").symlink_to(root / "sub" / "astronaut.jpg")  # a duplicate path
    good["same_as_astronaut.jpg"] = b""
    elsewhere = tmp_path / "elsewhere.jpg"  # outside the folder: not read unless --follow-symlinks
    elsewhere.write_bytes(_jpeg_bytes(photos["coffee"]))
    (root / "outside_link.jpg").symlink_to(elsewhere)
    bad["outside_link.jpg"] = b""
    (root / "folder.jpg").mkdir()  # a directory named like an image, holding one
    (root / "folder.jpg" / "inside.jpg").write_bytes(_jpeg_bytes(photos["rocket"]))
    good["inside.jpg"] = b""
    locked = root / "sub" / "locked.jpg"
    locked.write_bytes(_jpeg_bytes(photos["rocket"]))
    locked.chmod(0)  # unreadable, except to root (which reads it: then it is a good image)
    (good if IS_ROOT else bad)["locked.jpg"] = b""
    bad["broken_link.jpg"] = bad["loop.jpg"] = b""
    kinds = len(good) + len(bad) + 1  # + the directory named folder.jpg
    yield root, set(good), set(bad), kinds
    locked.chmod(0o644)


def _names(paths):
    return {Path(p).name for p in paths}


def test_every_command_survives_the_corpus(hostile, tmp_path, capsys, small_model_dir):
    root, good, bad, kinds = hostile
    assert kinds >= 20
    model = ["--model", str(small_model_dir), "--cache", str(tmp_path / "c.sqlite")]

    def run(*args):
        code = main([*args, *model, "--json", "-q"])
        out = capsys.readouterr().out
        assert code == 0, out
        return json.loads(out)

    embedded = run("embed", str(root))
    assert _names(s["path"] for s in embedded["skipped"]) == bad
    assert all(s["reason"] for s in embedded["skipped"])
    reasons = {Path(s["path"]).name: s["reason"] for s in embedded["skipped"]}
    assert "--follow-symlinks" in reasons["outside_link.jpg"]
    assert reasons["broken_link.jpg"] == "broken symlink: its target does not exist"
    followed = run("embed", str(root), "--follow-symlinks")
    assert "outside_link.jpg" not in _names(s["path"] for s in followed["skipped"])
    assert embedded["images"] == len(good) + len(bad)
    again = run("embed", str(root))  # failures are remembered, not retried
    assert again["embedded"] == 0 and _names(s["path"] for s in again["skipped"]) == bad

    exemplars = tmp_path / "exemplars"
    exemplars.mkdir()
    for n in ("astronaut", "coffee"):
        sample_photo(n).resize((160, 120)).save(exemplars / f"{n}.jpg")
    filtered = run("filter", str(root), "--keep-like", str(exemplars), "--report", str(tmp_path / "r.html"))
    by_decision = {}
    for d in filtered["images"]:
        by_decision.setdefault(d["decision"], set()).add(Path(d["path"]).name)
        assert d["reason"]
    assert by_decision.get("error", set()) == bad
    assert by_decision.get("keep", set()) | by_decision.get("reject", set()) == good
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["images"] if isinstance(report, dict) else report) == len(good) + len(bad)
    assert (tmp_path / "r.html").read_bytes() and (tmp_path / "r.csv").read_bytes()

    dedup = run("dedup", str(root), "--threshold", "0.999")
    dup_names = {Path(d["path"]).name for g in dedup["groups"] for d in g["duplicates"]} | \
        {Path(g["keep"]).name for g in dedup["groups"]}
    assert {"astronaut.jpg", "same_as_astronaut.jpg"} <= dup_names

    searched = run("search", str(root / "sub" / "astronaut.jpg"), "--in", str(root), "-k", "3")
    assert _names(r["path"] for r in searched["queries"][0]["results"]) & {"astronaut.jpg", "same_as_astronaut.jpg"}
    assert searched["skipped"], "the hostile folder's bad files are reported by search too"

    clustered = run("cluster", str(root), "--k", "3")
    assigned = clustered["images"] if isinstance(clustered, dict) else clustered
    assert len([a for a in assigned if a.get("cluster") is not None]) == len(good)


def test_pretrain_survives_the_corpus(hostile, tmp_path, capsys):
    root, good, bad, _ = hostile
    code = main(["pretrain", str(root), "--out", str(tmp_path / "m"), "--preset", "vit-mini-8-32", "--depth", "1",
                 "--batch-size", "4", "--epochs", "1", "--max-steps", "2", "-q"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "trained 2 steps" in captured.out


def test_a_fifo_named_like_an_image_is_not_listed_and_does_not_block(tmp_path):
    import os

    from filterkit.images import discover_images

    (tmp_path / "a.png").write_bytes(b"not really")
    os.mkfifo(tmp_path / "pipe.jpg")  # opening it for reading would block until a writer comes
    assert discover_images(tmp_path) == [tmp_path / "a.png"]


def test_pretrain_out_that_is_a_file_is_a_one_line_error(tmp_path, capsys):
    from filterkit.cli import main

    (tmp_path / "imgs").mkdir()
    (tmp_path / "out").write_text("mine")
    assert main(["pretrain", str(tmp_path / "imgs"), "--out", str(tmp_path / "out"), "--max-steps", "1", "-q"]) == 1
    assert capsys.readouterr().err.strip() == f"error: --out {tmp_path / 'out'} exists and is not a folder"
    assert (tmp_path / "out").read_text() == "mine"
