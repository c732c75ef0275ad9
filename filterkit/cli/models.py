"""Commands on model directories, on-disk indexes and caches: model, index, cache."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import presets
from ..errors import FilterkitError
from .common import (
    CacheOpt,
    JsonOpt,
    ModelOpt,
    PrecisionOpt,
    QuietOpt,
    WorkersOpt,
    cache_app,
    echo_err,
    index_app,
    load_encoder,
    model_app,
)


@model_app.command("init")
def model_init(
    out: Annotated[Path, typer.Option("--out", help="Model directory to create.")],
    preset: Annotated[str, typer.Option("--preset", help=presets.preset_help())] = presets.RANDOM_INIT_PRESET,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing model directory.")] = False,
) -> None:
    """Write a randomly initialised model directory (a baseline, and handy in tests)."""
    from ..encoder import Encoder
    from ..modeldir import check_model_dir_target, check_no_training_run

    check_no_training_run(out)
    check_model_dir_target(out, force)
    Encoder.random(preset, seed=seed).save(out, overwrite=force)
    typer.echo(f"wrote randomly initialised {preset} to {out}")


@index_app.command("build")
def index_build(
    caches: Annotated[list[Path], typer.Option("--cache", help="Embedding cache(s) to index, one per shard (repeat).")],
    out: Annotated[Path, typer.Option("--out", help="New index directory.")],
    nlist: Annotated[Optional[int], typer.Option("--nlist", min=1, help="IVF lists.", show_default="4 sqrt(N)")] = None,
    target_recall: Annotated[float, typer.Option("--target-recall", min=0.5, max=1.0, help="recall@10 that nprobe is tuned for.")] = 0.99,
    normalize: Annotated[str, typer.Option("--normalize", help="none | center | whiten | auto (centre), fitted on the training sample and stored with the index; searches apply it to their queries.")] = "auto",
    model: ModelOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Train an IVF index once and fill it cache by cache into on-disk inverted lists."""
    from ..ondisk import build_index_dir

    model_id = load_encoder(model, "cpu").model_id
    meta = build_index_dir(caches, model_id, out, nlist=nlist, target_recall=target_recall,
                           on_progress=None if quiet else echo_err if as_json else typer.echo, normalize=normalize)
    if as_json:  # what meta.json holds, and where
        typer.echo(json.dumps({"index": str(out), **meta}, indent=2))
        return
    typer.echo(f"{out}: {meta['vectors']} vectors, {meta['nlist']} lists, nprobe {meta['nprobe']} "
               f"(recall@10 {meta['recall_at_10']:.3f} on a sample); search it with `filterkit search Q --index {out}`")


@cache_app.command("merge")
def cache_merge(
    sources: Annotated[list[Path], typer.Argument(help="Cache files to merge (e.g. one per `embed --shard`).")],
    out: Annotated[Path, typer.Option("--out", help="Cache file to merge into (created if missing).")],
    quiet: QuietOpt = False,
) -> None:
    """Merge embedding caches: every vector, path hash and decode failure; nothing is overwritten."""
    from ..cache import EmbeddingCache, check_mergeable

    for source in sources:  # every source checked before --out is created or changed
        check_mergeable(source, out)
    with EmbeddingCache(out) as target:
        for source in sources:
            added = target.merge_from(source)
            if not quiet:
                typer.echo(f"{source}: +{added['embeddings']} vectors, +{added['files']} paths, "
                           f"+{added['failures']} failures")
        typer.echo(f"{out}: {target.count()} vectors")


@model_app.command("info")
def model_info(
    model_dir: Annotated[Optional[Path], typer.Argument(help="Model directory.", show_default="the shipped model")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Print a model directory's configuration."""
    from ..encoder import Encoder
    from ..modeldir import default_model_path

    model_dir = model_dir or default_model_path()
    encoder = Encoder.load(model_dir, device="cpu")
    info = {"path": str(model_dir), **encoder.describe()}
    try:
        reference = encoder.reference()
        info["reference"] = reference.to_dict() if reference is not None else None
    except FilterkitError as e:  # shown, not fatal: the model itself loads
        info["reference"] = f"unusable: {e}"
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        typer.echo(f"{key:>15}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")


@model_app.command("calibrate")
def model_calibrate(
    model_dir: Annotated[Path, typer.Argument(help="Model directory to calibrate (config.json is updated).")],
    images: Annotated[Path, typer.Option("--images", help="Folder of real images the model was not trained on.")],
    target_precision: Annotated[float, typer.Option("--target-precision", min=0.5, max=1.0)] = 0.99,
    max_images: Annotated[int, typer.Option("--max-images", min=10)] = 300,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    precision: PrecisionOpt = "auto",
) -> None:
    """Measure the dedup threshold on synthetic near-duplicates and store it in config.json."""
    from ..dedup import calibrate_model_dir

    result = calibrate_model_dir(model_dir, images, target_precision, max_images, seed, precision=precision)
    typer.echo(f"dedup threshold {result.threshold:.4f}: precision {result.precision:.3f}, recall "
               f"{result.recall:.3f} on {result.images} images + one synthetic near-duplicate each; "
               f"written to {model_dir / 'config.json'}")


@model_app.command("reference")
def model_reference(
    model_dir: Annotated[Path, typer.Argument(help="Model directory to add reference.safetensors to.")],
    images: Annotated[list[Path], typer.Option("--images", help="Folder of generic photos (repeatable), e.g. the model's training data; not one kind only.")],
    max_images: Annotated[int, typer.Option("--max-images", min=256, help="Images drawn at random, the same share of every folder.")] = 4096,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    cache: CacheOpt = None,
    workers: WorkersOpt = None,
    quiet: QuietOpt = False,
    precision: PrecisionOpt = "auto",
) -> None:
    """Store the model's mean embedding over generic photos (what `outliers` centres on)."""
    from ..cache import EmbeddingCache
    from ..encoder import Encoder
    from ..reference import fit_reference, write_reference

    encoder = Encoder.load(model_dir, device="cpu", precision=precision)
    if not os.access(model_dir, os.W_OK):  # before minutes of embedding
        raise FilterkitError(f"cannot write into {model_dir}: permission denied")
    with EmbeddingCache(cache) as store:
        norm = fit_reference(encoder, images, max_images, seed, store, workers, not quiet)
    path = write_reference(model_dir, norm, encoder.model_id, encoder.dim)
    typer.echo(f"reference mean of {norm.fitted_on} images ({norm.reference}) written to {path}")


@model_app.command("import-moco")
def model_import(
    checkpoint: Annotated[Path, typer.Argument(help="Official MoCo v3 checkpoint (.pth.tar) or a timm ViT state dict (.safetensors/.pth).")],
    out: Annotated[Path, typer.Option("--out", help="Model directory to create.")],
    num_heads: Annotated[Optional[int], typer.Option("--num-heads", min=1, help="Attention heads (not readable from the weights).", show_default="MoCo's for its arch, else timm's for the width")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing model directory.")] = False,
) -> None:
    """Convert a MoCo v3 checkpoint or a plain timm ViT into a filterkit model directory."""
    from ..interop import import_checkpoint

    encoder = import_checkpoint(checkpoint, out, num_heads, overwrite=force)
    c = encoder.config
    typer.echo(f"imported {c.arch} (width {c.embed_dim}, depth {c.depth}, heads {c.num_heads}, patch "
               f"{c.patch_size}, {c.img_size} px) from {checkpoint} into {out}")


@model_app.command("export-timm")
def model_export(
    model_dir: Annotated[Path, typer.Argument(help="Model directory.")],
    out: Annotated[Path, typer.Option("--out", help="File to write: .safetensors, or .pth for a torch state dict.")],
) -> None:
    """Write the backbone as a state dict that loads into plain timm (strict)."""
    from ..interop import export_timm

    cfg = export_timm(model_dir, out)
    typer.echo(f"wrote {out}; load it with timm.create_model({cfg.timm_name!r}, pretrained=False, "
               f"**{cfg.timm_kwargs}).load_state_dict(...)")
