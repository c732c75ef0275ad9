"""The ``filterkit`` command line: parses, calls the library, prints. No logic of its own.

Heavy imports (torch, timm, faiss) happen inside the commands so ``filterkit --help`` is fast.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated, Optional

import click
import typer

from .errors import FilterkitError

app = typer.Typer(
    name="filterkit",
    help="Turn an unlabelled image collection into a trustworthy image filter.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
model_app = typer.Typer(help="Create and inspect model directories.", no_args_is_help=True)
app.add_typer(model_app, name="model")
cache_app = typer.Typer(help="Manage embedding caches.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")

FollowOpt = Annotated[bool, typer.Option(
    "--follow-symlinks", help="Read symlinks that point outside the folder, and descend into linked folders.")]
ModelOpt = Annotated[Optional[Path], typer.Option(
    "--model", "-m", help="Model directory.", show_default="the shipped model, or $FILTERKIT_MODEL")]
CacheOpt = Annotated[Optional[Path], typer.Option(
    "--cache", help="Embedding cache file.", show_default="$FILTERKIT_CACHE or ~/.cache/filterkit/embeddings.sqlite")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")]
WorkersOpt = Annotated[Optional[int], typer.Option(
    "--workers", min=0, help="Decode processes.", show_default="cores - 1; 0 = decode in-process")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | mps.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Show what --action would do; change nothing.")]
ReportOpt = Annotated[Optional[Path], typer.Option(
    "--report", help="Write an HTML report here, with .csv and .json beside it.")]


def _echo_err(message: str) -> None:
    typer.echo(message, err=True)


def _load_encoder(model: Optional[Path], device: str = "auto"):
    from .encoder import Encoder

    return Encoder.load(model, device=device)  # None: the shipped default model


def _print_skips(skipped, quiet: bool) -> None:
    if quiet or not skipped:
        return
    _echo_err(f"skipped {len(skipped)} file(s):")
    for s in skipped[:20]:
        _echo_err(f"  {s.path}: {s.reason}")
    if len(skipped) > 20:
        _echo_err(f"  ... and {len(skipped) - 20} more (use --json for all)")


@app.command()
def embed(
    folder: Annotated[Path, typer.Argument(help="Folder of images (searched recursively).")],
    shard: Annotated[Optional[str], typer.Option("--shard", help="I/N: embed only the I-th of N deterministic parts (merge the caches with `filterkit cache merge`).")] = None,
    ray_address: Annotated[Optional[str], typer.Option("--ray", help="Embed on Ray: 'local', 'auto' (running cluster) or an address; needs the ray extra.")] = None,
    ray_actors: Annotated[Optional[int], typer.Option("--ray-actors", min=1, help="Encoder actors.", show_default="the cluster's CPUs")] = None,
    follow_symlinks: FollowOpt = False,
    model: ModelOpt = None,
    cache: CacheOpt = None,
    batch_size: BatchOpt = 64,
    workers: WorkersOpt = None,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Embed every image in FOLDER into the cache (only what is new or changed)."""
    from .cache import EmbeddingCache
    from .images import parse_shard
    from .pipeline import embed_folder

    shard_spec = parse_shard(shard) if shard is not None else None
    runner = None
    if ray_address is not None:
        from .raydata import ray_runner

        runner = ray_runner(ray_address, ray_actors)
    encoder = _load_encoder(model, device)
    with EmbeddingCache(cache) as store:
        result = embed_folder(folder, encoder, store, batch_size=batch_size, workers=workers,
                              progress=not quiet, shard=shard_spec, runner=runner, follow_symlinks=follow_symlinks)
        cache_path = store.path
    if as_json:
        typer.echo(json.dumps({
            "images": len(result.paths) + len(result.skipped),
            "embedded": result.n_embedded,
            "cached": result.n_cached,
            "skipped": [{"path": str(s.path), "reason": s.reason} for s in result.skipped],
            "model_id": encoder.model_id,
            "cache": str(cache_path),
        }, indent=2))
        return
    _print_skips(result.skipped, quiet)
    typer.echo(
        f"{len(result.paths)} images have vectors: {result.n_embedded} embedded now, "
        f"{result.n_cached} from the cache, {len(result.skipped)} skipped (cache: {cache_path})"
    )


@app.command()
def search(
    queries: Annotated[list[Path], typer.Argument(help="Query image file(s).")],
    folder: Annotated[Optional[Path], typer.Option("--in", help="Folder to search in.")] = None,
    index_path: Annotated[Optional[Path], typer.Option("--index", help="Search an index directory from `filterkit index build` instead of --in.")] = None,
    follow_symlinks: FollowOpt = False,
    k: Annotated[int, typer.Option("-k", min=1, help="Neighbours per query.")] = 10,
    model: ModelOpt = None,
    cache: CacheOpt = None,
    batch_size: BatchOpt = 64,
    workers: WorkersOpt = None,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Find the K images in --in (or --index) most similar to each query image (cosine)."""
    if (folder is None) == (index_path is None):
        raise FilterkitError("give exactly one of --in FOLDER and --index DIR")
    for q in queries:
        if not q.is_file():
            raise FilterkitError(f"query image not found: {q}")
    encoder = _load_encoder(model, device)
    query_vectors = encoder.embed(queries, batch_size=batch_size, workers=0)
    if index_path is not None:
        answers = _search_index_dir(index_path, encoder, query_vectors, queries, k, cache)
        skipped = []
    else:
        answers, skipped = _search_folder(folder, encoder, query_vectors, queries, k, cache, batch_size,
                                          workers, quiet, follow_symlinks)
    if as_json:
        typer.echo(json.dumps(answers, indent=2))
        return
    _print_skips(skipped, quiet)
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for answer in answers:
        table = Table(title=f"nearest to {answer['query']}", title_justify="left")
        table.add_column("#", justify="right")
        table.add_column("score", justify="right")
        table.add_column("path")
        for rank, r in enumerate(answer["results"], 1):
            table.add_row(str(rank), f"{r['score']:.4f}", r["path"])
        console.print(table)


def _search_index_dir(index_path, encoder, query_vectors, queries, k, cache):
    from .cache import EmbeddingCache
    from .index import search as knn_search
    from .ondisk import load_index_dir

    index, sha256_of, meta = load_index_dir(index_path)
    if meta["model_id"] != encoder.model_id:
        raise FilterkitError(f"{index_path} holds vectors of model {meta['model_id']}, not of "
                             f"{encoder.model_id}: pass the --model it was built with")
    found = knn_search(index, query_vectors, k)
    hashes = [sha256_of[j] for j in found.ids.ravel() if j >= 0]
    paths: dict = {}
    from .fsutil import default_cache_path

    for source in [*([cache] if cache else []), *(Path(c) for c in meta["caches"]), default_cache_path()]:
        if source.is_file():
            with EmbeddingCache(source) as store:
                for h, ps in store.paths_of(hashes).items():
                    paths.setdefault(h, ps[0])
    return [
        {"query": str(q), "results": [{"path": str(paths.get(sha256_of[j], "sha256:" + sha256_of[j])),
                                       "sha256": sha256_of[j], "score": round(float(s), 6)}
                                      for s, j in zip(scores, ids) if j >= 0]}
        for q, scores, ids in zip(queries, found.scores, found.ids)
    ]


def _search_folder(folder, encoder, query_vectors, queries, k, cache, batch_size, workers, quiet, follow_symlinks):
    from .cache import EmbeddingCache
    from .index import cached_index
    from .index import search as knn_search
    from .pipeline import embed_folder

    with EmbeddingCache(cache) as store:
        result = embed_folder(folder, encoder, store, batch_size=batch_size, workers=workers,
                              progress=not quiet, follow_symlinks=follow_symlinks)
        index_dir = store.index_dir
    if not result.paths:
        raise FilterkitError(f"none of the images in {folder} could be decoded")
    index = cached_index(result.vectors, f"{encoder.model_id}:{','.join(result.hashes)}", index_dir)
    found = knn_search(index, query_vectors, k)
    answers = [
        {"query": str(q), "results": [{"path": str(result.paths[j]), "score": round(float(s), 6)}
                                      for s, j in zip(scores, ids) if j >= 0]}
        for q, scores, ids in zip(queries, found.scores, found.ids)
    ]
    return answers, result.skipped


@app.command("filter")
def filter_command(
    incoming: Annotated[Path, typer.Argument(help="Folder of images to sort.")],
    keep_like: Annotated[Path, typer.Option("--keep-like", help="Folder of exemplars to keep images like.")],
    reject_like: Annotated[Optional[Path], typer.Option("--reject-like", help="Folder of exemplars to reject images like.")] = None,
    threshold: Annotated[str, typer.Option("--threshold", help="'auto' (calibrated on the exemplars) or a cosine similarity.")] = "auto",
    prototypes: Annotated[Optional[int], typer.Option("--prototypes", min=1, help="Score against K k-means prototypes of the exemplars.")] = None,
    target_recall: Annotated[float, typer.Option("--target-recall", min=0.01, max=1.0, help="Recall that --threshold auto aims for without --reject-like.")] = 0.95,
    action: Annotated[str, typer.Option("--action", help="report (touch nothing) | copy | link | move, into --out/kept and --out/rejected.")] = "report",
    out: Annotated[Optional[Path], typer.Option("--out", help="Destination folder for --action copy/link/move.")] = None,
    dry_run: DryRunOpt = False,
    report: ReportOpt = None,
    follow_symlinks: FollowOpt = False,
    model: ModelOpt = None,
    cache: CacheOpt = None,
    batch_size: BatchOpt = 64,
    workers: WorkersOpt = None,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Keep or reject each image in INCOMING by its similarity to the exemplars, with reasons."""
    value = _threshold_arg(threshold)
    threshold_value = "auto" if value is None else value
    from .actions import ACTIONS

    _check_action(action, out, ACTIONS)
    from .cache import EmbeddingCache
    from .filtering import ImageFilter

    encoder = _load_encoder(model, device)
    with EmbeddingCache(cache) as store:
        image_filter = ImageFilter(encoder, store, threshold_value, prototypes, target_recall=target_recall,
                                   batch_size=batch_size, workers=workers, progress=not quiet,
                                   follow_symlinks=follow_symlinks)
        image_filter.keep_like(keep_like)
        if reject_like is not None:
            image_filter.reject_like(reject_like)
        result = image_filter.run(incoming)
    if report is not None:  # before any move, while every image is where its path says
        from .report import write_filter_report

        write_filter_report(result, report)
    plan, done = _file_actions(result.categories(), incoming, out, action, dry_run)
    t = result.threshold
    summary = {**result.counts(), "threshold": round(t.value, 6), "threshold_source": t.source,
               "est_recall": t.est_recall, "est_precision": t.est_precision,
               "exemplars": result.exemplars, "negatives": result.negatives, "prototypes": result.prototypes,
               "skipped_exemplars": [{"path": str(s.path), "reason": s.reason} for s in result.skipped_exemplars]}
    if as_json:
        typer.echo(json.dumps({"images": [d.to_dict() for d in result.decisions], "summary": summary,
                               "actions": [p.to_dict() for p in plan], "dry_run": dry_run}, indent=2))
        return
    _print_skips(result.skipped_exemplars, quiet)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"filter {incoming}", title_justify="left")
    for column in ("decision", "score", "path", "reason"):
        table.add_column(column, overflow="fold")
    shown = sorted(result.decisions, key=lambda d: (d.decision != "keep", -(d.score or -9)))
    for d in shown[:50]:
        colour = {"keep": "green", "reject": "red", "error": "yellow"}[d.decision]
        table.add_row(f"[{colour}]{d.decision}[/]", "" if d.score is None else f"{d.score:.3f}", str(d.path), d.reason)
    Console().print(table)
    if len(shown) > 50:
        typer.echo(f"... {len(shown) - 50} more rows (use --json for all)")
    estimate = ""
    if t.est_recall is not None:
        estimate = f" (calibrated on the exemplars: est. recall {t.est_recall:.2f}"
        estimate += f", est. precision {t.est_precision:.2f} at equal prevalence)" if t.est_precision is not None else ")"
    typer.echo(f"kept {summary['keep']}, rejected {summary['reject']}, errors {summary['error']}; "
               f"threshold {t.value:.3f} {t.source}{estimate}")
    _print_actions(plan, done, dry_run)
    _print_report(report)


def _print_report(report: Optional[Path]) -> None:
    if report is not None:
        typer.echo(f"report: {report} (+ {report.with_suffix('.csv').name}, {report.with_suffix('.json').name})")


def _file_actions(items, root: Path, out: Optional[Path], action: str, dry_run: bool):
    """(plan, done) of a --action; nothing happens for report or a dry run."""
    if action == "report":
        return [], []
    from .actions import apply_actions, plan_actions

    plan = plan_actions(items, root, out, action)
    return plan, [] if dry_run else apply_actions(plan, out)


def _print_actions(plan, done, dry_run: bool) -> None:
    if not plan:
        return
    if dry_run:
        typer.echo(f"dry run: would {plan[0].action} {len(plan)} file(s):")
        for p in plan[:50]:
            typer.echo(f"  {p.source} -> {p.destination}")
        if len(plan) > 50:
            typer.echo(f"  ... and {len(plan) - 50} more (use --json for all)")
    else:
        typer.echo(f"{plan[0].action}: {len(done)} of {len(plan)} file(s) done")


def _threshold_arg(value: str) -> Optional[float]:
    """'auto' -> None (the caller's calibrated default), else a float."""
    if value == "auto":
        return None
    try:
        return float(value)
    except ValueError:
        raise FilterkitError(f"--threshold must be 'auto' or a number, got {value!r}") from None


def _check_action(action: str, out: Optional[Path], allowed: tuple[str, ...]) -> None:
    if action not in allowed:
        raise FilterkitError(f"--action must be one of {', '.join(allowed)}, got {action!r}")
    if action != "report" and out is None:
        raise FilterkitError(f"--action {action} needs --out DIR")


@app.command()
def dedup(
    folder: Annotated[Path, typer.Argument(help="Folder of images (searched recursively).")],
    threshold: Annotated[str, typer.Option("--threshold", help="'auto' (the model's calibrated value) or a cosine similarity.")] = "auto",
    action: Annotated[str, typer.Option("--action", help="report (touch nothing) | move duplicates into --out/duplicates.")] = "report",
    out: Annotated[Optional[Path], typer.Option("--out", help="Destination folder for --action move.")] = None,
    dry_run: DryRunOpt = False,
    report: ReportOpt = None,
    follow_symlinks: FollowOpt = False,
    model: ModelOpt = None,
    cache: CacheOpt = None,
    batch_size: BatchOpt = 64,
    workers: WorkersOpt = None,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Find exact and near duplicates; each group keeps its largest-resolution image."""
    value = _threshold_arg(threshold)
    _check_action(action, out, ("report", "move"))
    from .cache import EmbeddingCache
    from .dedup import find_duplicates

    encoder = _load_encoder(model, device)
    with EmbeddingCache(cache) as store:
        groups, skipped = find_duplicates(folder, encoder, value, store, batch_size, workers, not quiet,
                                          follow_symlinks)
    if report is not None:
        from .report import write_dedup_report

        write_dedup_report(groups, report)
    items = [(d.path, "duplicates") for g in groups for d in g.duplicates]
    plan, done = _file_actions(items, folder, out, action, dry_run)
    if as_json:
        typer.echo(json.dumps({"groups": [g.to_dict() for g in groups],
                               "skipped": [{"path": str(s.path), "reason": s.reason} for s in skipped],
                               "actions": [p.to_dict() for p in plan], "dry_run": dry_run}, indent=2))
        return
    _print_skips(skipped, quiet)
    for g in groups[:50]:
        typer.echo(f"keep {g.keep}")
        for d in g.duplicates:
            typer.echo(f"  {'exact' if d.exact else f'{d.score:.3f}'}  {d.path}")
    if len(groups) > 50:
        typer.echo(f"... {len(groups) - 50} more groups (use --json for all)")
    n_dups = sum(len(g.duplicates) for g in groups)
    typer.echo(f"{len(groups)} group(s), {n_dups} duplicate(s)")
    _print_actions(plan, done, dry_run)
    _print_report(report)


@app.command()
def cluster(
    folder: Annotated[Path, typer.Argument(help="Folder of images (searched recursively).")],
    k: Annotated[int, typer.Option("--k", min=1, help="Number of clusters.")],
    keep_fraction: Annotated[Optional[float], typer.Option("--keep-fraction", help="Select this fraction of the images by prototype distance.")] = None,
    keep: Annotated[str, typer.Option("--keep", help="hard (far from their prototype) | easy (near it).")] = "hard",
    action: Annotated[str, typer.Option("--action", help="report | copy | link | move, into --out/selected and --out/pruned.")] = "report",
    out: Annotated[Optional[Path], typer.Option("--out", help="Destination folder for --action.")] = None,
    dry_run: DryRunOpt = False,
    seed: Annotated[int, typer.Option("--seed", help="k-means seed.")] = 0,
    follow_symlinks: FollowOpt = False,
    model: ModelOpt = None,
    cache: CacheOpt = None,
    batch_size: BatchOpt = 64,
    workers: WorkersOpt = None,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Spherical k-means: each image's cluster and distance to its prototype; optional pruning."""
    from .actions import ACTIONS

    _check_action(action, out, ACTIONS)
    if action != "report" and keep_fraction is None:
        raise FilterkitError("--action needs --keep-fraction (which images are selected)")
    from .cache import EmbeddingCache
    from .cluster import cluster_vectors, select_fraction
    from .pipeline import embed_folder

    encoder = _load_encoder(model, device)
    with EmbeddingCache(cache) as store:
        found = embed_folder(folder, encoder, store, batch_size, workers, not quiet, follow_symlinks=follow_symlinks)
    if len(found.paths) < k:
        raise FilterkitError(f"--k {k} is more than the {len(found.paths)} images that could be embedded")
    result = cluster_vectors(found.vectors, k, seed=seed)
    selected = select_fraction(result.distance, keep_fraction, keep) if keep_fraction is not None else None
    items = ([(p, "selected" if sel else "pruned") for p, sel in zip(found.paths, selected)]
             if selected is not None else [])
    plan, done = _file_actions(items, folder, out, action, dry_run)
    rows = [{"path": str(p), "cluster": int(c), "distance": round(float(d), 6),
             **({"selected": bool(selected[i])} if selected is not None else {})}
            for i, (p, c, d) in enumerate(zip(found.paths, result.assignment, result.distance))]
    sizes = result.sizes()
    if as_json:
        typer.echo(json.dumps({"clusters": [{"id": i, "size": int(n)} for i, n in enumerate(sizes)], "images": rows,
                               "skipped": [{"path": str(s.path), "reason": s.reason} for s in found.skipped],
                               "actions": [p.to_dict() for p in plan], "dry_run": dry_run}, indent=2))
        return
    _print_skips(found.skipped, quiet)
    examples: dict[int, list[str]] = {}
    for r in rows:
        if len(examples.setdefault(r["cluster"], [])) < 3:
            examples[r["cluster"]].append(Path(r["path"]).name)
    for i, n in enumerate(sizes):
        typer.echo(f"cluster {i}: {n} image(s), e.g. {', '.join(examples.get(i, []))}")
    if selected is not None:
        typer.echo(f"selected {int(selected.sum())} of {len(rows)} ({keep}est by prototype distance)")
    _print_actions(plan, done, dry_run)


@app.command()
def pretrain(
    folder: Annotated[Path, typer.Argument(help="Folder of images (any depth, no labels needed).")],
    out: Annotated[Path, typer.Option("--out", help="Model directory to write.")],
    preset: Annotated[Optional[str], typer.Option("--preset", help="Architecture preset; its recipe fills unset options.", show_default="vit-tiny-4-32, or the --init-from model's")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", min=1, help="Passes over FOLDER.", show_default="the preset's recipe")] = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", min=1, help="Cap on optimiser steps (sets the schedules' length).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=2, help="Global batch (split across DDP ranks).")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak LR.", show_default="the recipe's: 1.5e-4 x batch / 256; on a CPU 1e-3 x batch / 256 for vit-mini and vit-nano, 5e-4 x batch / 256 for vit-mini-conv")] = None,
    weight_decay: Annotated[Optional[float], typer.Option("--weight-decay", help="AdamW weight decay.", show_default="0.1")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", help="InfoNCE temperature.", show_default="0.2")] = None,
    momentum: Annotated[Optional[float], typer.Option("--momentum", help="Initial EMA momentum m0.", show_default="0.99")] = None,
    warmup_epochs: Annotated[Optional[float], typer.Option("--warmup-epochs", help="Linear LR warmup before the half-cosine.", show_default="the preset's recipe")] = None,
    depth: Annotated[Optional[int], typer.Option("--depth", min=1, help="Override the preset's number of blocks.")] = None,
    min_crop_scale: Annotated[Optional[float], typer.Option("--min-crop-scale", min=0.01, max=1.0, help="Smallest random-crop area.", show_default="the preset's recipe, else 0.08")] = None,
    no_predictor: Annotated[bool, typer.Option("--no-predictor", help="Drop the prediction MLP.")] = False,
    freeze_patch_embed: Annotated[bool, typer.Option("--freeze-patch-embed", help="Keep the random patch projection fixed.")] = False,
    data_in_memory: Annotated[bool, typer.Option("--data-in-memory", help="Decode every image once into memory (uint8, 2x the model's side up to 64 px, 8/7 above) and augment whole batches on the training device: for GPUs, where per-image CPU decoding is the bottleneck.")] = False,
    device: DeviceOpt = "auto",
    precision: Annotated[str, typer.Option("--precision", help="auto | fp32 | bf16 | fp16.")] = "auto",
    workers: WorkersOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/training/checkpoint.pt.")] = False,
    init_from: Annotated[Optional[str], typer.Option("--init-from", help="Start from this model directory instead of random weights (\"default\": the shipped model); a training folder also gives the heads. New optimiser and schedules.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seeds weights, augmentation and data order.", show_default="0")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option("--checkpoint-every", min=1, help="Steps between checkpoints.", show_default="500")] = None,
    stop_at_step: Annotated[Optional[int], typer.Option("--stop-at-step", min=1, help="Stop after this step as an interruption would: checkpoint written, --resume continues the same schedule.")] = None,
    knn_train: Annotated[Optional[Path], typer.Option("--knn-train", help="Labelled folder for the online kNN monitor.")] = None,
    knn_test: Annotated[Optional[Path], typer.Option("--knn-test", help="Labelled folder for the online kNN monitor.")] = None,
    knn_max_per_class: Annotated[Optional[int], typer.Option("--knn-max-per-class", min=1, help="Monitor on the first N images of each class.")] = None,
    follow_symlinks: FollowOpt = False,
    json_log: Annotated[Optional[Path], typer.Option("--json-log", help="Per-step JSON lines.", show_default="OUT/training/log.jsonl")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Pretrain a ViT on FOLDER with MoCo v3 and write a model directory to --out."""
    if (knn_train is None) != (knn_test is None):
        raise FilterkitError("--knn-train and --knn-test go together")
    from .encoder import PRESETS
    from .train import TrainingInterrupted, TrainOptions
    from .train import pretrain as run_pretrain

    if preset is not None and preset not in PRESETS:
        raise FilterkitError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    # None: not given (the recipe's or the checkpoint's value). A flag left out is not given either.
    options = TrainOptions(preset=preset, init_from=init_from, epochs=epochs, max_steps=max_steps,
                           batch_size=batch_size, lr=lr, weight_decay=weight_decay, temperature=temperature,
                           momentum=momentum, warmup_epochs=warmup_epochs, depth=depth,
                           min_crop_scale=min_crop_scale, seed=seed, checkpoint_every=checkpoint_every,
                           predictor=False if no_predictor else None, freeze_patch_embed=freeze_patch_embed or None,
                           data_in_memory=data_in_memory or None)
    try:
        result = run_pretrain(folder, out, options, resume=resume, device=device, precision=precision,
                              workers=workers, knn_train=knn_train, knn_test=knn_test,
                              knn_max_per_class=knn_max_per_class, json_log=json_log,
                              follow_symlinks=follow_symlinks, stop_at_step=stop_at_step,
                              progress=not quiet)
    except TrainingInterrupted as e:  # a plain KeyboardInterrupt came before any checkpoint was saved
        _echo_err(f"interrupted: checkpoint saved at step {e.step}; continue with "
                  f"`filterkit pretrain {folder} --out {out} --resume`")
        raise
    _print_skips(result.skipped, quiet)
    knn = f", online kNN {result.knn_top1[-1][1]:.3f}" if result.knn_top1 else ""
    loss = f"final loss {result.final_loss:.4f}" if math.isfinite(result.final_loss) else "no step run in this call"
    typer.echo(f"trained {result.steps} steps ({loss}{knn}); model written to {out}")
    if result.steps < result.total_steps:
        typer.echo(f"stopped at step {result.steps} of {result.total_steps} (--stop-at-step); continue with "
                   f"`filterkit pretrain {folder} --out {out} --resume`")


@app.command("eval")
def eval_command(
    train: Annotated[Path, typer.Option("--train", help="Labelled folder: one sub-folder per class.")],
    test: Annotated[Path, typer.Option("--test", help="Labelled folder with the same classes.")],
    model: ModelOpt = None,
    k: Annotated[int, typer.Option("-k", min=1, help="Neighbours.")] = 20,
    temperature: Annotated[float, typer.Option("--temperature", help="Vote weight exp(sim / T).")] = 0.07,
    max_per_class: Annotated[Optional[int], typer.Option("--max-per-class", min=1, help="Use the first N images of each class.")] = None,
    batch_size: BatchOpt = 128,
    workers: WorkersOpt = None,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Weighted kNN accuracy of --model, with the random-init and raw-pixel baselines."""
    from .evaluate import evaluate

    encoder = _load_encoder(model, device)
    report = evaluate(encoder, train, test, k=k, temperature=temperature, max_per_class=max_per_class,
                      batch_size=batch_size, workers=workers, progress=not quiet)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    typer.echo(f"weighted kNN (k={k}, T={temperature}) on {report.n_test} test images, "
               f"{report.n_train} train, {len(report.classes)} classes:")
    typer.echo(f"  {'model':>12}: {report.knn_top1:.4f}")
    for name, value in report.baselines.items():
        typer.echo(f"  {name:>12}: {value:.4f}")


@model_app.command("init")
def model_init(
    out: Annotated[Path, typer.Option("--out", help="Model directory to create.")],
    preset: Annotated[str, typer.Option("--preset", help="vit-mini-8-32 | vit-mini-8-64 | vit-mini-16-112 | vit-nano-4-32 | vit-mini-conv-8-32 | vit-tiny-4-32 | vit-tiny-8-64 | vit-tiny-16-224 | vit-small-16-224.")] = "vit-tiny-16-224",
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing model directory.")] = False,
) -> None:
    """Write a randomly initialised model directory (a baseline, and handy in tests)."""
    from .encoder import PRESETS, Encoder

    if preset not in PRESETS:
        raise FilterkitError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    Encoder.random(preset, seed=seed).save(out, overwrite=force)
    typer.echo(f"wrote randomly initialised {preset} to {out}")


index_app = typer.Typer(help="Build indexes for collections too large for memory.", no_args_is_help=True)
app.add_typer(index_app, name="index")


@index_app.command("build")
def index_build(
    caches: Annotated[list[Path], typer.Option("--cache", help="Embedding cache(s) to index, one per shard (repeat).")],
    out: Annotated[Path, typer.Option("--out", help="New index directory.")],
    nlist: Annotated[Optional[int], typer.Option("--nlist", min=1, help="IVF lists.", show_default="4 sqrt(N)")] = None,
    target_recall: Annotated[float, typer.Option("--target-recall", min=0.5, max=1.0, help="recall@10 that nprobe is tuned for.")] = 0.99,
    model: ModelOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Train an IVF index once and fill it cache by cache into on-disk inverted lists."""
    from .ondisk import build_index_dir

    model_id = _load_encoder(model, "cpu").model_id
    meta = build_index_dir(caches, model_id, out, nlist=nlist, target_recall=target_recall,
                           on_progress=None if quiet else typer.echo)
    typer.echo(f"{out}: {meta['vectors']} vectors, {meta['nlist']} lists, nprobe {meta['nprobe']} "
               f"(recall@10 {meta['recall_at_10']:.3f} on a sample); search it with `filterkit search Q --index {out}`")


@cache_app.command("merge")
def cache_merge(
    sources: Annotated[list[Path], typer.Argument(help="Cache files to merge (e.g. one per `embed --shard`).")],
    out: Annotated[Path, typer.Option("--out", help="Cache file to merge into (created if missing).")],
) -> None:
    """Merge embedding caches: every vector, path hash and decode failure; nothing is overwritten."""
    from .cache import EmbeddingCache

    with EmbeddingCache(out) as target:
        for source in sources:
            added = target.merge_from(source)
            typer.echo(f"{source}: +{added['embeddings']} vectors, +{added['files']} paths, "
                       f"+{added['failures']} failures")
        typer.echo(f"{out}: {target.count()} vectors")


@model_app.command("info")
def model_info(
    model_dir: Annotated[Optional[Path], typer.Argument(help="Model directory.", show_default="the shipped model")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Print a model directory's configuration."""
    from .encoder import Encoder, default_model_path

    model_dir = model_dir or default_model_path()
    encoder = Encoder.load(model_dir, device="cpu")
    info = {
        "path": str(model_dir),
        "model_id": encoder.model_id,
        "embedding_dim": encoder.dim,
        "architecture": encoder.config.to_dict(),
        "timm": {"model_name": encoder.config.timm_name, "kwargs": encoder.config.timm_kwargs},
        "parameters": sum(p.numel() for p in encoder.backbone.parameters()),
        **encoder.meta,
    }
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
) -> None:
    """Measure the dedup threshold on synthetic near-duplicates and store it in config.json."""
    import numpy as np

    from .dedup import calibrate_dedup
    from .encoder import Encoder, update_model_config
    from .images import discover_images

    encoder = Encoder.load(model_dir)
    paths = discover_images(images)
    order = np.random.default_rng(seed).permutation(len(paths))[:max_images] if paths else []
    result = calibrate_dedup(encoder, [paths[i] for i in order], target_precision, max_images, seed)
    thresholds = dict(encoder.meta.get("thresholds") or {}, dedup=result.threshold,
                      dedup_calibration=result.to_dict())
    update_model_config(model_dir, thresholds=thresholds)
    typer.echo(f"dedup threshold {result.threshold:.4f}: precision {result.precision:.3f}, recall "
               f"{result.recall:.3f} on {result.images} images + one synthetic near-duplicate each; "
               f"written to {model_dir / 'config.json'}")


@model_app.command("import-moco")
def model_import(
    checkpoint: Annotated[Path, typer.Argument(help="Official MoCo v3 checkpoint (.pth.tar) or a timm ViT state dict (.safetensors/.pth).")],
    out: Annotated[Path, typer.Option("--out", help="Model directory to create.")],
    num_heads: Annotated[Optional[int], typer.Option("--num-heads", min=1, help="Attention heads (not readable from the weights).", show_default="MoCo's for its arch, else timm's for the width")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing model directory.")] = False,
) -> None:
    """Convert a MoCo v3 checkpoint or a plain timm ViT into a filterkit model directory."""
    from .interop import import_checkpoint

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
    from .interop import export_timm

    cfg = export_timm(model_dir, out)
    typer.echo(f"wrote {out}; load it with timm.create_model({cfg.timm_name!r}, pretrained=False, "
               f"**{cfg.timm_kwargs}).load_state_dict(...)")


def main(argv: Optional[list[str]] = None) -> int:
    """Run the CLI; user errors become one line on stderr and a non-zero exit code."""
    try:
        app(args=argv, prog_name="filterkit", standalone_mode=False)
    except FilterkitError as e:
        _echo_err(f"error: {e}")
        return 1
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Abort:
        _echo_err("aborted")
        return 130
    except KeyboardInterrupt:
        _echo_err("interrupted")
        return 130
    return 0


def run() -> None:
    sys.exit(main())
