"""An IVF index for collections whose vectors do not fit in memory, built shard by shard.

The coarse quantizer is trained once on a sample; each shard (an embedding cache, e.g. from
``embed --shard I/N`` on one machine) is added to a copy of the trained empty index and
written out; the shards' inverted lists are then merged into one on-disk file with FAISS's
``merge_ondisk``, which memory-maps them. Searching maps the inverted lists, so RAM holds
only the coarse centroids and the lists a query visits.

An index directory holds:
  index.faiss    the IVF index (its inverted lists live in lists.ivfdata beside it; the
                 directory can be moved or mounted read-only)
  lists.ivfdata  the merged inverted lists
  ids.txt        content sha256 of each vector id, one per line
  meta.json      model id, dimension, sizes, nlist, nprobe, the measured recall and the
                 normaliser (its arrays in normalizer_*.npy: the vectors are indexed normalised)

    >>> build_index_dir(["part0.sqlite", "part1.sqlite"], model_id, "idx/")
    >>> index, sha256_of_id, meta = load_index_dir("idx/")   # lists memory-mapped
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import faiss
import numpy as np

from .cache import EmbeddingCache
from .errors import FilterkitError
from .fsutil import atomic_write_text
from .index import TRAIN_POINTS_PER_LIST, default_nlist, exact_top_scores, sample_rows, smallest_nprobe
from .normalize import NORMALIZER_FILES, Normalizer

FORMAT = "filterkit-ivf/1"


@contextlib.contextmanager
def _stdout_to_stderr(quiet: bool = False):
    """FAISS's on-disk lists print progress notes from C++ onto stdout (fd 1), which would
    corrupt `--json` output: send fd 1 to stderr meanwhile, or with ``quiet`` to nowhere."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        if quiet:
            with open(os.devnull, "wb") as null:
                os.dup2(null.fileno(), 1)
        else:
            os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _distinct_ids(caches: Sequence[Path], model_id: str) -> list[tuple[str, int]]:
    """(sha256, cache number) of every distinct content, first cache first."""
    seen: dict[str, int] = {}
    for number, path in enumerate(caches):
        with EmbeddingCache(path) as cache:
            for hashes, _ in cache.iter_vectors(model_id):
                for h in hashes:
                    seen.setdefault(h, number)
    return list(seen.items())


def _stream(caches: Sequence[Path], model_id: str, owner: dict[str, int], only: int | None = None):
    """(sha256s, vectors) chunks, each content once (from the first cache holding it);
    ``only``: just the contents owned by that cache number."""
    for number, path in enumerate(caches):
        if only is not None and number != only:
            continue
        with EmbeddingCache(path) as cache:
            for hashes, vectors in cache.iter_vectors(model_id):
                mine = [i for i, h in enumerate(hashes) if owner[h] == number]
                if mine:
                    yield [hashes[i] for i in mine], np.ascontiguousarray(vectors[mine], dtype=np.float32)


def build_index_dir(caches: Sequence[str | os.PathLike], model_id: str, out: str | os.PathLike,
                    nlist: int | None = None, target_recall: float = 0.99, seed: int = 0,
                    on_progress: Callable[[str], None] | None = None, normalize: str = "auto") -> dict:
    """Build the index directory ``out`` from the vectors of ``model_id`` in ``caches``.

    ``normalize``: a normaliser fitted on the quantizer's training sample; every vector is
    indexed normalised, and searches apply the stored normaliser to their queries."""
    caches = [Path(c).resolve() for c in caches]
    for c in caches:
        if not c.is_file():
            raise FilterkitError(f"cache not found: {c}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FilterkitError(f"{out} exists and is not an empty folder; choose a new one")
    say = on_progress or (lambda _: None)
    ids = _distinct_ids(caches, model_id)
    n = len(ids)
    if n == 0:
        raise FilterkitError(f"the caches hold no vectors of model {model_id}: embed the images with this "
                             "model first, or pass the --model they were embedded with")
    owner = dict(ids)
    id_of = {h: i for i, (h, _) in enumerate(ids)}
    nlist = nlist or default_nlist(n)
    if not 1 <= nlist <= n:
        raise FilterkitError(f"--nlist must be between 1 and {n} (the number of vectors)")

    # 1. Train the coarse quantizer on a uniform sample, streamed.
    wanted = set(sample_rows(n, TRAIN_POINTS_PER_LIST * nlist, seed).tolist())
    sample, dim = [], None
    for hashes, vectors in _stream(caches, model_id, owner):
        dim = vectors.shape[1]
        rows = [i for i, h in enumerate(hashes) if id_of[h] in wanted]
        sample.append(vectors[rows])
    sample = np.concatenate(sample)
    norm = Normalizer.fit(sample, normalize)
    say(f"training {nlist} lists on {len(sample)} of {n} vectors ({norm.describe()})")
    trained = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    trained.cp.seed = seed
    # FAISS warns below 39 training points per list; a collection under that gets one list, which needs none
    trained.cp.min_points_per_centroid = min(trained.cp.min_points_per_centroid, max(1, len(sample) // nlist))
    trained.train(norm(sample))
    del sample

    def normalised(only: int | None = None):
        for hashes, vectors in _stream(caches, model_id, owner, only):
            yield hashes, norm(vectors)

    # 2. One shard index per cache, written to disk, then merged into on-disk lists.
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    work = out / ".build"
    work.mkdir(exist_ok=True)
    try:
        empty = str(work / "trained.index")
        faiss.write_index(trained, empty)
        shard_files = []
        for number in range(len(caches)):
            shard = faiss.read_index(empty)
            for hashes, vectors in normalised(only=number):
                shard.add_with_ids(vectors, np.asarray([id_of[h] for h in hashes], dtype=np.int64))
            if shard.ntotal:
                shard_files.append(str(work / f"shard{number}.index"))
                faiss.write_index(shard, shard_files[-1])
            say(f"shard {number + 1}/{len(caches)}: {shard.ntotal} vectors")
            del shard
        from faiss.contrib.ondisk import merge_ondisk

        index = faiss.read_index(empty)
        with _stdout_to_stderr(quiet=on_progress is None):  # index.faiss records this path; load_index_dir looks beside it instead
            merge_ondisk(index, shard_files, str((out / "lists.ivfdata").resolve()))
        index.nprobe, recall = _tune_nprobe(index, normalised, id_of, target_recall, seed)
        norm.save(out)  # before index.faiss: an index file always has its normaliser beside it
        faiss.write_index(index, str(work / "index.faiss"))
        os.replace(work / "index.faiss", out / "index.faiss")
    except BaseException:  # leave no half-built index behind: a retry must find an empty folder
        for name in ("index.faiss", "lists.ivfdata", *NORMALIZER_FILES):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    atomic_write_text(out / "ids.txt", "".join(f"{h}\n" for h, _ in ids))
    meta = {"format": FORMAT, "model_id": model_id, "dim": dim, "vectors": n, "nlist": nlist,
            "nprobe": int(index.nprobe), "recall_at_10": recall, "normalize": norm.to_dict(),
            "caches": [str(c) for c in caches]}
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    return meta


def _tune_nprobe(index, stream: Callable, id_of: dict[str, int], target_recall: float, seed: int,
                 queries: int = 256, k: int = 10) -> tuple[int, float]:
    """Smallest power-of-two nprobe whose recall@k on sample vectors reaches ``target_recall``
    of exact search; the exact neighbours come from one more pass over the vectors."""
    n = index.ntotal
    k = min(k, n)
    picks = set(sample_rows(n, queries, seed + 1).tolist())
    q = np.concatenate([vectors[[j for j, h in enumerate(hashes) if id_of[h] in picks]]
                        for hashes, vectors in stream()])
    return smallest_nprobe(index, q, exact_top_scores(q, (vectors for _, vectors in stream()), k), target_recall)


def load_normalizer(path: str | os.PathLike, meta: dict) -> Normalizer:
    """The normaliser an index directory's vectors were indexed with, as ``meta.json`` records
    it (raw cosine for indexes built before normalisers were stored); refused when its files
    are missing, damaged or of another dimension than the index."""
    path = Path(path)
    kind = (meta.get("normalize") or {"kind": "none"}).get("kind")
    if kind == "none":
        return Normalizer("none")
    try:
        norm = Normalizer.load(path)
    except (OSError, ValueError) as e:  # missing or damaged files (json and npy raise ValueError)
        raise FilterkitError(f"{path}: meta.json says its vectors are indexed {kind}ed, but the normaliser "
                             f"cannot be read ({type(e).__name__}): rebuild the index") from None
    if norm.kind != kind or norm.mean is None or norm.mean.shape != (meta["dim"],):
        raise FilterkitError(f"{path}: the stored normaliser does not match meta.json (kind {norm.kind}, "
                             f"dimension {None if norm.mean is None else norm.mean.shape[0]}, index {meta['dim']})")
    return norm


def is_index_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` has an index directory's layout (not whether it loads)."""
    path = Path(path)
    return (path / "meta.json").is_file() and (path / "index.faiss").is_file()


def load_index_dir(path: str | os.PathLike) -> tuple[faiss.Index, list[str], dict]:
    """(index with memory-mapped lists, sha256 per id, meta) of an index directory."""
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise FilterkitError(f"not a filterkit index directory (no meta.json): {path}")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise FilterkitError(f"{meta_path}: expected \"format\": \"{FORMAT}\"")
    if not (path / "lists.ivfdata").is_file():
        raise FilterkitError(f"{path / 'lists.ivfdata'} is missing")
    try:  # lists.ivfdata is found beside index.faiss and mapped read-only
        with _stdout_to_stderr():
            index = faiss.read_index(str(path / "index.faiss"), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError as e:
        raise FilterkitError(f"cannot read the index in {path}: {str(e).strip().splitlines()[-1]}") from None
    index.nprobe = int(meta["nprobe"])
    ids = (path / "ids.txt").read_text(encoding="ascii").split()
    if len(ids) != index.ntotal:
        raise FilterkitError(f"{path}: ids.txt lists {len(ids)} ids, the index holds {index.ntotal}")
    return index, ids, meta
