"""Embedding on a Ray cluster (the optional ``ray`` extra): decode + embed run as Ray Data
``map_batches`` over an actor pool, one encoder per actor; the driver writes the vectors into
the embedding cache as they arrive, so the cache, its keys and a rerun behave exactly as in
a local run.

    filterkit embed ./photos --ray local         # a Ray instance on this machine
    filterkit embed ./photos --ray auto          # the running cluster (RAY_ADDRESS / ray start)
    filterkit embed ./photos --ray ray://head:10001

The actors rebuild the encoder from its config and safetensors bytes (nothing is pickled but
Ray's own task plumbing); image paths must be readable at the same path on every node.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .errors import FilterkitError


class _EmbedActor:
    """One encoder per Ray actor: decodes and embeds a batch of paths."""

    def __init__(self, config: dict, weights: bytes, draft_size: int | None, threads: int = 1) -> None:
        import torch
        from safetensors.torch import load as load_safetensors

        from .encoder import Encoder, ModelConfig, build_backbone

        torch.set_num_threads(threads)
        cfg = ModelConfig.from_dict(config)
        backbone = build_backbone(cfg)
        backbone.load_state_dict(load_safetensors(weights), strict=True)
        self.encoder = Encoder(backbone, cfg, device="cpu")
        self.draft_size = draft_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from .loader import _collate, _DecodeDataset

        paths = [Path(p) for p in batch["path"]]
        decoded = _collate([_DecodeDataset(paths, self.encoder.transform, self.draft_size)[i]
                            for i in range(len(paths))])
        vectors = np.zeros((len(paths), self.encoder.dim), dtype=np.float32)
        if decoded.indices:
            vectors[decoded.indices] = self.encoder.embed_batch(decoded.pixels).numpy()
        errors = np.full(len(paths), "", dtype=object)
        for i, reason in decoded.failures:
            errors[i] = reason
        return {"position": batch["position"], "vector": vectors, "error": errors}


def ray_runner(address: str = "local", actors: int | None = None):
    """A ``runner`` for ``pipeline.embed_paths`` that embeds on Ray at ``address``
    ("local" starts one on this machine, "auto" joins the running cluster)."""
    try:
        import ray
    except ImportError:
        raise FilterkitError("--ray needs the ray extra: pip install 'filterkit[ray]'") from None

    def run(paths, encoder, draft_size, batch_size, workers) -> Iterator[tuple[list[int], np.ndarray, list]]:
        if not ray.is_initialized():
            ray.init(address=None if address == "local" else address, include_dashboard=False,
                     logging_level="WARNING", log_to_driver=False)
        pool = actors or max(1, int(ray.cluster_resources().get("CPU", 1)))
        weights = encoder._weights_blob()
        ds = ray.data.from_items([{"position": i, "path": str(p)} for i, p in enumerate(paths)],
                                 override_num_blocks=max(1, min(len(paths) // max(batch_size, 1), 4 * pool)))
        ds = ds.map_batches(_EmbedActor, batch_size=batch_size, batch_format="numpy", concurrency=pool,
                            num_cpus=1, fn_constructor_kwargs={"config": encoder.config.to_dict(),
                                                               "weights": weights, "draft_size": draft_size})
        for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
            ok = [i for i, e in enumerate(out["error"]) if not e]
            positions = [int(out["position"][i]) for i in ok]
            failures = [(int(p), str(e)) for p, e in zip(out["position"], out["error"]) if e]
            yield positions, out["vector"][ok], failures

    return run
