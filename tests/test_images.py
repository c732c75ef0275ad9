import importlib.util
import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import sample_photo
from filterkit import EmbeddingCache, FilterkitError, ImageError, discover_images, embed_folder, load_image
from filterkit.errors import ImageReadError
from filterkit.images import to_rgb


def _png_with_declared_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims width x height (a decompression bomb)."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8 + 8  # signature, then length + "IHDR"
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4:ihdr + 13]))
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def _jpeg_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", **kw)
    return buf.getvalue()


BAD_FILES = {
    "empty.jpg": (lambda photo: b"", "empty file"),
    "text.jpg": (lambda photo: b"hello, I am a text file\n" * 10, "not an image"),
    "random.png": (lambda photo: np.random.default_rng(0).bytes(5000), "not an image"),
    "truncated.jpg": (lambda photo: _jpeg_bytes(photo)[:3000], "truncated or corrupt"),
    "truncated.png": (lambda photo: _png_bytes(photo)[:2000], "truncated or corrupt"),
    "bomb.png": (lambda photo: _png_with_declared_size(30000, 30000), "decompression-bomb"),
    "bomb2.png": (lambda photo: _png_with_declared_size(12000, 12000), "decompression-bomb"),
    "photo.heic": (lambda photo: b"\x00\x00\x00\x18ftypheic" + b"\x00" * 100, "pillow-heif"),
}


def _png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _good_images(photo: Image.Image) -> dict[str, Image.Image | bytes]:
    small = photo.resize((96, 72))
    grey16 = Image.fromarray((np.linspace(0, 65535, 96 * 72).reshape(72, 96)).astype(np.uint16))
    palette_alpha = small.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    palette_alpha.info["transparency"] = 0
    frames = [small, small.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    return {
        "plain.JPG": small,
        "grey.jpeg": small.convert("L"),
        "palette.png": small.convert("P", palette=Image.Palette.ADAPTIVE),
        "palette_alpha.png": palette_alpha,
        "rgba.png": small.convert("RGBA"),
        "la.png": small.convert("LA"),
        "cmyk.jpg": small.convert("CMYK"),
        "grey16.png": grey16,
        "grey16.tif": grey16,
        "bilevel.bmp": small.convert("1"),
        "photo.webp": small,
        "animated.gif": gif.getvalue(),
    }


@pytest.fixture
def mixed_dir(tmp_path):
    photo = sample_photo("coffee")
    root = tmp_path / "mixed"
    (root / "nested" / "deeper").mkdir(parents=True)
    for name, (make, _) in BAD_FILES.items():
        (root / "nested" / name).write_bytes(make(photo))
    for name, im in _good_images(photo).items():
        target = root / "nested" / "deeper" / name
        if isinstance(im, bytes):
            target.write_bytes(im)
        else:
            im.save(target)
    (root / "notes.txt").write_text("not an image extension: ignored")
    return root


def test_every_bad_kind_is_skipped_with_its_reason_and_good_images_still_embed(mixed_dir, small_encoder):
    heif_installed = importlib.util.find_spec("pillow_heif") is not None
    with EmbeddingCache() as cache:
        result = embed_folder(mixed_dir, small_encoder, cache, progress=False, workers=0)
    reasons = {s.path.name: s.reason for s in result.skipped}
    for name, (_, expected) in BAD_FILES.items():
        if name.endswith(".heic") and heif_installed:
            continue
        assert expected in reasons[name], (name, reasons.get(name))
    good = set(_good_images(sample_photo("coffee")))
    assert {p.name for p in result.paths} == good
    assert result.vectors.shape == (len(good), small_encoder.dim)
    assert np.all(np.isfinite(result.vectors))


def test_unusual_modes_convert_to_rgb_with_their_real_range():
    grey16 = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    rgb = np.asarray(to_rgb(grey16))
    assert rgb.shape == (1, 3, 3)
    assert list(rgb[0, :, 0]) == [0, 128, 255]  # not clipped to white
    transparent = Image.new("RGBA", (2, 2), (255, 0, 0, 0))
    assert np.asarray(to_rgb(transparent))[0, 0].tolist() == [255, 255, 255]
    assert to_rgb(Image.new("CMYK", (2, 2))).mode == "RGB"


def test_exif_rotated_photo_embeds_like_its_upright_twin(tmp_path, small_encoder):
    upright = sample_photo("chelsea")  # 451 x 300, clearly not square
    upright.save(tmp_path / "upright.jpg", quality=95)
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    stored.save(tmp_path / "rotated.jpg", quality=95, exif=exif)
    stored.save(tmp_path / "stored_pixels.jpg", quality=95)

    loaded = load_image(tmp_path / "rotated.jpg")
    assert loaded.size == upright.size
    vecs = small_encoder.embed([tmp_path / "upright.jpg", tmp_path / "rotated.jpg", tmp_path / "stored_pixels.jpg"])
    twin = float(vecs[0] @ vecs[1])
    unrotated = float(vecs[0] @ vecs[2])
    assert twin > 0.995
    assert twin > unrotated


def test_large_jpegs_decode_in_draft_mode_to_about_the_model_size(tmp_path):
    big = sample_photo("astronaut").resize((2000, 1500))
    big.save(tmp_path / "big.jpg", quality=90)
    assert load_image(tmp_path / "big.jpg").size == (2000, 1500)
    drafted = load_image(tmp_path / "big.jpg", draft_size=224)
    assert drafted.size == (500, 375)  # 1/4 scale: the largest that keeps both sides >= 224
    assert drafted.mode == "RGB"


def test_load_image_raises_image_error_with_reason(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match="empty file"):
        load_image(tmp_path / "x.jpg")
    with pytest.raises(ImageReadError, match="cannot read file"):
        load_image(tmp_path / "missing.jpg")
    (tmp_path / "garbage.jpg").write_bytes(b"garbage")
    with pytest.raises(ImageError, match="not an image") as raised:
        load_image(tmp_path / "garbage.jpg")
    assert not isinstance(raised.value, ImageReadError)  # about the content: may be remembered


def test_decoding_leaves_pillows_truncated_images_setting_to_the_caller(tmp_path):
    # A fresh interpreter: the import itself must not reset a caller's setting.
    good = tmp_path / "good.jpg"
    good.write_bytes(_jpeg_bytes(sample_photo("coffee")))
    (tmp_path / "truncated.jpg").write_bytes(good.read_bytes()[:3000])
    script = f"""
from PIL import ImageFile
ImageFile.LOAD_TRUNCATED_IMAGES = True
from filterkit.errors import ImageError
from filterkit.images import load_image
assert ImageFile.LOAD_TRUNCATED_IMAGES is True, "import changed it"
load_image({str(good)!r}, 64)
try:
    load_image({str(tmp_path / "truncated.jpg")!r})
    raise SystemExit("a truncated JPEG decoded")
except ImageError as e:
    assert "truncated or corrupt" in str(e), e
assert ImageFile.LOAD_TRUNCATED_IMAGES is True, "decoding changed it"
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert done.returncode == 0, done.stderr


def test_discovery_is_recursive_case_insensitive_and_sorted(tmp_path):
    for rel in ["b.JPG", "a/c.png", "a/d.TIFF", "e.heic", "f.txt", "g.jpeg.bak"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in discover_images(tmp_path)]
    assert found == ["a/c.png", "a/d.TIFF", "b.JPG", "e.heic"]
    with pytest.raises(FilterkitError, match="folder not found"):
        discover_images(tmp_path / "nope")
    with pytest.raises(FilterkitError, match="not a folder"):
        discover_images(tmp_path / "b.JPG")


def test_a_dangling_symlink_is_a_broken_link_not_one_outside_the_folder(tmp_path, small_encoder):
    from filterkit.images import BROKEN_LINK, OUTSIDE_LINK, split_outside_links

    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere.jpg"
    root.mkdir()
    sample_photo("coffee").resize((80, 60)).save(root / "coffee.jpg")
    sample_photo("rocket").resize((80, 60)).save(elsewhere)
    (root / "outside.jpg").symlink_to(elsewhere)
    (root / "gone_outside.jpg").symlink_to(tmp_path / "deleted.jpg")  # dangling, to outside the folder
    (root / "gone_inside.jpg").symlink_to("deleted.jpg")  # dangling, relative, inside it
    (root / "loop.jpg").symlink_to(root / "loop.jpg")  # not broken: reading it says why it fails
    paths, refused = split_outside_links(discover_images(root), root)
    assert [p.name for p in paths] == ["coffee.jpg", "loop.jpg"]
    assert {s.path.name: s.reason for s in refused} == {
        "gone_inside.jpg": BROKEN_LINK, "gone_outside.jpg": BROKEN_LINK, "outside.jpg": OUTSIDE_LINK}
    assert "target does not exist" in BROKEN_LINK and "outside" not in BROKEN_LINK
    with EmbeddingCache(tmp_path / "c.sqlite") as cache:
        found = embed_folder(root, small_encoder, cache, workers=0)
    reasons = {s.path.name: s.reason for s in found.skipped}
    assert reasons["gone_outside.jpg"] == reasons["gone_inside.jpg"] == BROKEN_LINK
    # pretraining's refusal of a folder too small counts the links outside it, not the broken ones
    from filterkit.train.data import load_images

    for name in ("outside.jpg", "loop.jpg"):
        (root / name).unlink()
    with pytest.raises(FilterkitError) as refused_small:
        load_images(root, False, False, 64, 0, False, 1)
    assert "has 1 images; pretraining" in str(refused_small.value) and "outside" not in str(refused_small.value)
