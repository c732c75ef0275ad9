"""Finding image files, decoding them robustly to RGB, and hashing their bytes.

Every way an image can fail to decode becomes an :class:`~filterkit.errors.ImageError`
whose message is the reason recorded for the skip; callers that process folders catch it
and carry on.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import FilterkitError, ImageError, ImageReadError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
HEIF_EXTENSIONS = frozenset({".heic", ".heif"})
# Same default as Pillow's own guard (~89 Mpx, a 0.25 GiB RGB buffer); checked after JPEG
# draft scaling, so a huge JPEG that decodes cheaply at 1/8 scale still passes.
MAX_PIXELS = 89_478_485

# We run our own bomb check with a clear reason; Pillow's warning would only be noise.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)

_heif_state: bool | None = None
_truncated_lock = threading.Lock()
_decoding = 0  # filterkit decodes in progress in this process
_callers_truncated = False  # the caller's LOAD_TRUNCATED_IMAGES, restored by the last decode out


@dataclass(frozen=True)
class Skip:
    """An input that was not processed, and why."""

    path: Path
    reason: str

    def to_dict(self) -> dict:
        return {"path": str(self.path), "reason": self.reason}


def _heif_available() -> bool:
    global _heif_state
    if _heif_state is None:
        try:
            import pillow_heif  # optional extra

            pillow_heif.register_heif_opener()
            _heif_state = True
        except ImportError:
            _heif_state = False
    return _heif_state


def decoder_version() -> str:
    """Names what decides whether a file decodes; cached failures are retried when it changes."""
    import PIL

    return f"pillow {PIL.__version__}; heif {'yes' if _heif_available() else 'no'}"


def is_image_path(path: Path) -> bool:
    suffix = path.suffix.lower()
    return suffix in IMAGE_EXTENSIONS or suffix in HEIF_EXTENSIONS


def discover_images(root: str | os.PathLike, follow_symlinks: bool = False) -> list[Path]:
    """All image files under ``root`` (any depth), by extension, case-insensitive, sorted.

    HEIC/HEIF files are included so that, without the ``heif`` extra, they are reported
    as skips instead of being silently ignored.
    """
    root = Path(root)
    if not root.exists():
        raise FilterkitError(f"folder not found: {root}")
    if not root.is_dir():
        raise FilterkitError(f"not a folder: {root}")
    found = []
    seen_dirs: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=follow_symlinks):
        if follow_symlinks:  # a symlink loop would list the same folder again and again
            st = os.stat(dirpath)
            if (st.st_dev, st.st_ino) in seen_dirs:
                dirnames.clear()
                continue
            seen_dirs.add((st.st_dev, st.st_ino))
        for name in filenames:
            path = Path(dirpath) / name
            if is_image_path(path) and not _special_file(path):
                found.append(path)
    return sorted(found)


def _special_file(path: Path) -> bool:
    """A pipe, socket or device named like an image: opening a FIFO blocks until someone
    writes to it, so such a file is never listed (it holds no image). A dangling or looping
    link is listed, and reading it reports why it failed."""
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


OUTSIDE_LINK = "symlink to a file outside the folder: not read (pass --follow-symlinks to read it)"
BROKEN_LINK = "broken symlink: its target does not exist"


def split_outside_links(paths: list[Path], root: str | os.PathLike) -> tuple[list[Path], list[Skip]]:
    """(paths to read, skips): symlinks whose target lies outside ``root`` are not read
    unless the user asks for it, so a link cannot pull in files from elsewhere; a symlink
    whose target does not exist (wherever it points) is skipped as broken."""
    base = Path(root).resolve()
    inside, refused = [], []
    for p in paths:
        if _broken_link(p):
            refused.append(Skip(p, BROKEN_LINK))
            continue
        try:
            outside = p.is_symlink() and not p.resolve().is_relative_to(base)
        except (RuntimeError, OSError):  # a symlink loop: reading it fails later, with its reason
            outside = False
        (refused.append(Skip(p, OUTSIDE_LINK)) if outside else inside.append(p))
    return inside, refused


def _broken_link(path: Path) -> bool:
    """A symlink whose target does not exist (a loop is not one: reading it says so)."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return path.is_symlink()
    except OSError:
        return False
    return False


def shard_of(path: Path, root: Path, count: int) -> int:
    """The shard (0..count-1) of ``path``: a hash of its path relative to ``root``, so every
    machine that sees the folder (at any mount point) splits it the same way."""
    relative = os.fsencode(os.path.relpath(path, root))
    return int.from_bytes(hashlib.blake2b(relative, digest_size=8).digest(), "big") % count


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N."""
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise FilterkitError(f"--shard takes I/N (e.g. 0/4), got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise FilterkitError(f"--shard {text}: need 0 <= I < N")
    return index, count


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of the file's bytes (streamed; hashlib releases the GIL, so threads help)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited onto white."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # Pillow's own convert clips these to 0..255; rescale the real range instead.
        arr = np.asarray(im, dtype=np.float32)
        if im.mode.startswith("I;16"):
            peak = 65535.0
        else:
            peak = float(arr.max()) if arr.size and arr.max() > 255 else 255.0
        arr = np.clip(arr / max(peak, 1e-12) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        im.mode == "P" and "transparency" in im.info
    )
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


@contextlib.contextmanager
def _refusing_truncated():
    """Truncated files are skipped with a reason, never silently half-decoded: Pillow's
    default, which a caller may have changed with the process-wide
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` (read while opening and loading). Set it to False for
    the duration of our decodes only. Concurrent decodes of ours share one save/restore (a
    count, under a lock), so the caller's value comes back when the last one ends; a thread of
    the caller decoding meanwhile sees False. DataLoader workers and Ray actors are processes
    with their own copy."""
    global _decoding, _callers_truncated
    with _truncated_lock:
        if _decoding == 0:
            _callers_truncated = ImageFile.LOAD_TRUNCATED_IMAGES
            ImageFile.LOAD_TRUNCATED_IMAGES = False
        _decoding += 1
    try:
        yield
    finally:
        with _truncated_lock:
            _decoding -= 1
            if _decoding == 0:
                ImageFile.LOAD_TRUNCATED_IMAGES = _callers_truncated


def load_image(path: str | os.PathLike, draft_size: int | None = None) -> Image.Image:
    """Decode ``path`` to an upright RGB image.

    ``draft_size``: let JPEGs decode at a reduced DCT scale (1/2, 1/4, 1/8) as long as
    both sides stay >= ``draft_size``; on camera photos this is most of the decode cost.
    Raises ImageError with the reason on any failure; ImageReadError where the file's bytes
    could not be read at all (which says nothing about its content).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in HEIF_EXTENSIONS and not _heif_available():
        raise ImageError(
            "HEIC/HEIF needs the optional pillow-heif package: pip install 'filterkit[heif]'"
        )
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ImageReadError(f"cannot read file: {e.strerror or e}") from None
    if size == 0:
        raise ImageError("empty file (0 bytes)")
    try:
        with _refusing_truncated(), Image.open(path) as im:
            if draft_size:
                im.draft(None, (draft_size, draft_size))
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise ImageError(
                    f"{w}x{h} = {w * h:,} pixels exceeds the {MAX_PIXELS:,}-pixel limit "
                    "(decompression-bomb guard)"
                )
            if w < 1 or h < 1:
                raise ImageError(f"image has no pixels ({w}x{h})")
            im.load()
            try:
                upright = ImageOps.exif_transpose(im)
            except Exception:  # corrupt EXIF: keep the pixels as stored
                upright = im
            return to_rgb(upright)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image (unrecognised or corrupt header)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"decompression-bomb guard: {e}") from None
    except PermissionError as e:
        raise ImageReadError(f"cannot read file: {e.strerror or e}") from None
    except OSError as e:
        if e.errno is not None:  # the OS failed to read (EIO, ENOENT mid-run): not the content
            raise ImageReadError(f"cannot read file: {e.strerror or e}") from None
        raise ImageError(f"truncated or corrupt image data: {e}") from None
    except MemoryError:
        raise ImageError("image too large to decode in memory") from None
    except Exception as e:  # Pillow raises many types on hostile data; never stop the run
        raise ImageError(f"cannot decode image: {type(e).__name__}: {e}") from None
