"""Folder -> vectors: discover, hash, look up the cache, decode + embed what is missing.

    >>> with EmbeddingCache() as cache:
    ...     result = embed_folder("./photos", Encoder.load("models/x"), cache)
    >>> result.vectors.shape, len(result.skipped)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cache import EmbeddingCache
from .encoder import Encoder
from .errors import FilterkitError
from .images import IMAGE_EXTENSIONS, Skip, decoder_version, discover_images, shard_of, split_outside_links
from .loader import embed_batches
from .progress import progress_bar


@dataclass
class EmbeddedFolder:
    """The images of a folder that have a vector, and the ones skipped with their reasons."""

    paths: list[Path]
    hashes: list[str]
    vectors: np.ndarray  # [len(paths), D] float32, unit rows
    skipped: list[Skip] = field(default_factory=list)
    n_embedded: int = 0  # distinct contents embedded by this run
    n_cached: int = 0  # distinct contents found in the cache

    def summary(self) -> dict:
        return {"images": len(self.paths) + len(self.skipped), "embedded": self.n_embedded,
                "cached": self.n_cached, "skipped": [s.to_dict() for s in self.skipped]}


@contextmanager
def cache_or_default(cache: EmbeddingCache | None) -> Iterator[EmbeddingCache]:
    """``cache`` itself, or the default cache opened (and closed) around the block."""
    if cache is not None:
        yield cache
    else:
        with EmbeddingCache() as default_cache:
            yield default_cache


def embed_folder(
    root: str | os.PathLike,
    encoder: Encoder,
    cache: EmbeddingCache | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    progress: bool = True,
    follow_symlinks: bool = False,
    draft: bool = True,
    shard: tuple[int, int] | None = None,
    runner: Callable | None = None,
) -> EmbeddedFolder:
    """Embed every image under ``root`` that the cache does not already hold.

    ``cache=None`` opens (and closes) the default cache. ``draft=False`` decodes JPEGs at full
    size first (slower; for comparison only). Symlinks to files outside ``root`` are skipped
    (with the reason) unless ``follow_symlinks``, which also descends into linked folders.
    ``shard=(i, n)`` takes only the i-th of n deterministic parts of the folder (see
    ``images.shard_of``), for embedding on n machines whose caches are then merged with
    ``EmbeddingCache.merge_from``.
    """
    paths = discover_images(root, follow_symlinks=follow_symlinks)
    if not paths:
        exts = " ".join(sorted(IMAGE_EXTENSIONS))
        raise FilterkitError(f"no images found in {root} (looked for {exts})")
    refused: list[Skip] = []
    if not follow_symlinks:
        paths, refused = split_outside_links(paths, root)
    if shard is not None:
        index, count = shard
        paths = [p for p in paths if shard_of(p, Path(root), count) == index]
        refused = [s for s in refused if shard_of(s.path, Path(root), count) == index]
    if not paths:  # more shards than images, or only refused links
        return EmbeddedFolder([], [], np.empty((0, encoder.dim), np.float32), skipped=refused)
    with cache_or_default(cache) as store:
        result = embed_paths(paths, encoder, store, batch_size, workers, progress, draft, runner)
    result.skipped = sorted(result.skipped + refused, key=lambda s: s.path)
    return result


def local_batches(paths: list[Path], encoder: Encoder, draft_size: int | None, batch_size: int,
                  workers: int | None) -> Iterator[tuple[list[int], np.ndarray, list, list]]:
    """(positions, vectors, failures, transient failures) per batch: decode in DataLoader
    workers, forward here. Failures are remembered in the cache; transient ones (e.g. a file a
    remote worker could not read) are reported but retried next time."""
    for batch in embed_batches(paths, encoder.transform, draft_size, encoder.embed_batch, batch_size, workers):
        # Every local failure is remembered, even an unreadable file (f.unreadable): it was read
        # for its hash moments ago, so only a race gets one here.
        yield batch.indices, batch.vectors, [(f.index, f.reason) for f in batch.failures], []


def embed_paths(
    paths: list[Path],
    encoder: Encoder,
    cache: EmbeddingCache,
    batch_size: int = 64,
    workers: int | None = None,
    progress: bool = True,
    draft: bool = True,
    runner: Callable | None = None,
) -> EmbeddedFolder:
    """Like :func:`embed_folder`, for an explicit list of image paths.

    ``runner`` computes the vectors of what the cache lacks (signature of ``local_batches``,
    the default); ``raydata.ray_runner`` runs it on a Ray cluster instead.
    """
    model_id = encoder.model_id
    with progress_bar("hashing", len(paths), progress) as advance:
        hashes, read_errors = cache.content_hashes(paths, on_hashed=advance)
    decoder = decoder_version()
    todo = cache.missing(model_id, [h for h in hashes if h is not None])
    # Contents that failed to decode before (with this decoder) are reported, not retried.
    decode_errors = cache.failures(decoder, todo)
    todo = [h for h in todo if h not in decode_errors]
    n_cached = len({h for h in hashes if h is not None}) - len(todo) - len(decode_errors)
    first_path = {}
    for p, h in zip(paths, hashes):
        if h is not None:
            first_path.setdefault(h, p)
    n_embedded = 0
    if todo:
        todo_paths = [first_path[h] for h in todo]
        draft_size = encoder.config.img_size if draft else None
        batches = (runner or local_batches)(todo_paths, encoder, draft_size, batch_size, workers)
        with progress_bar("embedding", len(todo), progress) as advance:
            for positions, vectors, failures, transient in batches:
                if positions:
                    cache.put(model_id, [todo[i] for i in positions], vectors)
                    n_embedded += len(positions)
                if failures:
                    new_errors = {todo[i]: reason for i, reason in failures}
                    cache.put_failures(decoder, new_errors)
                    decode_errors.update(new_errors)
                decode_errors.update({todo[i]: reason for i, reason in transient})
                advance(len(positions) + len(failures) + len(transient))
    skipped, good = [], []
    for i, (p, h) in enumerate(zip(paths, hashes)):
        if h is None:
            skipped.append(Skip(p, read_errors[i]))
        elif h in decode_errors:
            skipped.append(Skip(p, decode_errors[h]))
        else:
            good.append(i)
    good_hashes = [hashes[i] for i in good]
    vectors = cache.get(model_id, good_hashes) if good else np.empty((0, encoder.dim), np.float32)
    return EmbeddedFolder(
        paths=[paths[i] for i in good],
        hashes=good_hashes,
        vectors=vectors,
        skipped=skipped,
        n_embedded=n_embedded,
        n_cached=n_cached,
    )
