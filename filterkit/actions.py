"""File actions that never lose a file: copy, link or move images into ``--out/<category>/``.

- Relative paths below the input folder are kept; a name that is taken gets a ``-1``, ``-2``...
  suffix, never an overwrite, unless it holds the same file already (an earlier copy with the same
  bytes, a link to the same file): then nothing is done, so a rerun does not double ``--out``.
- Nothing is written outside ``--out``: destinations are checked after resolving symlinks.
- ``move`` renames within a file system (atomic); across file systems it copies to a temporary
  name, renames that into place, then removes the source. A journal
  (``--out/.filterkit-journal.jsonl``) records each move before it starts, so a run killed
  half-way is completed by the next run without losing or duplicating a file.
- A dry run returns the plan and touches nothing.

    >>> plan = plan_actions([(Path("in/a.jpg"), "kept")], Path("in"), Path("out"), "copy")
    >>> apply_actions(plan, Path("out"))
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import FilterkitError
from .images import sha256_file

ACTIONS = ("report", "copy", "link", "move")
JOURNAL = ".filterkit-journal.jsonl"


@dataclass(frozen=True)
class PlannedAction:
    action: str  # copy | link | move
    source: Path
    destination: Path
    already: bool = False  # the destination holds this file already (an earlier copy or link): nothing to do

    def to_dict(self) -> dict:
        return {"action": self.action, "source": str(self.source), "destination": str(self.destination),
                "already_there": self.already}


def _already_there(source: Path, destination: Path, action: str, out: Path) -> bool:
    """Did an earlier run copy (same bytes) or link (same target) ``source`` to ``destination``?
    A move is never skipped: its source would stay behind. Neither is the source itself, nor a
    destination whose folder resolves outside ``out``."""
    try:
        if not _inside(destination.parent, out) or (destination.exists() and destination.samefile(source)
                                                    and not destination.is_symlink()):
            return False
        if action == "link":
            return destination.is_symlink() and destination.resolve() == source.resolve()
        if action == "copy":
            return (destination.is_file() and not destination.is_symlink()
                    and destination.stat().st_size == source.stat().st_size
                    and sha256_file(destination) == sha256_file(source))
    except OSError:
        pass
    return False


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _free_name(candidate: Path, taken: set[Path]) -> Path:
    if candidate not in taken and not candidate.exists() and not candidate.is_symlink():
        return candidate
    for n in range(1, 1_000_000):
        alt = candidate.with_name(f"{candidate.stem}-{n}{candidate.suffix}")
        if alt not in taken and not alt.exists() and not alt.is_symlink():
            return alt
    raise FilterkitError(f"no free name for {candidate}")


def _earlier_copy(source: Path, natural: Path, taken: set[Path], action: str, out: Path) -> Path | None:
    """The name an earlier run gave ``source`` under ``natural`` (itself, or the ``-1``, ``-2``...
    names ``_free_name`` hands out, up to the first free one), if one holds it already."""
    candidate, n = natural, 0
    while candidate.exists() or candidate.is_symlink():
        if candidate not in taken and _already_there(source, candidate, action, out):
            return candidate
        n += 1
        candidate = natural.with_name(f"{natural.stem}-{n}{natural.suffix}")
    return None


def plan_actions(items: list[tuple[Path, str]], root: Path, out: Path, action: str) -> list[PlannedAction]:
    """Where each (source, category) goes: ``out/category/<path relative to root>``."""
    if action not in ACTIONS or action == "report":
        raise FilterkitError(f"unknown file action {action!r}; choose copy, link or move")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FilterkitError(f"--out {out} exists and is not a folder")
    if _inside(out, root):
        raise FilterkitError(f"--out {out} is inside the input folder {root}; choose a folder outside it")
    if _inside(root, out):  # e.g. a second pass over --out/review: its files would be their own destinations
        raise FilterkitError(f"the input folder {root} is inside --out {out}; choose a folder outside it")
    taken: set[Path] = set()
    plan = []
    for source, category in items:
        if "/" in category or category in ("", ".", ".."):
            raise FilterkitError(f"bad category name {category!r}")
        try:
            rel = Path(os.path.relpath(source, root))
        except ValueError:
            rel = Path(source.name)
        if rel.is_absolute() or ".." in rel.parts:
            rel = Path(source.name)  # a source outside root keeps only its name
        natural = out / category / rel
        earlier = _earlier_copy(Path(source), natural, taken, action, out)
        if earlier is not None:
            taken.add(earlier)
            plan.append(PlannedAction(action, Path(source), earlier, already=True))
            continue
        destination = _free_name(natural, taken)
        taken.add(destination)
        plan.append(PlannedAction(action, Path(source), destination))
    return plan


def _journal_append(journal: Path, record: dict) -> None:
    with open(journal, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _read_journal(journal: Path) -> dict[str, dict]:
    """Moves started and not finished, by source path."""
    pending: dict[str, dict] = {}
    if not journal.is_file():
        return pending
    for line in journal.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill; its move had not started
        if record.get("state") == "start":
            pending[record["source"]] = record
        elif record.get("state") == "done":
            pending.pop(record["source"], None)
    return pending


def _safe_destination(destination: Path, out: Path) -> None:
    """Create the destination's folder, refusing any path that resolves outside ``out`` (checked
    on the nearest existing ancestor before anything is created, then again after)."""
    existing = destination.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not _inside(existing, out):
        raise FilterkitError(f"refusing to write {destination}: it resolves outside {out}")
    destination.parent.mkdir(parents=True, exist_ok=True)
    if not _inside(destination.parent, out):
        raise FilterkitError(f"refusing to write {destination}: it resolves outside {out}")


def _move(source: Path, destination: Path) -> None:
    try:
        os.rename(source, destination)  # atomic on one file system
        return
    except OSError as e:
        if e.errno != errno.EXDEV:  # different file systems: copy instead
            raise
    tmp = destination.with_name(f".{destination.name}.filterkit-tmp")
    shutil.copy2(source, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.rename(tmp, destination)
    source.unlink()


def finish_interrupted_moves(out: Path) -> int:
    """Complete the moves a killed run left half-done; returns how many it finished."""
    journal = Path(out) / JOURNAL
    finished = 0
    for source_s, record in _read_journal(journal).items():
        source, destination = Path(source_s), Path(record["destination"])
        tmp = destination.with_name(f".{destination.name}.filterkit-tmp")
        if source.exists():
            tmp.unlink(missing_ok=True)
            if destination.exists() and sha256_file(destination) == record["sha256"]:
                source.unlink()  # the copy was complete; only the source removal was lost
            else:
                if destination.exists():  # the name was taken meanwhile: never overwrite
                    destination = _free_name(destination, set())
                _safe_destination(destination, Path(out))
                _move(source, destination)
        _journal_append(journal, {"state": "done", "source": source_s})
        finished += 1
    return finished


def apply_actions(plan: list[PlannedAction], out: Path) -> list[PlannedAction]:
    """Carry out ``plan``; returns the actions done. Moves are journaled in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    finish_interrupted_moves(out)
    journal = out / JOURNAL
    done = []
    for item in plan:
        if item.already or not item.source.exists():
            continue  # copied by an earlier run; or moved by an earlier, interrupted one and finished above
        _safe_destination(item.destination, out)
        if item.destination.exists() or item.destination.is_symlink():
            raise FilterkitError(f"{item.destination} appeared while working; nothing was overwritten")
        if item.action == "copy":
            tmp = item.destination.with_name(f".{item.destination.name}.filterkit-tmp")
            shutil.copy2(item.source, tmp)
            os.rename(tmp, item.destination)
        elif item.action == "link":
            os.symlink(item.source.resolve(), item.destination)
        else:
            _journal_append(journal, {"state": "start", "source": str(item.source),
                                      "destination": str(item.destination), "sha256": sha256_file(item.source)})
            _move(item.source, item.destination)
            _journal_append(journal, {"state": "done", "source": str(item.source)})
        done.append(item)
    return done


def check_action(action: str, out: Path | None, allowed: tuple[str, ...] = ACTIONS, dry_run: bool = False) -> None:
    """Refuse an unknown action, one that writes without a destination, and --out or --dry-run
    without an action that uses them (they would be ignored)."""
    if action not in allowed:
        raise FilterkitError(f"--action must be one of {', '.join(allowed)}, got {action!r}")
    if action != "report" and out is None:
        raise FilterkitError(f"--action {action} needs --out DIR")
    writers = "|".join(a for a in allowed if a != "report")
    if action == "report" and out is not None:
        raise FilterkitError(f"--out is where --action {writers} puts files; with --action report (the default) "
                             "nothing is written there: add --action, or drop --out")
    if action == "report" and dry_run:
        raise FilterkitError(f"--dry-run shows what --action {writers} would do; with --action report (the default) "
                             "nothing is done anyway: add --action")


def run_actions(items: list[tuple[Path, str]], root: Path, out: Path | None, action: str,
                dry_run: bool = False) -> tuple[list[PlannedAction], list[PlannedAction]]:
    """(plan, done) of ``action`` on (file, category) items; nothing happens for "report"
    (empty plan) or a dry run (empty done)."""
    if action == "report":
        return [], []
    check_action(action, out)
    plan = plan_actions(items, root, out, action)
    return plan, [] if dry_run else apply_actions(plan, out)
