"""The one place that writes files atomically and knows where filterkit keeps its cache."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would, racing other threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader sees the old file or the new one, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes files 0600: give the mode a plain open() would, or keep the old file's.
        try:
            mode = path.stat().st_mode & 0o777
        except OSError:
            mode = 0o666 & ~_umask()
        os.chmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    # surrogateescape: a file name that is not valid UTF-8 is written back as its own bytes.
    atomic_write_bytes(path, text.encode("utf-8", errors="surrogateescape"))


def default_cache_path() -> Path:
    """``$FILTERKIT_CACHE``, else ``$XDG_CACHE_HOME/filterkit/embeddings.sqlite`` (``~/.cache``)."""
    env = os.environ.get("FILTERKIT_CACHE")
    if env:
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "filterkit" / "embeddings.sqlite"


def check_disjoint(*folders: tuple[str, str | os.PathLike | None]) -> None:
    """Refuse two of the (label, folder) pairs that are one folder, or one inside the other:
    images of one would be read as images of the other (and moved with them). None is skipped."""
    from .errors import FilterkitError

    given = [(label, Path(f), Path(f).resolve()) for label, f in folders if f is not None]
    for i, (label_a, a, ra) in enumerate(given):
        for label_b, b, rb in given[i + 1:]:
            if ra == rb:
                raise FilterkitError(f"{label_a} and {label_b} are the same folder ({a}): give separate folders")
            if ra in rb.parents or rb in ra.parents:
                inner, outer = ((label_b, b), (label_a, a)) if ra in rb.parents else ((label_a, a), (label_b, b))
                raise FilterkitError(f"{inner[0]} {inner[1]} is inside {outer[0]} {outer[1]}: give folders that do "
                                     "not contain each other")
