"""The record of a comparison (``OUT/compare-record.json``): the settings a rerun must match to
continue it, and each finished method's run, rewritten atomically as each method finishes, so
that an interrupted comparison loses at most the method it was running.

The settings hold names, counts and fingerprints, never a path: a folder is its base name, its
image count and the sha256 of its images' relative paths and sizes (cheap for any size of
collection, and it changes when an image is added, removed, renamed or rewritten to another
size).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import FilterkitError
from .fsutil import atomic_write_text

RECORD_FILE = "compare-record.json"
RESULT_FILE = "compare.json"
FORMAT = "filterkit-compare-record/1"
# Every setting that changes a comparison's results, and the option (or argument) that sets
# it: a rerun whose settings differ is another comparison, and the refusal names these.
OPTIONS = {"folder": "FOLDER", "methods": "--methods", "minutes": "--minutes", "max_steps": "--max-steps",
           "seed": "--seed", "preset": "--preset", "depth": "--depth", "batch_size": "--batch-size",
           "device": "--device", "data_in_memory": "--data-in-memory", "labelled": "--labelled",
           "exemplars": "--exemplars", "max_images": "--max-images"}


def folder_fingerprint(folder: Path | None) -> dict[str, Any] | None:
    """{"name", "images", "sha256"} of the images under ``folder`` (None: no folder)."""
    from .images import discover_images

    if folder is None:
        return None
    paths = discover_images(folder)
    digest = hashlib.sha256()
    for path in paths:
        try:
            size = path.stat().st_size
        except OSError:  # a broken link or a file gone meanwhile: the training reports it as a skip
            size = -1
        relative = path.relative_to(folder).as_posix()
        digest.update(f"{relative}\0{size}\n".encode("utf-8", errors="surrogateescape"))
    return {"name": folder.resolve().name or "root", "images": len(paths), "sha256": digest.hexdigest()}


def _shown(key: str, value: Any) -> str:
    if value is None:
        return "not given"
    if key in ("folder", "labelled", "exemplars"):
        return f"{value['name']!r}, {value['images']} images"
    if key == "methods":
        return ",".join(value)
    return repr(value)


def differences(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """One entry per setting that differs: the option, its recorded value and the new one."""
    found = []
    for key, option in OPTIONS.items():
        old, new = recorded.get(key), now.get(key)
        if old == new or (key == "methods" and old is not None and new is not None and sorted(old) == sorted(new)):
            continue  # the same methods in another order are the same comparison
        if (key in ("folder", "labelled", "exemplars") and old is not None and new is not None
                and (old["name"], old["images"]) == (new["name"], new["images"])):
            found.append(f"{option} (same name and image count, but other files or file sizes)")
        else:
            found.append(f"{option} (recorded {_shown(key, old)}, now {_shown(key, new)})")
    return found


@dataclass
class Record:
    """``settings``: what the comparison was run with (``OPTIONS``' keys); ``runs``: the finished
    methods' runs (``compare.MethodRun.to_record``) by method; ``baselines``: once measured."""

    settings: dict[str, Any]
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    baselines: dict[str, Any] = field(default_factory=dict)

    def write(self, out: Path) -> None:
        self._write(out, self.runs, self.baselines)

    def finish(self, out: Path, method: str, run: dict[str, Any]) -> None:
        """Record ``method``'s finished run on disk, then here: an interrupted write changes neither."""
        runs = {**self.runs, method: run}
        self._write(out, runs, self.baselines)
        self.runs = runs

    def set_baselines(self, out: Path, baselines: dict[str, Any]) -> None:
        self._write(out, self.runs, baselines)
        self.baselines = baselines

    def _write(self, out: Path, runs: dict[str, Any], baselines: dict[str, Any]) -> None:
        out.mkdir(parents=True, exist_ok=True)
        doc = {"format": FORMAT, "updated": datetime.now(UTC).isoformat(timespec="seconds"),
               "settings": self.settings, "runs": runs, "baselines": baselines}
        atomic_write_text(out / RECORD_FILE, json.dumps(doc, indent=2) + "\n")

    @classmethod
    def load(cls, out: Path) -> Record | None:
        """The record in ``out``; None when there is none."""
        path = out / RECORD_FILE
        if not path.is_file():
            return None
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            if doc.get("format") != FORMAT:
                raise ValueError(f"format {doc.get('format')!r}, expected {FORMAT!r}")
            return cls(dict(doc["settings"]), dict(doc["runs"]), dict(doc.get("baselines") or {}))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise FilterkitError(f"{path} cannot be read as a comparison record ({e}): move it away, or choose "
                                 "another --out") from None


def _pretrain_files() -> set[Path]:
    """What ``pretrain`` writes in its --out: the model directory and its training run."""
    from .modeldir import CARD_FILE, CONFIG_FILE, WEIGHTS_FILE
    from .train import CHECKPOINT, LOG

    return {Path(CONFIG_FILE), Path(WEIGHTS_FILE), Path(CARD_FILE), Path(CHECKPOINT), Path(LOG)}


def _written_by_pretrain(relative: Path, known: set[Path]) -> bool:
    # also the temporary file of an atomic write cut off mid-way (fsutil: ".NAME.XXXX.tmp")
    return relative in known or any(relative.parent == k.parent and relative.name.startswith(f".{k.name}.")
                                    and relative.name.endswith(".tmp") for k in known)


def _remove(out: Path, record: Record) -> None:
    """Delete the files of the comparison ``record`` describes: its method folders, its
    compare.json and the record itself. Only names of known methods, inside ``out``, and only
    folders that hold nothing but what pretrain wrote: anything else there is the user's, and
    the whole deletion is refused before it starts."""
    from .methods import METHODS

    known = _pretrain_files()
    folders = [out / name for name in record.settings.get("methods") or []
               if name in METHODS and (out / name).is_dir() and not (out / name).is_symlink()]
    for folder in folders:
        foreign = [p for p in sorted(folder.rglob("*"))  # a symlink is never the comparison's
                   if p.is_symlink() or (not p.is_dir() and not _written_by_pretrain(p.relative_to(folder), known))]
        if foreign:
            raise FilterkitError(f"--overwrite would delete {foreign[0]}"
                                 f"{f' (and {len(foreign) - 1} more)' if len(foreign) > 1 else ''}, which the "
                                 f"comparison did not write: move it out of {folder} first")
    for folder in folders:
        shutil.rmtree(folder)
    (out / RESULT_FILE).unlink(missing_ok=True)
    (out / RECORD_FILE).unlink()


def open_record(out: Path, settings: dict[str, Any], resume: bool, overwrite: bool,
                say: Callable[[str], None]) -> Record:
    """The record this comparison continues (``resume``, settings equal), or a new one;
    refuses to mix or replace another comparison's files unless ``overwrite`` says so. The
    record is written before any method runs, so that even the first one can be resumed."""
    if resume and overwrite:
        raise FilterkitError("--resume continues the comparison in --out and --overwrite replaces it: give one "
                             "or the other")
    found = Record.load(out) if out.is_dir() else None
    if found is None:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise FilterkitError(f"{out} already holds files, and no {RECORD_FILE} of a comparison to resume: choose "
                                 "a new --out folder (each method's model is written under it)")
        if resume:
            say(f"nothing to resume in {out}: starting the comparison")
        record = Record(settings)
    else:
        done = f"{len(found.runs)} of {len(found.settings.get('methods') or [])} methods finished"
        differ = differences(found.settings, settings)
        if overwrite:
            say(f"--overwrite: deleting the previous comparison in {out} ({done})")
            _remove(out, found)
            record = Record(settings)
        elif differ:
            raise FilterkitError(f"{out} holds another comparison ({done}), run with other options: "
                                 f"{'; '.join(differ)}. Give the recorded options to continue it with --resume, "
                                 "choose another --out, or pass --overwrite to delete it and start again")
        elif not resume:
            raise FilterkitError(f"{out} holds this comparison already ({done}): pass --resume to continue it "
                                 "(finished methods are kept), --overwrite to delete it and start again, or "
                                 "choose another --out")
        else:
            say(f"resuming the comparison in {out}: {done}")
            record = found
    record.settings = settings  # the same values; the methods in this run's order
    record.write(out)
    return record


def clear_unstarted(model_dir: Path) -> None:
    """Remove a method's folder left by a run that stopped before its first checkpoint (it
    holds at most the training log); refuse one that holds anything else."""
    from .train import LOG

    if not model_dir.exists():
        return
    files = [p for p in model_dir.rglob("*") if not p.is_dir()]
    if any(p.relative_to(model_dir) != Path(LOG) for p in files) or model_dir.is_symlink():
        raise FilterkitError(f"{model_dir} holds files but no checkpoint to continue from: move it away, or pass "
                             "--overwrite to start the comparison again")
    shutil.rmtree(model_dir)


def relative_model(out: Path, model: str) -> Path:
    """A recorded model folder, checked to lie inside ``out`` (a record is a file anyone can edit)."""
    path = out / model
    if os.path.isabs(model) or ".." in Path(model).parts:
        raise FilterkitError(f"{out / RECORD_FILE} names a model folder outside {out}: {model!r}")
    return path
