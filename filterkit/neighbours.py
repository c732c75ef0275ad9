"""Near-neighbour search: query images against a folder, or against an on-disk index directory.

    >>> result = search_folder(["q.jpg"], "./photos", Encoder.load())
    >>> [(h.path, h.score) for h in result.queries[0].hits]
    >>> search_index(["q.jpg"], "./big-index", Encoder.load())    # from `filterkit index build`

The index directory holds content hashes, not paths: hits are named through the embedding
caches that fed it (and the default cache), else as ``sha256:<hash>``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import FilterkitError
from .images import Skip

# Centring (from 64 vectors: normalize.AUTO_CENTER_MIN) raised search precision@10 by 1-2 points
# over raw cosine on Imagenette and CIFAR-10; whitening lowered it (benchmarks/collection_quality.py).
DEFAULT_NORMALIZE = "auto"


@dataclass(frozen=True)
class Hit:
    path: Path | None  # None: an indexed content that no known cache names
    score: float  # cosine similarity to the query
    sha256: str | None = None

    def to_dict(self) -> dict:
        out = {"path": str(self.path) if self.path is not None else f"sha256:{self.sha256}",
               "score": round(float(self.score), 6)}
        if self.sha256 is not None:
            out["sha256"] = self.sha256
        return out


@dataclass(frozen=True)
class QueryHits:
    query: Path
    hits: list[Hit]

    def to_dict(self) -> dict:
        return {"query": str(self.query), "results": [h.to_dict() for h in self.hits]}


@dataclass
class Neighbours:
    queries: list[QueryHits]
    skipped: list[Skip] = field(default_factory=list)  # images of the searched folder
    normalize: dict = field(default_factory=lambda: {"kind": "none"})  # Normalizer.to_dict() of the scores

    def to_dict(self) -> dict:
        return {"queries": [q.to_dict() for q in self.queries], "normalize": self.normalize,
                "skipped": [s.to_dict() for s in self.skipped]}


def _embed_queries(queries: Sequence[str | os.PathLike], encoder, batch_size: int) -> tuple[list[Path], np.ndarray]:
    paths = [Path(q) for q in queries]
    for q in paths:
        if q.is_dir():
            raise FilterkitError(f"query {q} is a folder: a query must be an image file (search in a folder with --in)")
        if not q.is_file():
            raise FilterkitError(f"query image not found: {q}")
    return paths, encoder.embed(paths, batch_size=batch_size, workers=0)


def search_folder(queries: Sequence[str | os.PathLike], folder: str | os.PathLike, encoder, k: int = 10,
                  cache=None, batch_size: int = 64, workers: int | None = None, progress: bool = False,
                  follow_symlinks: bool = False, normalize: str = DEFAULT_NORMALIZE) -> Neighbours:
    """The ``k`` images of ``folder`` nearest to each query. ``cache``: an open
    ``EmbeddingCache`` (None: the default cache), beside which the folder's index is kept.
    ``normalize``: the normaliser fitted on the folder's vectors (``normalize.Normalizer``) and
    applied to them and to the queries; scores are cosines in that space."""
    from .index import cached_index, content_key, search
    from .normalize import Normalizer
    from .pipeline import cache_or_default, embed_folder

    query_paths, query_vectors = _embed_queries(queries, encoder, batch_size)
    with cache_or_default(cache) as store:
        found = embed_folder(folder, encoder, store, batch_size=batch_size, workers=workers, progress=progress,
                             follow_symlinks=follow_symlinks)
        if not found.paths:
            raise FilterkitError(f"none of the images in {folder} could be decoded")
        norm = Normalizer.fit(found.vectors, normalize)
        # The normalised vectors follow from the contents and the kind: both name the index.
        key = content_key(encoder.model_id, found.hashes) + f":{norm.kind}"
        index = cached_index(norm(found.vectors), key, store.index_dir)
    result = search(index, norm(query_vectors), k)
    return Neighbours([QueryHits(q, [Hit(found.paths[j], float(s)) for s, j in zip(scores, ids) if j >= 0])
                       for q, scores, ids in zip(query_paths, result.scores, result.ids)], found.skipped,
                      norm.to_dict())


def search_index(queries: Sequence[str | os.PathLike], index_dir: str | os.PathLike, encoder, k: int = 10,
                 caches: Sequence[str | os.PathLike] = (), batch_size: int = 64) -> Neighbours:
    """The ``k`` indexed contents nearest to each query, in an index directory built by
    ``ondisk.build_index_dir``; ``caches``: cache files to name the hits from before the
    ones that built the index."""
    from .index import search
    from .ondisk import load_index_dir, load_normalizer

    index, sha256_of, meta = load_index_dir(index_dir)
    if meta["model_id"] != encoder.model_id:
        raise FilterkitError(f"{index_dir} holds vectors of model {meta['model_id']}, not of "
                             f"{encoder.model_id}: pass the --model it was built with")
    norm = load_normalizer(index_dir, meta)
    query_paths, query_vectors = _embed_queries(queries, encoder, batch_size)
    found = search(index, norm(query_vectors), k)
    names = _names_of({sha256_of[j] for j in found.ids.ravel() if j >= 0}, [*caches, *meta["caches"]])
    return Neighbours([
        QueryHits(q, [Hit(names.get(sha256_of[j]), float(s), sha256_of[j]) for s, j in zip(scores, ids) if j >= 0])
        for q, scores, ids in zip(query_paths, found.scores, found.ids)], normalize=norm.to_dict())


def _names_of(hashes: set[str], caches: list) -> dict[str, Path]:
    """A path for each content hash, from the first of ``caches`` (then the default cache) that
    has seen a file with that content."""
    from .cache import EmbeddingCache
    from .fsutil import default_cache_path

    names: dict[str, Path] = {}
    for source in [*(Path(c) for c in caches), default_cache_path()]:
        if source.is_file() and len(names) < len(hashes):
            with EmbeddingCache(source) as store:
                for h, paths in store.paths_of(sorted(hashes - set(names))).items():
                    names.setdefault(h, paths[0])
    return names

