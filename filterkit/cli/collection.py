"""Commands over image collections: embed, search, filter, dedup, cluster."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from ..errors import FilterkitError
from .common import (
    BatchOpt,
    CacheOpt,
    DeviceOpt,
    DryRunOpt,
    FollowOpt,
    JsonOpt,
    MapOpt,
    ModelOpt,
    PrecisionOpt,
    QuietOpt,
    ReportOpt,
    WorkersOpt,
    app,
    check_outputs,
    load_encoder,
    print_actions,
    print_report,
    print_skips,
    review_band_arg,
    threshold_arg,
)


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
    precision: PrecisionOpt = "auto",
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Embed every image in FOLDER into the cache (only what is new or changed)."""
    from ..cache import EmbeddingCache
    from ..images import parse_shard
    from ..pipeline import embed_folder

    shard_spec = parse_shard(shard) if shard is not None else None
    runner = None
    if ray_address is not None:
        from ..raydata import ray_runner

        runner = ray_runner(ray_address, ray_actors)
    encoder = load_encoder(model, device, precision)
    with EmbeddingCache(cache) as store:
        result = embed_folder(folder, encoder, store, batch_size=batch_size, workers=workers,
                              progress=not quiet, shard=shard_spec, runner=runner, follow_symlinks=follow_symlinks)
        cache_path = store.path
    if as_json:
        typer.echo(json.dumps({**result.summary(), "model_id": encoder.model_id, "cache": str(cache_path)}, indent=2))
        return
    print_skips(result.skipped, quiet)
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
    normalize: Annotated[str, typer.Option("--normalize", help="Similarity: none (raw cosine) | center | whiten, fitted on the searched folder; auto centres 64 images and more. With --index, the index's own.")] = "auto",
    model: ModelOpt = None,
    cache: CacheOpt = None,
    batch_size: BatchOpt = 64,
    workers: WorkersOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Find the K images in --in (or --index) most similar to each query image (cosine)."""
    if (folder is None) == (index_path is None):
        raise FilterkitError("give exactly one of --in FOLDER and --index DIR")
    if index_path is not None and normalize != "auto":
        raise FilterkitError("--normalize applies to --in: an index is searched in the space it was built in "
                             "(filterkit index build --normalize)")
    from ..cache import EmbeddingCache
    from ..neighbours import search_folder, search_index

    encoder = load_encoder(model, device, precision)
    if index_path is not None:
        result = search_index(queries, index_path, encoder, k, caches=[cache] if cache else [], batch_size=batch_size)
    else:
        with EmbeddingCache(cache) as store:
            result = search_folder(queries, folder, encoder, k, store, batch_size, workers, not quiet, follow_symlinks,
                                   normalize)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    print_skips(result.skipped, quiet)
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for answer in result.queries:
        table = Table(title=f"nearest to {answer.query}", title_justify="left")
        for column, justify in (("#", "right"), ("score", "right"), ("path", "left")):
            table.add_column(column, justify=justify)
        for rank, hit in enumerate(answer.hits, 1):
            table.add_row(str(rank), f"{hit.score:.4f}", hit.to_dict()["path"])
        console.print(table)


@app.command("filter")
def filter_command(
    incoming: Annotated[Path, typer.Argument(help="Folder of images to sort.")],
    keep_like: Annotated[Path, typer.Option("--keep-like", help="Folder of exemplars to keep images like.")],
    reject_like: Annotated[Optional[Path], typer.Option("--reject-like", help="Folder of exemplars to reject images like.")] = None,
    threshold: Annotated[str, typer.Option("--threshold", help="'auto' (calibrated on the exemplars) or a cosine similarity.")] = "auto",
    prototypes: Annotated[Optional[int], typer.Option("--prototypes", min=1, help="Score against K k-means prototypes of the exemplars.")] = None,
    target_recall: Annotated[Optional[float], typer.Option("--target-recall", min=0.01, max=1.0, help="Recall that --threshold auto aims for (without --reject-like only).", show_default="0.95")] = None,
    review_band: Annotated[str, typer.Option("--review-band", help="Decide 'review' when the score is within this much of the threshold; auto: the automatic threshold's bootstrap spread over resamples of the exemplars (none with a fixed --threshold); 0: no review.")] = "auto",
    normalize: Annotated[str, typer.Option("--normalize", help="Similarity: none (raw cosine) | center | whiten, fitted on the exemplars and incoming images together; auto centres 64 images and more. A fixed --threshold is a cosine in that space.")] = "auto",
    action: Annotated[str, typer.Option("--action", help="report (touch nothing) | copy | link | move, into --out/kept, --out/review and --out/rejected.")] = "report",
    out: Annotated[Optional[Path], typer.Option("--out", help="Destination folder for --action copy/link/move.")] = None,
    dry_run: DryRunOpt = False,
    report: ReportOpt = None,
    map_png: MapOpt = None,
    follow_symlinks: FollowOpt = False,
    model: ModelOpt = None,
    cache: CacheOpt = None,
    batch_size: BatchOpt = 64,
    workers: WorkersOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Keep, review or reject each image in INCOMING by its similarity to the exemplars, with reasons."""
    threshold_value = threshold_arg(threshold)
    band_value = review_band_arg(review_band)
    from ..actions import check_action, run_actions
    from ..cache import EmbeddingCache
    from ..filtering import DEFAULT_TARGET_RECALL, ImageFilter
    from ..fsutil import check_disjoint
    from ..modeldir import default_model_path

    check_action(action, out, dry_run=dry_run)
    check_outputs(report, map_png, incoming, keep_like, reject_like)
    check_disjoint(("INCOMING", incoming), ("--keep-like", keep_like), ("--reject-like", reject_like),
                   ("--out", out))
    if target_recall is not None and threshold_value != "auto":
        raise FilterkitError("--target-recall is what --threshold auto aims for; a fixed --threshold is used as "
                             "given: drop one of the two")
    if target_recall is not None and reject_like is not None:
        raise FilterkitError("--target-recall sets the threshold without --reject-like; with reject-like exemplars "
                             "--threshold auto takes the best F1 on the two exemplar sets: drop one of the two")
    target_recall = DEFAULT_TARGET_RECALL if target_recall is None else target_recall
    encoder = load_encoder(model, device, precision)
    with EmbeddingCache(cache) as store:
        image_filter = ImageFilter(encoder, store, threshold_value, prototypes, target_recall=target_recall,
                                   batch_size=batch_size, workers=workers, progress=not quiet,
                                   follow_symlinks=follow_symlinks, normalize=normalize, review_band=band_value)
        image_filter.keep_like(keep_like)
        if reject_like is not None:
            image_filter.reject_like(reject_like)
        result = image_filter.run(incoming)
        embedding = _map_vectors(incoming, encoder, store, follow_symlinks, report, map_png)
        run = {"incoming": _absolute(incoming), "keep_like": _absolute(keep_like), "reject_like": _absolute(reject_like),
               "model": _absolute(model) if model is not None else str(default_model_path()),
               "model_id": encoder.model_id, "cache": _absolute(store.path), "cwd": str(Path.cwd()),
               "threshold": threshold_value, "prototypes": prototypes, "target_recall": target_recall,
               "review_band": band_value, "normalize": normalize, "follow_symlinks": follow_symlinks,
               "scoring": result.scoring}
    if report is not None or map_png is not None:  # before any move, while every image is where its path says
        from ..report import decision_label, write_filter_report, write_map

        if report is not None:
            write_filter_report(result, report, embedding=embedding, run=run, map_png=map_png)
        else:
            write_map(*embedding, decision_label(result), map_png)
    plan, done = run_actions(result.categories(), incoming, out, action, dry_run)
    if as_json:
        typer.echo(json.dumps({**result.to_dict(), "actions": [p.to_dict() for p in plan], "dry_run": dry_run},
                              indent=2))
        return
    print_skips(result.skipped_exemplars, quiet)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"filter {incoming}", title_justify="left")
    for column in ("decision", "score", "path", "reason"):
        table.add_column(column, overflow="fold")
    order = {"keep": 0, "review": 1, "reject": 2, "error": 3}
    shown = sorted(result.decisions, key=lambda d: (order[d.decision], -(d.score or -9)))
    for d in shown[:50]:
        colour = {"keep": "green", "review": "blue", "reject": "red", "error": "yellow"}[d.decision]
        table.add_row(f"[{colour}]{d.decision}[/]", "" if d.score is None else f"{d.score:.3f}", str(d.path), d.reason)
    Console().print(table)
    if len(shown) > 50:
        typer.echo(f"... {len(shown) - 50} more rows (use --json for all)")
    typer.echo(result.summary_line())
    print_actions(plan, done, dry_run, out)
    print_report(report)
    print_map(map_png)


def _absolute(path) -> str | None:
    return None if path is None else str(Path(path).absolute())


def _map_vectors(folder: Path, encoder, store, follow_symlinks: bool, *outputs):
    """(paths, vectors) of the folder's images for a map, read back from the cache the command
    just filled; None when no output asks for a map."""
    if all(o is None for o in outputs):
        return None
    from ..pipeline import embed_folder

    found = embed_folder(folder, encoder, store, progress=False, workers=0, follow_symlinks=follow_symlinks)
    return found.paths, found.vectors


def print_map(map_png) -> None:
    if map_png is not None:
        typer.echo(f"map: {map_png}")


@app.command()
def dedup(
    folder: Annotated[Path, typer.Argument(help="Folder of images (searched recursively).")],
    against: Annotated[Optional[Path], typer.Option("--against", help="A reference folder: list the images of FOLDER that duplicate one of its images (train/test leakage, re-uploads, a blocklist); pairs inside one folder are not reported, and --action acts on FOLDER only.")] = None,
    threshold: Annotated[str, typer.Option("--threshold", help="'auto' (calibrated on this folder, or with --against on both: synthetic copies of its own images against their nearest other images) or a pair score in [-1.5, 1.5] ((cosine + thumbnail correlation - the pair's background) / 2), whose precision is estimated the same way.")] = "auto",
    target_precision: Annotated[Optional[float], typer.Option("--target-precision", min=0.01, max=1.0, help="Estimated pair precision that --threshold auto aims for and --action move requires. Default: 0.90 to list groups, 0.99 with --action move.")] = None,
    rotations: Annotated[bool, typer.Option("--rotations/--no-rotations", help="Also look for flipped and 90-degree-rotated copies among all images' thumbnails (8 more nearest-neighbour searches of every image's 6x6 colour thumbnail; reads every image).")] = True,
    action: Annotated[str, typer.Option("--action", help="report (touch nothing) | move duplicates into --out/duplicates (refused below --target-precision) | copy (with --against only).")] = "report",
    out: Annotated[Optional[Path], typer.Option("--out", help="Destination folder for --action move or copy.")] = None,
    dry_run: DryRunOpt = False,
    report: ReportOpt = None,
    map_png: MapOpt = None,
    follow_symlinks: FollowOpt = False,
    model: ModelOpt = None,
    cache: CacheOpt = None,
    batch_size: BatchOpt = 64,
    workers: WorkersOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Find exact and near duplicates, each candidate pair verified on its images; each group
    keeps its largest-resolution image and reports its weakest link."""
    threshold_value = threshold_arg(threshold)
    from ..actions import check_action, run_actions
    from ..cache import EmbeddingCache
    from ..dedup import check_move, find_duplicates

    check_action(action, out, ("report", "copy", "move") if against is not None else ("report", "move"), dry_run)
    check_outputs(report, map_png, folder, against)
    if threshold_value != "auto":
        from ..dedup import _check_pair_score

        _check_pair_score(threshold_value)
    if target_precision is None:
        from ..dedup import LIST_TARGET_PRECISION, MOVE_TARGET_PRECISION

        target_precision = MOVE_TARGET_PRECISION if action == "move" else LIST_TARGET_PRECISION
    encoder = load_encoder(model, device, precision)
    if against is not None:
        return _dedup_against(folder, against, encoder, threshold_value, target_precision, rotations, action, out,
                              dry_run, report, map_png, follow_symlinks, cache, batch_size, workers, quiet, as_json)
    with EmbeddingCache(cache) as store:
        result = find_duplicates(folder, encoder, threshold_value, store, batch_size, workers, not quiet,
                                 follow_symlinks, target_precision=target_precision, rotations=rotations)
        embedding = _map_vectors(folder, encoder, store, follow_symlinks, report, map_png)
    if action == "move":  # before anything moves, dry run included: the same refusal either way
        check_move(result, target_precision)
    if report is not None or map_png is not None:
        from ..report import group_label, write_dedup_report, write_map

        if report is not None:
            write_dedup_report(result, report, embedding=embedding, map_png=map_png)
        else:
            write_map(*embedding, group_label(result), map_png)
    items = [(d.path, "duplicates") for g in result.groups for d in g.duplicates]
    plan, done = run_actions(items, folder, out, action, dry_run)
    if as_json:
        typer.echo(json.dumps({**result.to_dict(), "actions": [p.to_dict() for p in plan], "dry_run": dry_run},
                              indent=2))
        return
    print_skips(result.skipped, quiet)
    for g in result.groups[:50]:
        weakest = f"  (weakest link {g.weakest.score:.3f})" if g.weakest is not None else ""
        typer.echo(f"keep {g.keep}{weakest}")
        for d in g.duplicates:
            typer.echo(f"  {'exact' if d.exact else f'{d.score:.3f}'}  {d.path}")
    if len(result.groups) > 50:
        typer.echo(f"... {len(result.groups) - 50} more groups (use --json for all)")
    typer.echo(result.summary_line())
    print_actions(plan, done, dry_run, out)
    print_report(report)
    print_map(map_png)


def _dedup_against(folder, against, encoder, threshold, target_precision, rotations, action, out, dry_run, report,
                   map_png, follow_symlinks, cache, batch_size, workers, quiet, as_json) -> None:
    """dedup FOLDER --against REFERENCE: the images of FOLDER that duplicate a reference image."""
    from ..actions import run_actions
    from ..cache import EmbeddingCache
    from ..dedup import check_move
    from ..leakage import find_cross_duplicates

    with EmbeddingCache(cache) as store:
        result = find_cross_duplicates(folder, against, encoder, threshold, store, batch_size, workers, not quiet,
                                       follow_symlinks, target_precision=target_precision, rotations=rotations)
        new_map = _map_vectors(folder, encoder, store, follow_symlinks, report, map_png)
        ref_map = _map_vectors(against, encoder, store, follow_symlinks, report, map_png)
    if action == "move":  # before anything moves, dry run included: the same refusal either way
        check_move(result, target_precision)
    if new_map is not None:
        from ..report import cross_label, write_cross_report, write_map

        if report is not None:
            write_cross_report(result, report, new_map, ref_map, map_png=map_png)
        else:
            write_map([*ref_map[0], *new_map[0]], np.concatenate([ref_map[1], new_map[1]]),
                      cross_label(result, ref_map[0]), map_png)
    plan, done = run_actions([(d.path, "duplicates") for d in result.duplicates], folder, out, action, dry_run)
    if as_json:
        typer.echo(json.dumps({**result.to_dict(), "actions": [p.to_dict() for p in plan], "dry_run": dry_run},
                              indent=2))
        return
    print_skips(result.skipped, quiet)
    for d in result.duplicates[:50]:
        typer.echo(f"  {'exact' if d.exact else f'{d.score:.3f}'}  {d.path}  duplicates  {d.duplicate_of}")
    if len(result.duplicates) > 50:
        typer.echo(f"... {len(result.duplicates) - 50} more (use --json for all)")
    typer.echo(result.summary_line())
    print_actions(plan, done, dry_run, out)
    print_report(report)
    print_map(map_png)


@app.command()
def cluster(
    folder: Annotated[Path, typer.Argument(help="Folder of images (searched recursively).")],
    k: Annotated[int, typer.Option("--k", min=1, help="Number of clusters.")],
    keep_fraction: Annotated[Optional[float], typer.Option("--keep-fraction", help="Select this fraction of the images by prototype distance.")] = None,
    keep: Annotated[Optional[str], typer.Option("--keep", help="With --keep-fraction: hard (far from their prototype) | easy (near it).", show_default="hard")] = None,
    action: Annotated[str, typer.Option("--action", help="report | copy | link | move, into --out/selected and --out/pruned.")] = "report",
    out: Annotated[Optional[Path], typer.Option("--out", help="Destination folder for --action.")] = None,
    dry_run: DryRunOpt = False,
    seed: Annotated[int, typer.Option("--seed", help="k-means seed.")] = 0,
    normalize: Annotated[str, typer.Option("--normalize", help="none (raw cosine) | center | whiten | auto, fitted on the folder before clustering.")] = "none",
    report: ReportOpt = None,
    map_png: MapOpt = None,
    follow_symlinks: FollowOpt = False,
    model: ModelOpt = None,
    cache: CacheOpt = None,
    batch_size: BatchOpt = 64,
    workers: WorkersOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Spherical k-means: each image's cluster and distance to its prototype; optional pruning."""
    from ..actions import check_action, run_actions
    from ..cache import EmbeddingCache
    from ..cluster import cluster_folder

    check_action(action, out, dry_run=dry_run)
    check_outputs(report, map_png, folder)
    if action != "report" and keep_fraction is None:
        raise FilterkitError("--action needs --keep-fraction (which images are selected)")
    if keep is not None and keep_fraction is None:
        raise FilterkitError(f"--keep {keep} goes with --keep-fraction (the share of images to select)")
    keep = keep or "hard"
    encoder = load_encoder(model, device, precision)
    with EmbeddingCache(cache) as store:
        result = cluster_folder(folder, encoder, k, keep_fraction, keep, seed, store, batch_size, workers,
                                not quiet, follow_symlinks, normalize)
        embedding = _map_vectors(folder, encoder, store, follow_symlinks, report, map_png)
    if embedding is not None:  # before any move; the map in the space that was clustered
        from ..normalize import Normalizer
        from ..report import cluster_label, write_cluster_report, write_map

        by_path = dict(zip(map(str, embedding[0]), embedding[1]))
        vectors = Normalizer.fit(embedding[1], normalize)(np.stack([by_path[str(p)] for p in result.paths]))
        if report is not None:
            write_cluster_report(result, report, vectors, map_png=map_png)
        else:
            write_map(result.paths, vectors, cluster_label(result), map_png)
    plan, done = run_actions(result.categories(), folder, out, action, dry_run)
    if as_json:
        typer.echo(json.dumps({**result.to_dict(), "actions": [p.to_dict() for p in plan], "dry_run": dry_run},
                              indent=2))
        return
    print_skips(result.skipped, quiet)
    examples = result.examples(3)
    for i, n in enumerate(result.clustering.sizes()):
        typer.echo(f"cluster {i}: {n} image(s), e.g. {', '.join(p.name for p in examples.get(i, []))}")
    if result.selected is not None:
        typer.echo(f"selected {int(result.selected.sum())} of {len(result.paths)} "
                   f"({keep}est by prototype distance)")
    print_actions(plan, done, dry_run, out)
    print_report(report)
    print_map(map_png)


@app.command()
def outliers(
    folder: Annotated[Path, typer.Argument(help="Folder of images (searched recursively).")],
    top: Annotated[int, typer.Option("--top", min=1, help="How many of the least typical images to list (and act on).")] = 10,
    k: Annotated[int, typer.Option("--k", min=1, help="Neighbours: the score is the mean cosine distance to the K nearest other images.")] = 10,
    normalize: Annotated[str, typer.Option("--normalize", help="Similarity: reference (centred on the model's mean over generic photos; measured best for outliers) | none (raw cosine) | center | whiten (fitted on the folder) | auto (reference when the model has one, else none).")] = "auto",
    action: Annotated[str, typer.Option("--action", help="report | copy | link | move the top images into --out/outliers.")] = "report",
    out: Annotated[Optional[Path], typer.Option("--out", help="Destination folder for --action.")] = None,
    dry_run: DryRunOpt = False,
    report: ReportOpt = None,
    map_png: MapOpt = None,
    follow_symlinks: FollowOpt = False,
    model: ModelOpt = None,
    cache: CacheOpt = None,
    batch_size: BatchOpt = 64,
    workers: WorkersOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """The images least like the rest: mean cosine distance to their K nearest neighbours, each
    with its nearest neighbour."""
    from ..actions import check_action, run_actions
    from ..cache import EmbeddingCache
    from ..outliers import find_outliers

    check_action(action, out, dry_run=dry_run)
    check_outputs(report, map_png, folder)
    encoder = load_encoder(model, device, precision)
    with EmbeddingCache(cache) as store:
        result = find_outliers(folder, encoder, top, k, normalize, store, batch_size, workers, not quiet,
                               follow_symlinks)
        embedding = _map_vectors(folder, encoder, store, follow_symlinks, report, map_png)
    if embedding is not None:  # before any move; the map in the space that was scored
        from ..report import outlier_label, write_map, write_outliers_report

        vectors = result.space(embedding[1])
        if report is not None:
            write_outliers_report(result, report, (embedding[0], vectors), map_png=map_png)
        else:
            write_map(embedding[0], vectors, outlier_label(result), map_png)
    plan, done = run_actions(result.categories(), folder, out, action, dry_run)
    if as_json:
        typer.echo(json.dumps({**result.to_dict(), "actions": [p.to_dict() for p in plan], "dry_run": dry_run},
                              indent=2))
        return
    print_skips(result.skipped, quiet)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"outliers of {folder}", title_justify="left")
    for column, justify in (("#", "right"), ("score", "right"), ("path", "left"), ("nearest", "left")):
        table.add_column(column, justify=justify, overflow="fold")
    for o in result.outliers:
        table.add_row(str(o.rank), f"{o.score:.3f}", str(o.path), f"{o.nearest} ({o.nearest_similarity:.3f})")
    Console().print(table)
    typer.echo(result.summary_line())
    if normalize == "auto" and "reference" not in result.normalize:
        typer.echo("(the model has no reference mean, so raw cosine; `filterkit model reference MODEL --images DIR` "
                   "adds one from generic photos of several kinds, which measured better: README.md, outliers)")
    print_actions(plan, done, dry_run, out)
    print_report(report)
    print_map(map_png)
