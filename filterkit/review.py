"""``filterkit review``: a local page to check a report by hand, and learn from the clicks.

For a filter report, the images are shown by decision, the review band first, each with its
score, nearest exemplar and reason. Each image the user marks keep or reject is written to
the labels file beside the report (``X.labels.json``, atomically) and joins the keep-like or
reject-like exemplars; the rest are scored again with ``filtering.filter_vectors`` and the
report's own options, so the threshold and review band are recalibrated on the larger
exemplar sets. Each round of marks shrinks the band: active learning on the user's clicks,
where the images asked about are the ones the filter is least sure of (uncertainty sampling,
Lewis & Gale 1994). The other kinds take one verdict per entry (``VerdictSession``): a dedup
report's groups are confirmed or split, a ``dedup --against`` report's pairs (new image,
reference image) confirmed or rejected, an outliers report's top images marked outlier or fine.

Vectors come from the embedding cache the report's run used (its ``run`` record), opened
read-only; only images it lacks are embedded, in memory. The server binds 127.0.0.1, serves
thumbnails of the files the page shows (all named by the report) and nothing else, and writes
nothing outside the report's folder.

    >>> session = open_session("out/filter.json")
    >>> serve(session, port=0, open_browser=False)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

import numpy as np

from .errors import FilterkitError, ImageError
from .fsutil import atomic_write_text

LABELS_FORMAT = "filterkit-labels/1"
THUMB = 160
MARKS = ("keep", "reject")
KINDS = "filter, dedup, dedup --against or outliers"  # the reports review opens
EXPECTED = f"give the .html or .json that --report of {KINDS} wrote"


def report_json(path: str | os.PathLike) -> Path:
    """The report's JSON: the path itself, or the .json beside a .html/.csv report."""
    path = Path(path)
    if path.is_dir():
        raise FilterkitError(f"{path} is a folder, not a report: {EXPECTED}")
    if path.suffix.lower() in (".html", ".htm", ".csv"):
        path = path.with_suffix(".json")
    if not path.is_file():
        raise FilterkitError(f"report not found: {path} ({EXPECTED})")
    return path


def labels_path(report: Path) -> Path:
    return report.with_name(report.stem + ".labels.json")


def _read_json(path: Path, what: str, hint: str = "") -> dict:
    hint = f"; {hint}" if hint else ""
    try:
        doc = json.loads(path.read_text(encoding="utf-8", errors="surrogateescape"))
    except json.JSONDecodeError as e:
        raise FilterkitError(f"cannot read {what} {path}: not JSON ({e}){hint}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise FilterkitError(f"cannot read {what} {path}: {e}{hint}") from None
    if not isinstance(doc, dict):
        raise FilterkitError(f"{what} {path} is not a JSON object{hint}")
    return doc


def open_session(report: str | os.PathLike):
    """The session for the report (its .json, or the .html beside it): a FilterSession,
    DedupSession, CrossDedupSession or OutlierSession, told apart by the report's keys."""
    path = report_json(report)
    doc = _read_json(path, "report", EXPECTED)
    if isinstance(doc.get("images"), list) and isinstance(doc.get("summary"), dict):
        return FilterSession(path, doc)
    for key, session in (("groups", DedupSession), ("duplicates", CrossDedupSession), ("outliers", OutlierSession)):
        if isinstance(doc.get(key), list):
            return session(path, doc)
    raise FilterkitError(f"{path} is not a report filterkit review opens ({KINDS}): no 'images' + 'summary', "
                         "'groups', 'duplicates' or 'outliers'")


class _Session:
    """What every kind shares: the report, its labels file, the files that may be served."""

    kind = ""

    def __init__(self, report: Path, doc: dict) -> None:
        self.report, self.doc = report, doc
        self.labels_file = labels_path(report)
        self.lock = threading.Lock()  # one mark at a time: re-scoring and the labels file
        self.files: list[Path] = []  # what /thumb/N may serve, by N
        self._file_index: dict[str, int] = {}
        self._thumbs: dict[int, bytes] = {}
        self.saved = self._read_labels()

    def _read_labels(self) -> dict:
        if not self.labels_file.exists():
            return {}
        doc = _read_json(self.labels_file, "labels file")
        if doc.get("format") != LABELS_FORMAT:
            raise FilterkitError(f"{self.labels_file} is not a filterkit labels file ({LABELS_FORMAT}): "
                                 "move it away to start afresh")
        if doc.get("kind", self.kind) != self.kind:  # the report was rewritten by another command
            raise FilterkitError(f"{self.labels_file} holds {doc['kind']} labels, not {self.kind} ones (was the "
                                 "report written again by another command?): move it away to start afresh")
        return doc

    def _file(self, path: Path) -> int:
        key = str(path)
        if key not in self._file_index:
            self._file_index[key] = len(self.files)
            self.files.append(path)
        return self._file_index[key]

    def thumbnail(self, n: int) -> bytes | None:
        """JPEG bytes of file N's thumbnail (decoded once), None if it is not one of the report's."""
        if not 0 <= n < len(self.files):
            return None
        if n not in self._thumbs:
            from .images import load_image

            try:
                image = load_image(self.files[n], draft_size=THUMB)
            except ImageError:
                return None
            image.thumbnail((THUMB, THUMB))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=85)
            self._thumbs[n] = buffer.getvalue()
        return self._thumbs[n]

    def _write_labels(self, body: dict) -> None:
        doc = {"format": LABELS_FORMAT, "report": self.report.name, "kind": self.kind,
               "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **body}
        atomic_write_text(self.labels_file, json.dumps(doc, indent=2) + "\n")


# -- filter reports ------------------------------------------------------------------------------
@dataclass
class _Item:
    name: str  # the path as the report wrote it (the labels file's key)
    path: Path  # resolved against the run's working folder
    file: int  # index into files
    row: int | None  # row of vectors, None if it has none (an error, or unreadable now)
    decision: str
    score: float | None
    nearest: str | None
    reason: str


class FilterSession(_Session):
    kind = "filter"

    def __init__(self, report: Path, doc: dict, embed_missing: bool = True) -> None:
        super().__init__(report, doc)
        self.run = doc.get("run") if isinstance(doc.get("run"), dict) else None
        cwd = Path(self.run.get("cwd") or ".") if self.run else report.parent
        self.items: list[_Item] = []
        for d in doc["images"]:
            if not isinstance(d, dict) or not isinstance(d.get("path"), str):
                raise FilterkitError(f"{report}: an image entry without a path")
            path = cwd / d["path"]
            nearest = d.get("nearest_exemplar")
            self.items.append(_Item(d["path"], path, self._file(path), None, d.get("decision", "error"),
                                    d.get("score"), str(cwd / nearest) if nearest else None, d.get("reason", "")))
        self.summary = doc["summary"]
        self.marks: dict[str, str] = {k: v for k, v in (self.saved.get("marks") or {}).items() if v in MARKS}
        self.history: list[dict] = list(self.saved.get("history") or [])
        self.round = int(self.saved.get("round") or 0)
        self.note = ""
        self.vectors = None
        self.exemplars: dict[str, tuple[list[Path], np.ndarray]] = {}
        if self.run is None:
            self.note = ("the report has no run record (written by an older filterkit): marks are saved, "
                         "but images are not re-scored")
        else:
            self._load_vectors(embed_missing)
        if self.marks and self.vectors is not None:
            self.rescore(record=False)
        if not self.history:
            self.history.append(self._counts_entry())

    def _load_vectors(self, embed_missing: bool) -> None:
        from .images import discover_images

        run = self.run
        follow = bool(run.get("follow_symlinks"))
        groups = {"keep": discover_images(run["keep_like"], follow)}
        if run.get("reject_like"):
            groups["reject"] = discover_images(run["reject_like"], follow)
        candidates = [it.path for it in self.items if it.decision != "error"]
        every = candidates + [p for ps in groups.values() for p in ps]
        vectors = vectors_for(every, run, embed_missing)
        for role, ps in groups.items():
            ok = [p for p in ps if str(p) in vectors]
            if role == "keep" and not ok:
                raise FilterkitError(f"none of the keep-like exemplars in {run['keep_like']} has a vector")
            self.exemplars[role] = (ok, np.stack([vectors[str(p)] for p in ok]) if ok else None)
            for p in ok:
                self._file(p)
        rows = [it for it in self.items if it.decision != "error" and str(it.path) in vectors]
        for r, it in enumerate(rows):
            it.row = r
        self.vectors = np.stack([vectors[str(it.path)] for it in rows]) if rows else None

    def _counts_entry(self) -> dict:
        counts = {k: 0 for k in ("keep", "review", "reject", "error", "marked")}
        for it in self.items:
            counts["marked" if it.name in self.marks else it.decision] += 1
        return {"round": self.round, **counts, "threshold": self.summary.get("threshold"),
                "review_band": self.summary.get("review_band")}

    def rescore(self, record: bool = True) -> None:
        """Score the unmarked images again, the marked ones added to the exemplars."""
        from .filtering import filter_vectors

        run = self.run
        marked = {lab: [it for it in self.items if self.marks.get(it.name) == lab and it.row is not None]
                  for lab in MARKS}
        sets = {}
        for lab in MARKS:
            paths, vecs = self.exemplars.get(lab, ([], None))
            extra = [it.path for it in marked[lab]]
            stack = [v for v in (vecs, self.vectors[[it.row for it in marked[lab]]] if extra else None)
                     if v is not None]
            sets[lab] = (list(paths) + extra, np.concatenate(stack) if stack else None)
        todo = [it for it in self.items if it.row is not None and it.name not in self.marks]
        if todo and sets["keep"][1] is not None:
            rejects = sets["reject"] if sets["reject"][1] is not None else (None, None)
            result = filter_vectors([it.path for it in todo], self.vectors[[it.row for it in todo]],
                                    *sets["keep"], *rejects, threshold=run.get("threshold", "auto"),
                                    prototypes=run.get("prototypes"), target_recall=run.get("target_recall", 0.95),
                                    # the report's own scoring: reports from before it was recorded used top-m
                                    scoring=run.get("scoring", "topm"),
                                    normalize=run.get("normalize", "auto"), review_band=run.get("review_band", "auto"))
            for it, d in zip(todo, result.decisions):
                it.decision, it.score, it.reason = d.decision, d.score, d.reason
                it.nearest = None if d.nearest_exemplar is None else str(d.nearest_exemplar)
            self.summary = result.summary()
        if record:
            self.round += 1
        self.history.append(self._counts_entry())

    def mark(self, name: str, label: str | None) -> None:
        """Mark the image the report calls ``name`` keep / reject (None: unmark), save, re-score."""
        if label is not None and label not in MARKS:
            raise FilterkitError(f"a mark is one of {', '.join(MARKS)} (or null to unmark), got {label!r}")
        item = next((it for it in self.items if it.name == name), None)
        if item is None:
            raise FilterkitError(f"not an image of this report: {name}")
        if item.decision == "error" and item.row is None:
            raise FilterkitError(f"{name} could not be read: it cannot be marked")
        with self.lock:
            if label is None:
                self.marks.pop(name, None)
            else:
                self.marks[name] = label
            if self.vectors is not None:
                self.rescore()
            else:
                self.round += 1
                self.history.append(self._counts_entry())
            self._write_labels({"round": self.round, "marks": self.marks, "history": self.history})

    def state(self) -> dict:
        s = self.summary
        items = []
        for it in self.items:
            near = it.nearest
            mark = self.marks.get(it.name)
            reason = (f"a {'keep' if mark == 'keep' else 'reject'}-like exemplar now: the other images are scored "
                      "against it" if mark and it.row is not None else it.reason)
            items.append({"name": it.name, "file": it.file, "decision": it.decision,
                          "mark": mark, "score": it.score, "reason": reason,
                          "nearest": Path(near).name if near else None,
                          "nearest_file": self._file_index.get(near) if near else None})
        return {"kind": self.kind, "report": self.report.name, "labels": self.labels_file.name,
                "round": self.round, "history": self.history[-20:], "note": self.note,
                "threshold": s.get("threshold"), "review_band": s.get("review_band"),
                "exemplars": s.get("exemplars"), "negatives": s.get("negatives"),
                "rescoring": self.vectors is not None, "items": items}


def _read_cached(cache: str, model_id: str, hashes: list[str]) -> dict[str, np.ndarray]:
    """The cache's vectors for ``hashes``, the file opened read-only (nothing is written to it)."""
    found: dict[str, np.ndarray] = {}
    if not cache or not Path(cache).is_file():
        return found
    try:
        with contextlib.closing(sqlite3.connect(f"file:{quote(str(Path(cache).resolve()))}?mode=ro",
                                                uri=True)) as db:
            wanted = list(dict.fromkeys(hashes))
            for i in range(0, len(wanted), 500):
                chunk = wanted[i:i + 500]
                rows = db.execute(f"SELECT sha256, dim, vector FROM embeddings WHERE model_id=? AND sha256 IN "
                                  f"({','.join('?' * len(chunk))})", [model_id, *chunk])
                found.update((h, np.frombuffer(blob, dtype="<f4").astype(np.float32))
                             for h, dim, blob in rows if len(blob) == 4 * dim)
    except sqlite3.DatabaseError:
        return {}  # unreadable now: the images are embedded again instead
    return found


def vectors_for(paths: list[Path], run: dict, embed_missing: bool = True) -> dict[str, np.ndarray]:
    """{str(path): vector} for the paths that have one: from the run's cache, else embedded in
    memory by the run's model (which must still be the one that made the report)."""
    from .images import sha256_file

    def digest(p: Path) -> str | None:
        try:
            return sha256_file(p)
        except OSError:
            return None

    with ThreadPoolExecutor(4) as pool:
        hashes = list(pool.map(digest, paths))
    cached = _read_cached(run.get("cache"), run.get("model_id", ""), [h for h in hashes if h])
    out = {str(p): cached[h] for p, h in zip(paths, hashes) if h in cached}
    missing = [p for p, h in zip(paths, hashes) if h and h not in cached]
    if missing and embed_missing:
        from .cache import EmbeddingCache
        from .encoder import Encoder
        from .pipeline import embed_paths

        encoder = Encoder.load(run.get("model"), device="cpu")
        if run.get("model_id") and encoder.model_id != run["model_id"]:
            raise FilterkitError(f"the report was made with model {run['model_id']}, but {run.get('model')} is now "
                                 f"{encoder.model_id}: re-run filter to review it")
        with EmbeddingCache(":memory:") as memory:
            found = embed_paths(missing, encoder, memory, workers=0, progress=False)
        out.update((str(p), v) for p, v in zip(found.paths, found.vectors))
    return out


# -- reports whose entries each get one verdict: dedup groups, cross-set pairs, outliers ------------
def _f3(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _entry(report: Path, d, *fields: str) -> dict:
    if not isinstance(d, dict) or not all(isinstance(d.get(f), str) for f in fields):
        raise FilterkitError(f"{report}: an entry without {' and '.join(fields)}")
    return d


class VerdictSession(_Session):
    """A report whose entries (a group, a pair, an outlier) are each confirmed or not. Its kind
    says what ``VERDICTS`` are (value, key, button), the first one agreeing with the report; the
    labels file holds ``{SECTION: {entry key: verdict}, "members": {entry key: [paths]}}``."""

    SECTION = ""  # the labels file's key of the verdicts
    ENTRY = ""  # what one entry is called
    VERDICTS: tuple[tuple[str, str, str], ...] = ()

    def __init__(self, report: Path, doc: dict) -> None:
        super().__init__(report, doc)
        self.entries: list[dict] = []  # {"key", "why", "members": [{"name", "file", "caption"}]}
        for key, why, members in self._entries(report, doc):
            self.entries.append({"key": key, "why": why, "members": [
                {"name": name, "file": self._file(Path(name)), "caption": caption} for name, caption in members]})
        values = [v for v, _, _ in self.VERDICTS]
        self.verdicts = {k: v for k, v in (self.saved.get(self.SECTION) or {}).items() if v in values}

    def _entries(self, report: Path, doc: dict):
        """(key, why, [(path, caption)]) of each entry the report lists."""
        raise NotImplementedError

    def verdict(self, entry: int, verdict: str | None) -> None:
        """Give entry number ``entry`` a verdict (None: take it back) and save the labels file."""
        values = [v for v, _, _ in self.VERDICTS]
        if verdict is not None and verdict not in values:
            raise FilterkitError(f"a verdict is one of {', '.join(values)} (or null), got {verdict!r}")
        if not isinstance(entry, int) or isinstance(entry, bool) or not 0 <= entry < len(self.entries):
            raise FilterkitError(f"no {self.ENTRY} {entry!r} in this report")
        with self.lock:
            key = self.entries[entry]["key"]
            if verdict is None:
                self.verdicts.pop(key, None)
            else:
                self.verdicts[key] = verdict
            members = {e["key"]: [m["name"] for m in e["members"]] for e in self.entries}
            self._write_labels({self.SECTION: self.verdicts, "members": {k: members[k] for k in self.verdicts}})

    def state(self) -> dict:
        summary = self.doc.get("summary")
        return {"kind": self.kind, "report": self.report.name, "labels": self.labels_file.name, "noun": self.ENTRY,
                "summary": summary if isinstance(summary, str) else "", "verdicts": self.VERDICTS,
                "entries": [{**e, "verdict": self.verdicts.get(e["key"])} for e in self.entries]}


class DedupSession(VerdictSession):
    """A dedup report: each group confirmed, or split (not all copies of one image)."""

    kind, SECTION, ENTRY = "dedup", "groups", "group"
    VERDICTS = (("confirm", "c", "Confirm"), ("split", "s", "Split"))

    def _entries(self, report, doc):
        for n, g in enumerate(doc["groups"]):
            if not isinstance(g, dict) or not isinstance(g.get("keep"), str):
                raise FilterkitError(f"{report}: a group without a kept image")
            weakest = (g.get("weakest_link") or {}).get("score")
            members = [(g["keep"], "keep")]
            for d in g.get("duplicates") or []:
                d = _entry(report, d, "path")
                members.append((d["path"], "identical bytes" if d.get("exact") else f"score {_f3(d.get('score'))}"))
            yield g["keep"], f"group {n}" + ("" if weakest is None else f" \u00b7 weakest link {_f3(weakest)}"), members


class CrossDedupSession(VerdictSession):
    """A ``dedup NEW --against REFERENCE`` report: each new image beside the reference image it
    duplicates, confirmed or rejected (not a duplicate)."""

    kind, SECTION, ENTRY = "cross-dedup", "pairs", "pair"
    VERDICTS = (("confirm", "c", "Duplicate"), ("reject", "r", "Not a duplicate"))

    def _entries(self, report, doc):
        threshold = doc.get("threshold")
        for d in doc["duplicates"]:
            d = _entry(report, d, "path", "duplicate_of")
            why = "identical bytes" if d.get("exact") else f"pair score {_f3(d.get('score'))} (threshold {_f3(threshold)})"
            yield d["path"], why, [(d["path"], "new"), (d["duplicate_of"], "reference")]


class OutlierSession(VerdictSession):
    """An outliers report: each of the top images beside its nearest neighbour, marked outlier
    (the report is right) or fine (not an outlier). The report ranks every image; only the top
    ones are asked about (and served)."""

    kind, SECTION, ENTRY = "outliers", "outliers", "outlier"
    VERDICTS = (("outlier", "o", "Outlier"), ("fine", "f", "Fine"))

    def _entries(self, report, doc):
        top = doc.get("top") if isinstance(doc.get("top"), int) else len(doc["outliers"])
        k = doc.get("k")
        for o in doc["outliers"][:top]:
            o = _entry(report, o, "path", "nearest")
            why = (f"rank {o.get('rank', '-')}: mean cosine distance {_f3(o.get('score'))} to its {k or '-'} nearest "
                   f"other images; nearest at cosine {_f3(o.get('nearest_similarity'))}")
            yield o["path"], why, [(o["path"], f"score {_f3(o.get('score'))}"), (o["nearest"], "nearest")]


# -- the server ----------------------------------------------------------------------------------
def _handler(session):
    class Handler(BaseHTTPRequestHandler):
        server_version = "filterkit-review"

        def log_message(self, *args) -> None:  # quiet: the terminal shows the URL and errors only
            pass

        def _local(self) -> bool:
            # The Host header names this server: a page elsewhere cannot reach it by DNS rebinding.
            host = (self.headers.get("Host") or "").rsplit(":", 1)[0]
            return host in ("127.0.0.1", "localhost")

        def _send(self, status: int, body: bytes, kind: str, cache: bool = False) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "max-age=3600" if cache else "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, value) -> None:
            self._send(status, json.dumps(value).encode(), "application/json")

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if not self._local():
                return self._json(HTTPStatus.FORBIDDEN, {"error": "wrong host"})
            path = self.path.split("?", 1)[0]
            if path == "/":
                from .review_page import render_page

                with session.lock:
                    page = render_page(session.state())
                return self._send(HTTPStatus.OK, page, "text/html; charset=utf-8")
            if path == "/api/state":
                with session.lock:
                    return self._json(HTTPStatus.OK, session.state())
            if path.startswith("/thumb/") and path[7:].isdigit():
                data = session.thumbnail(int(path[7:]))
                if data is not None:
                    return self._send(HTTPStatus.OK, data, "image/jpeg", cache=True)
            self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})

        def do_POST(self) -> None:  # noqa: N802
            if not self._local():
                return self._json(HTTPStatus.FORBIDDEN, {"error": "wrong host"})
            # JSON only: a form on another site cannot post it without a CORS preflight, which fails.
            if (self.headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
                return self._json(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, {"error": "send application/json"})
            try:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(min(length, 1 << 20)) or b"{}")
                if self.path == "/api/mark" and session.kind == "filter":
                    session.mark(body.get("name"), body.get("label"))
                elif self.path == "/api/verdict" and isinstance(session, VerdictSession):
                    session.verdict(body.get("entry"), body.get("verdict"))
                else:
                    return self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})
            except (ValueError, AttributeError) as e:
                return self._json(HTTPStatus.BAD_REQUEST, {"error": f"bad request: {e}"})
            except FilterkitError as e:
                return self._json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
            except OSError as e:  # the labels file could not be written: say so on the page
                return self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"cannot save the labels: {e}"})
            with session.lock:
                self._json(HTTPStatus.OK, session.state())

    return Handler


def make_server(session, port: int = 0) -> ThreadingHTTPServer:
    """An HTTP server for ``session`` on 127.0.0.1:``port`` (0: any free port), not yet serving."""
    try:
        server = ThreadingHTTPServer(("127.0.0.1", port), _handler(session))
    except OSError as e:
        raise FilterkitError(f"cannot listen on 127.0.0.1:{port}: {e.strerror or e} (--port 0 picks a free one)") \
            from None
    server.daemon_threads = True
    return server


def serve(session, port: int = 0, open_browser: bool = True, echo=print) -> None:
    """Serve until SIGTERM (returns) or Ctrl-C (KeyboardInterrupt propagates), then close."""
    server = make_server(session, port)
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    echo(f"reviewing {session.report.name} at {url} (marks go to {session.labels_file}); Ctrl-C stops")

    def stop(*_):  # shutdown() waits for serve_forever, so it runs beside it, not in it
        threading.Thread(target=server.shutdown, daemon=True).start()

    previous = signal.signal(signal.SIGTERM, stop) if threading.current_thread() is threading.main_thread() else None
    try:
        if open_browser:
            import webbrowser

            webbrowser.open(url)
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        with session.lock:  # a mark being saved finishes first
            pass
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
