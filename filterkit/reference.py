"""A model's reference statistics: the mean of its embedding over generic photos.

The collection normalisers (normalize.py) are fitted on the images at hand. For outliers that is
the wrong centre: in a folder of one kind the collection's mean *is* that kind, and removing it
throws away how far an image lies from it. A model directory can therefore carry a mean fitted
once on a few thousand generic images (its own training data for the shipped model): removing
it removes the common component every image shares (the anisotropy of a small
self-supervised encoder, cosines of 0.8-0.9 between unrelated photos) and keeps the kind of a
folder. Measured on 10 photos of other classes planted among 300 of one class
(``benchmarks/outlier_quality.py``), it lifted the k-NN outlier score's AUROC from 0.77 to 0.94
on Imagenette and from 0.83 to 0.93 on CIFAR-10, and a mean fitted on the *other* set only still
gave 0.93 and 0.91. A whitening fitted on the same images scored about as well where the
reference held photos like the collection's, and far worse where it did not (0.55 and 0.71):
only the mean travels. It did not help the keep-like filter, whose collection centring already
removes the common component.

Stored as ``reference.safetensors`` beside the weights (the mean [D], read without pickle); its
metadata names the model id it was computed for, so a reference left beside retrained weights
is refused instead of being applied to another embedding.

    >>> norm = fit_reference(Encoder.load("models/m"), ["photos/"], max_images=4096)
    >>> write_reference("models/m", norm, encoder.model_id)
    >>> read_reference("models/m", encoder.model_id)(vectors)     # centred unit rows
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import FilterkitError
from .fsutil import atomic_write_bytes
from .normalize import Normalizer

REFERENCE_FILE = "reference.safetensors"
DEFAULT_MAX_IMAGES = 4096
# A reference is meant to describe photos in general: a handful of images would describe themselves.
MIN_IMAGES = 256


def fit_reference(encoder, folders: Sequence[str | os.PathLike], max_images: int = DEFAULT_MAX_IMAGES,
                  seed: int = 0, cache=None, workers: int | None = None, progress: bool = False) -> Normalizer:
    """Embed up to ``max_images`` images drawn at random from ``folders`` (as many from each
    folder, so that one large source does not make the reference its own) and take their mean; ``reference`` names the folders (their last two path components: no path of this
    machine goes into a model directory) and counts."""
    from .images import discover_images
    from .pipeline import cache_or_default, embed_paths

    if max_images < MIN_IMAGES:
        raise FilterkitError(f"a reference needs at least {MIN_IMAGES} images; --max-images is {max_images}")
    found = [(Path(f), discover_images(f)) for f in folders]
    total = sum(len(p) for _, p in found)
    if total < MIN_IMAGES:
        raise FilterkitError(f"a reference needs at least {MIN_IMAGES} images; found {total} in "
                             f"{', '.join(str(f) for f, _ in found)}")
    rng = np.random.default_rng(seed)
    chosen, parts, left = [], [], max_images
    for j, (folder, paths) in enumerate(sorted(found, key=lambda f: len(f[1]))):  # small folders first
        quota = left // (len(found) - j)  # what a smaller folder leaves goes to the larger ones
        take = np.sort(rng.choice(len(paths), min(quota, len(paths)), replace=False))
        chosen += [paths[i] for i in take]
        left -= len(take)
        parts.append(f"{folder.resolve().name} ({len(take)} of {len(paths)})")
    with cache_or_default(cache) as store:
        embedded = embed_paths(chosen, encoder, store, workers=workers, progress=progress)
    if len(embedded.paths) < MIN_IMAGES:
        raise FilterkitError(f"only {len(embedded.paths)} of the {len(chosen)} reference images decoded; "
                             f"a reference needs at least {MIN_IMAGES}")
    norm = Normalizer.fit(embedded.vectors, "center")
    return Normalizer(norm.kind, norm.mean, fitted_on=norm.fitted_on, reference=" + ".join(parts))


def write_reference(model_dir: str | os.PathLike, norm: Normalizer, model_id: str, dim: int | None = None) -> Path:
    """Write ``model_dir/reference.safetensors`` atomically (replacing an older one); ``dim``:
    the model's embedding width, which the mean must have."""
    import torch
    from safetensors.torch import save

    if norm.kind != "center" or norm.mean is None:
        raise FilterkitError("a model's reference is a mean (Normalizer.fit(..., 'center'))")
    if dim is not None and norm.mean.shape != (dim,):
        raise FilterkitError(f"the reference mean has shape {list(norm.mean.shape)}, the model's embedding {dim}")
    meta = {"model_id": model_id, "fitted_on": str(norm.fitted_on), "reference": norm.reference or ""}
    blob = save({"mean": torch.from_numpy(np.ascontiguousarray(norm.mean, dtype=np.float32))}, metadata=meta)
    path = Path(model_dir) / REFERENCE_FILE
    try:
        atomic_write_bytes(path, blob)
    except OSError as e:
        raise FilterkitError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def reference_model_id(model_dir: str | os.PathLike) -> str | None:
    """The model id a directory's reference file was computed for; None when there is none or
    it cannot be read (``read_reference`` says why)."""
    from safetensors import safe_open

    path = Path(model_dir) / REFERENCE_FILE
    try:
        with safe_open(str(path), framework="numpy") as f:
            return (f.metadata() or {}).get("model_id")
    except Exception:  # absent or malformed: nothing to compare
        return None


def read_reference(model_dir: str | os.PathLike | None, model_id: str, dim: int | None = None) -> Normalizer | None:
    """The reference centring of ``model_dir``, None when it has none; a file that is malformed,
    was computed for another model id or whose mean is not ``dim`` wide is an error that says
    how to renew it."""
    from safetensors import SafetensorError, safe_open

    if model_dir is None:
        return None
    path = Path(model_dir) / REFERENCE_FILE
    if not path.is_file():
        return None
    renew = f"`filterkit model reference {model_dir} --images DIR` computes it again"
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            mean = f.get_tensor("mean")
    except (SafetensorError, OSError, KeyError, ValueError, TypeError, json.JSONDecodeError) as e:
        raise FilterkitError(f"malformed {path}: {e}; {renew}") from None
    if meta.get("model_id") != model_id:
        raise FilterkitError(f"{path} was computed for model {meta.get('model_id')!r}, not for these weights "
                             f"({model_id}); {renew}")
    if mean.ndim != 1 or (dim is not None and len(mean) != dim) or not np.isfinite(mean).all():
        raise FilterkitError(f"malformed {path}: the mean is not a finite vector of the model's {dim or 'any'} "
                             f"dimensions (shape {list(mean.shape)}); {renew}")
    try:
        fitted_on = int(meta.get("fitted_on", 0))
    except ValueError as e:
        raise FilterkitError(f"malformed {path}: {e}; {renew}") from None
    return Normalizer("center", mean.astype(np.float32), fitted_on=fitted_on,
                      reference=meta.get("reference") or "unnamed images")
