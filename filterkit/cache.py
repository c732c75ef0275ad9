"""The embedding cache: one SQLite file (WAL) of float32 vectors keyed by (model id, sha256).

Three tables do the work (a fourth, ``meta``, holds the schema version):

- ``embeddings(model_id, sha256, dim, vector)``: a vector per model and file *content*, so
  renamed, moved or copied files are never embedded twice;
- ``files(path, size, mtime_ns, sha256)``: remembers each path's hash so unchanged files
  are not re-read;
- ``failures(sha256, decoder, reason)``: contents that did not decode, so they are not
  retried on every run (they are retried when the decoder changes, e.g. a new Pillow).

Every write is one transaction, so a process killed at any moment leaves the cache as it
was after its last committed batch; the next run picks up from there.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import numpy as np

from .errors import FilterkitError
from .fsutil import default_cache_path
from .images import sha256_file

SCHEMA_VERSION = "1"
_CHUNK = 500  # keys per IN (...) query, well under SQLite's variable limit

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    path BLOB PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS embeddings (
    model_id TEXT NOT NULL, sha256 TEXT NOT NULL, dim INTEGER NOT NULL, vector BLOB NOT NULL,
    PRIMARY KEY (model_id, sha256)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS failures (
    sha256 TEXT PRIMARY KEY, decoder TEXT NOT NULL, reason TEXT NOT NULL
) WITHOUT ROWID;
"""


def _path_key(path: Path) -> bytes:
    # Bytes, not text: file names need not be valid UTF-8.
    return os.fsencode(os.path.abspath(path))


def _chunks(items: Sequence, size: int = _CHUNK) -> Iterable[Sequence]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


class EmbeddingCache:
    """Persistent vectors keyed by (model id, content hash). Use as a context manager."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path is not None else default_cache_path()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: we open transactions explicitly, one per batch.
            self._db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes
            with self._transaction():
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            (version,) = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        except (sqlite3.DatabaseError, OSError) as e:
            if hasattr(self, "_db"):
                self._db.close()
            raise FilterkitError(f"cannot open the embedding cache {self.path}: {e}") from None
        if version != SCHEMA_VERSION:
            self._db.close()
            raise FilterkitError(
                f"embedding cache {self.path} has schema {version}, this filterkit expects "
                f"{SCHEMA_VERSION}; point --cache at a new file"
            )

    @contextlib.contextmanager
    def _transaction(self):
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()

    @property
    def index_dir(self) -> Path:
        """Where FAISS indexes built from this cache's vectors are kept (see index.cached_index)."""
        return self.path.with_name(self.path.name + ".indexes")

    def __enter__(self) -> EmbeddingCache:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    # -- content hashes -----------------------------------------------------------------
    def content_hashes(
        self,
        paths: Sequence[Path],
        threads: int = 4,
        on_hashed: Callable[[int], None] | None = None,
    ) -> tuple[list[str | None], dict[int, str]]:
        """sha256 of each path, re-reading only files whose size or mtime changed.

        Returns (hashes, errors): ``hashes[i]`` is None where the file could not be read,
        and ``errors[i]`` says why.
        """
        stats: list[os.stat_result | None] = []
        errors: dict[int, str] = {}
        for i, p in enumerate(paths):
            try:
                stats.append(os.stat(p))
            except OSError as e:
                stats.append(None)
                errors[i] = f"cannot read file: {e.strerror or e}"
        keys = [_path_key(p) for p in paths]
        known: dict[bytes, tuple[int, int, str]] = {}
        for chunk in _chunks(keys):
            rows = self._db.execute(
                f"SELECT path, size, mtime_ns, sha256 FROM files WHERE path IN ({','.join('?' * len(chunk))})",
                chunk,
            )
            known.update((row[0], row[1:]) for row in rows)
        hashes: list[str | None] = [None] * len(paths)
        todo = []
        for i, (key, st) in enumerate(zip(keys, stats)):
            if st is None:
                continue
            row = known.get(key)
            if row and row[0] == st.st_size and row[1] == st.st_mtime_ns:
                hashes[i] = row[2]
            else:
                todo.append(i)
        if on_hashed and len(paths) - len(todo):
            on_hashed(len(paths) - len(todo))

        def hash_one(i: int) -> tuple[int, str | None, str | None]:
            try:
                return i, sha256_file(paths[i]), None
            except OSError as e:
                return i, None, f"cannot read file: {e.strerror or e}"

        fresh = []
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            for i, digest, error in pool.map(hash_one, todo):
                if digest is None:
                    errors[i] = error
                else:
                    hashes[i] = digest
                    fresh.append((keys[i], stats[i].st_size, stats[i].st_mtime_ns, digest))
                if on_hashed:
                    on_hashed(1)
        for chunk in _chunks(fresh, 5000):
            with self._transaction():
                self._db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)", chunk)
        return hashes, errors

    # -- vectors ------------------------------------------------------------------------
    def missing(self, model_id: str, hashes: Iterable[str]) -> list[str]:
        """The distinct hashes (in first-seen order) with no vector for ``model_id`` yet."""
        wanted = list(dict.fromkeys(hashes))
        have: set[str] = set()
        for chunk in _chunks(wanted):
            rows = self._db.execute(
                f"SELECT sha256 FROM embeddings WHERE model_id=? AND sha256 IN ({','.join('?' * len(chunk))})",
                [model_id, *chunk],
            )
            have.update(r[0] for r in rows)
        return [h for h in wanted if h not in have]

    def put(self, model_id: str, hashes: Sequence[str], vectors: np.ndarray) -> None:
        """Store vectors [N, D] for ``hashes`` in one transaction."""
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        if vectors.ndim != 2 or len(vectors) != len(hashes):
            raise ValueError(f"expected {len(hashes)} vectors, got shape {vectors.shape}")
        dim = vectors.shape[1]
        rows = [(model_id, h, dim, v.tobytes()) for h, v in zip(hashes, vectors)]
        with self._transaction():
            self._db.executemany("INSERT OR REPLACE INTO embeddings VALUES (?, ?, ?, ?)", rows)

    def get(self, model_id: str, hashes: Sequence[str]) -> np.ndarray:
        """Vectors [len(hashes), D] float32 in the order given; KeyError if one is missing."""
        found: dict[str, np.ndarray] = {}
        dims = set()
        for chunk in _chunks(list(dict.fromkeys(hashes))):
            rows = self._db.execute(
                f"SELECT sha256, dim, vector FROM embeddings WHERE model_id=? AND sha256 IN ({','.join('?' * len(chunk))})",
                [model_id, *chunk],
            )
            for digest, dim, blob in rows:
                if len(blob) != 4 * dim:
                    raise FilterkitError(f"embedding cache {self.path} holds a damaged vector for {digest}")
                found[digest] = np.frombuffer(blob, dtype="<f4")
                dims.add(dim)
        missing = [h for h in hashes if h not in found]
        if missing:
            raise KeyError(f"{len(missing)} hashes have no vector for model {model_id}, e.g. {missing[0]}")
        if len(dims) > 1:
            raise FilterkitError(f"embedding cache {self.path} mixes dimensions {sorted(dims)} for model {model_id}")
        if not hashes:
            return np.empty((0, 0), dtype=np.float32)
        return np.stack([found[h] for h in hashes]).astype(np.float32, copy=False)

    def put_failures(self, decoder: str, reasons: dict[str, str]) -> None:
        """Remember contents that ``decoder`` could not decode, with the reason."""
        with self._transaction():
            self._db.executemany("INSERT OR REPLACE INTO failures VALUES (?, ?, ?)",
                                 [(h, decoder, r) for h, r in reasons.items()])

    def failures(self, decoder: str, hashes: Iterable[str]) -> dict[str, str]:
        """Known decode failures under this ``decoder`` among ``hashes``: {sha256: reason}."""
        found: dict[str, str] = {}
        for chunk in _chunks(list(dict.fromkeys(hashes))):
            rows = self._db.execute(
                f"SELECT sha256, reason FROM failures WHERE decoder=? AND sha256 IN ({','.join('?' * len(chunk))})",
                [decoder, *chunk],
            )
            found.update(rows)
        return found

    def iter_vectors(self, model_id: str, chunk: int = 1 << 16):
        """Every (sha256s, vectors [n, D]) of ``model_id`` in sha256 order, ``chunk`` rows at a
        time: the whole set never has to fit in memory."""
        cursor = self._db.execute(
            "SELECT sha256, dim, vector FROM embeddings WHERE model_id=? ORDER BY sha256", (model_id,))
        while rows := cursor.fetchmany(chunk):
            if any(len(blob) != 4 * dim for _, dim, blob in rows):
                raise FilterkitError(f"embedding cache {self.path} holds a damaged vector")
            yield [r[0] for r in rows], np.stack([np.frombuffer(r[2], dtype="<f4") for r in rows])

    def paths_of(self, hashes: Sequence[str]) -> dict[str, list[Path]]:
        """The paths this cache has seen with each content hash (as last hashed)."""
        found: dict[str, list[Path]] = {}
        for chunk in _chunks(list(dict.fromkeys(hashes))):
            rows = self._db.execute(
                f"SELECT sha256, path FROM files WHERE sha256 IN ({','.join('?' * len(chunk))}) ORDER BY path", chunk)
            for digest, path in rows:
                found.setdefault(digest, []).append(Path(os.fsdecode(path)))
        return found

    def count(self, model_id: str | None = None) -> int:
        if model_id is None:
            return self._db.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0]
        return self._db.execute("SELECT COUNT(*) FROM embeddings WHERE model_id=?", (model_id,)).fetchone()[0]

    def merge_from(self, other: str | os.PathLike) -> dict[str, int]:
        """Copy every vector, path hash and decode failure of the cache file ``other`` into
        this one, in one transaction. Rows already here win (nothing is overwritten).
        Returns the number of rows added per table."""
        other = Path(other)
        check_mergeable(other, self.path)
        self._db.execute("ATTACH DATABASE ? AS other", (str(other),))
        try:
            added = {}
            with self._transaction():
                for table in ("embeddings", "files", "failures"):
                    before = self._db.total_changes
                    self._db.execute(f"INSERT OR IGNORE INTO main.{table} SELECT * FROM other.{table}")
                    added[table] = self._db.total_changes - before
        finally:
            self._db.execute("DETACH DATABASE other")
        return added

    def integrity_check(self) -> str:
        return self._db.execute("PRAGMA integrity_check").fetchone()[0]


def check_mergeable(other: str | os.PathLike, into: str | os.PathLike) -> None:
    """That the file ``other`` is a filterkit cache of this schema that can be merged into
    ``into``; read-only (the source may be read-only, or not ours)."""
    other = Path(other)
    if not other.is_file():
        raise FilterkitError(f"cache not found: {other}")
    if other.resolve() == Path(into).resolve():
        raise FilterkitError(f"cannot merge {other} into itself")
    try:
        with contextlib.closing(sqlite3.connect(f"file:{quote(str(other.resolve()))}?mode=ro", uri=True)) as source:
            row = source.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            tables = {r[0] for r in source.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as e:
        raise FilterkitError(f"cannot merge {other}: not a filterkit cache ({e})") from None
    if row is None or row[0] != SCHEMA_VERSION or not {"embeddings", "files", "failures"} <= tables:
        raise FilterkitError(f"cannot merge {other}: not a filterkit cache of schema {SCHEMA_VERSION}")
