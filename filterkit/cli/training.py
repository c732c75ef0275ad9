"""Commands that train and measure encoders: pretrain, eval."""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import methods, presets
from ..errors import FilterkitError
from .common import (
    BatchOpt,
    DeviceOpt,
    FollowOpt,
    JsonOpt,
    ModelOpt,
    PrecisionOpt,
    QuietOpt,
    WorkersOpt,
    app,
    echo_err,
    load_encoder,
    print_skips,
)


@app.command()
def pretrain(
    folder: Annotated[Path, typer.Argument(help="Folder of images (any depth, no labels needed).")],
    out: Annotated[Path, typer.Option("--out", help="Model directory to write.")],
    method: Annotated[Optional[str], typer.Option("--method", help=f"Self-supervised method ({methods.method_help()}); docs/DESIGN.md, \"Methods\", gives each one's loss.", show_default=f"{presets.TRAIN_DEFAULTS['method']}, or the --init-from checkpoint's")] = None,
    preset: Annotated[Optional[str], typer.Option("--preset", help=f"Architecture preset ({presets.preset_help()}); its recipe fills unset options.", show_default=f"{presets.DEFAULT_PRESETS['cpu']} on a CPU, {presets.DEFAULT_PRESETS['cuda']} on a GPU, or the --init-from model's")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", min=1, help="Passes over FOLDER.", show_default="the preset's recipe")] = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", min=1, help="Cap on optimiser steps (sets the schedules' length).")] = None,
    minutes: Annotated[Optional[float], typer.Option("--minutes", help="Wall-clock budget for the training: the step time is measured first and the LR and momentum schedules planned to end with the budget; the run stops at the planned step or when the time is spent. --epochs / --max-steps, when given, still cap it.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=2, help="Global batch (split across DDP ranks).")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak LR.", show_default=presets.lr_help())] = None,
    weight_decay: Annotated[Optional[float], typer.Option("--weight-decay", help="AdamW weight decay.", show_default=str(presets.TRAIN_DEFAULTS["weight_decay"]))] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", help="InfoNCE temperature.", show_default=str(presets.TRAIN_DEFAULTS["temperature"]))] = None,
    queue: Annotated[Optional[int], typer.Option("--queue", help="moco-v3 only: also contrast each query with this many momentum keys of past batches (MoCo v2's FIFO queue of negatives), for small batches; 0: the batch's keys only.", show_default=str(presets.TRAIN_DEFAULTS["queue"]))] = None,
    momentum: Annotated[Optional[float], typer.Option("--momentum", help="Initial EMA momentum m0.", show_default=str(presets.TRAIN_DEFAULTS["momentum"]))] = None,
    warmup_epochs: Annotated[Optional[float], typer.Option("--warmup-epochs", help="Linear LR warmup before the half-cosine.", show_default="the preset's recipe")] = None,
    depth: Annotated[Optional[int], typer.Option("--depth", min=1, help="Number of blocks.", show_default=presets.depth_help())] = None,
    min_crop_scale: Annotated[Optional[float], typer.Option("--min-crop-scale", min=0.01, max=1.0, help="Smallest random-crop area.", show_default=f"the preset's recipe, else {presets.TRAIN_DEFAULTS['min_crop_scale']}")] = None,
    local_crops: Annotated[Optional[int], typer.Option("--local-crops", min=0, help="Multi-crop (SwAV): N more views of each image at --local-crop-size, cropped from 0.05 to --min-crop-scale of its area, predicting the two global views' targets (moco-v3, swav, byol, simsiam).", show_default="0, the two global views only")] = None,
    local_crop_size: Annotated[Optional[int], typer.Option("--local-crop-size", min=1, help="Side of the local views in px: a multiple of the model's pixels per token, below its input side.", show_default="3/7 of the input side, rounded to the token stride (96 at 224 with 16-px tokens, 16 at 32 with 8-px tokens)")] = None,
    no_predictor: Annotated[bool, typer.Option("--no-predictor", help="Drop the prediction MLP.")] = False,
    freeze_patch_embed: Annotated[bool, typer.Option("--freeze-patch-embed", help="Keep the random patch projection fixed.")] = False,
    data_in_memory: Annotated[bool, typer.Option("--data-in-memory", help="Decode every image once into memory (uint8, 2x the model's side up to 64 px, 8/7 above) and augment whole batches on the training device: for GPUs, where per-image CPU decoding is the bottleneck.")] = False,
    device: DeviceOpt = "auto",
    precision: Annotated[str, typer.Option("--precision", help="auto | fp32 | bf16 | fp16.")] = "auto",
    workers: WorkersOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/training/checkpoint.pt.")] = False,
    init_from: Annotated[Optional[str], typer.Option("--init-from", help="Start from this model directory instead of random weights (\"default\": the shipped model); a training folder also gives the heads. New optimiser and schedules.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seeds weights, augmentation and data order.", show_default=str(presets.TRAIN_DEFAULTS["seed"]))] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option("--checkpoint-every", min=1, help="Steps between checkpoints.", show_default=str(presets.TRAIN_DEFAULTS["checkpoint_every"]))] = None,
    stop_at_step: Annotated[Optional[int], typer.Option("--stop-at-step", min=1, help="Stop after this step as an interruption would: checkpoint written, --resume continues the same schedule.")] = None,
    knn_train: Annotated[Optional[Path], typer.Option("--knn-train", help="Labelled folder for the online kNN monitor.")] = None,
    knn_test: Annotated[Optional[Path], typer.Option("--knn-test", help="Labelled folder for the online kNN monitor.")] = None,
    knn_max_per_class: Annotated[Optional[int], typer.Option("--knn-max-per-class", min=1, help="Monitor on the first N images of each class.")] = None,
    follow_symlinks: FollowOpt = False,
    json_log: Annotated[Optional[Path], typer.Option("--json-log", help="Per-step JSON lines.", show_default="OUT/training/log.jsonl")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Pretrain a ViT on FOLDER (MoCo v3 unless --method says otherwise) and write a model directory to --out."""
    if (knn_train is None) != (knn_test is None):
        raise FilterkitError("--knn-train and --knn-test go together")
    from ..train import TrainingInterrupted, TrainOptions
    from ..train import pretrain as run_pretrain

    if preset is not None:
        presets.get_preset(preset)
    if method is not None:
        methods.method_class(method)
    # None: not given (the recipe's or the checkpoint's value). A flag left out is not given either.
    options = TrainOptions(preset=preset, method=method, init_from=init_from, epochs=epochs, max_steps=max_steps,
                           batch_size=batch_size, lr=lr, weight_decay=weight_decay, temperature=temperature,
                           queue=queue, momentum=momentum, warmup_epochs=warmup_epochs, depth=depth,
                           min_crop_scale=min_crop_scale, seed=seed, checkpoint_every=checkpoint_every, minutes=minutes,
                           predictor=False if no_predictor else None, freeze_patch_embed=freeze_patch_embed or None,
                           data_in_memory=data_in_memory or None, local_crops=local_crops,
                           local_crop_size=local_crop_size)
    try:
        result = run_pretrain(folder, out, options, resume=resume, device=device, precision=precision,
                              workers=workers, knn_train=knn_train, knn_test=knn_test,
                              knn_max_per_class=knn_max_per_class, json_log=json_log,
                              follow_symlinks=follow_symlinks, stop_at_step=stop_at_step,
                              progress=not quiet)
    except TrainingInterrupted as e:  # a plain KeyboardInterrupt came before any checkpoint was saved
        if e.rank == 0:  # under torchrun: said once
            echo_err(f"interrupted: checkpoint saved at step {e.step}; continue with "
                     f"`filterkit pretrain {folder} --out {out} --resume`")
        raise typer.Exit(130) from None
    if result.rank != 0:  # under torchrun: rank 0 reports for every process
        return
    print_skips(result.skipped, quiet)
    knn = f", online kNN {result.knn_top1[-1][1]:.3f}" if result.knn_top1 else ""
    loss = f"final loss {result.final_loss:.4f}" if math.isfinite(result.final_loss) else "no step run in this call"
    plan = f" of {result.total_steps} planned for --minutes {minutes:g}" if minutes is not None and not resume else ""
    typer.echo(f"trained {result.steps} steps{plan} ({loss}{knn}); model written to {out}")
    if result.stopped_by == "minutes" and result.steps < result.total_steps:
        typer.echo(f"stopped at step {result.steps} of the {result.total_steps} planned: the --minutes budget "
                   "was spent first (the schedules did not reach their end)")
    elif result.steps < result.total_steps:
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
    precision: PrecisionOpt = "auto",
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Weighted kNN accuracy of --model, with the random-init and raw-pixel baselines."""
    from ..evaluate import evaluate

    encoder = load_encoder(model, device, precision)
    report = evaluate(encoder, train, test, k=k, temperature=temperature, max_per_class=max_per_class,
                      batch_size=batch_size, workers=workers, progress=not quiet)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    used = min(k, report.n_train)  # evaluate takes at most every train image
    typer.echo(f"weighted kNN (k={used}{'' if used == k else f', as only {report.n_train} train images'}, "
               f"T={temperature}) on {report.n_test} test images, "
               f"{report.n_train} train, {len(report.classes)} classes:")
    typer.echo(f"  {'model':>12}: {report.knn_top1:.4f}")
    for name, value in report.baselines.items():
        typer.echo(f"  {name:>12}: {value:.4f}")


@app.command("compare-methods")
def compare_methods_command(
    folder: Annotated[Path, typer.Argument(help="Folder of images to pretrain on (your own collection).")],
    minutes: Annotated[float, typer.Option("--minutes", help="Wall-clock budget of each method's run (the same for all).")],
    methods_: Annotated[Optional[str], typer.Option("--methods", help=f"Comma-separated methods ({methods.method_help()}).", show_default="all; supcon only when FOLDER has class sub-folders")] = None,
    labelled: Annotated[Optional[Path], typer.Option("--labelled", help="Labelled folder (one sub-folder per class, or train/ and test/ of them): rank by weighted kNN top-1.")] = None,
    exemplars: Annotated[Optional[Path], typer.Option("--exemplars", help="Keep-like exemplars: rank by their leave-one-out keep-like AUROC against FOLDER (without --labelled).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder for every method's model directory and compare.json.", show_default="./compare-FOLDERNAME")] = None,
    preset: Annotated[Optional[str], typer.Option("--preset", help=f"Architecture preset of every run ({presets.preset_help()}).", show_default=f"{presets.DEFAULT_PRESETS['cpu']} on a CPU, {presets.DEFAULT_PRESETS['cuda']} on a GPU")] = None,
    depth: Annotated[Optional[int], typer.Option("--depth", min=1, help="Number of blocks.", show_default=presets.depth_help())] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=2, help="Global batch of every run.", show_default="the preset's recipe")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of every run (weights, augmentation, data order).")] = 0,
    max_images: Annotated[int, typer.Option("--max-images", min=2, help="Images of FOLDER (evenly spread) the label-free signals are measured on.")] = 1000,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", min=1, help="Also cap every method's run at this many steps (the same for all).")] = None,
    data_in_memory: Annotated[bool, typer.Option("--data-in-memory", help="As in `pretrain`: decode once, augment batches on the device.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the comparison recorded in --out (run with the same options): finished methods are kept, an interrupted run continues from its checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete the comparison recorded in --out (its method folders, compare.json and record) and start again.")] = False,
    device: DeviceOpt = "auto",
    workers: WorkersOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Pretrain each self-supervised method on FOLDER for the same --minutes, then rank them: by
    weighted kNN on --labelled, else by label-free signals of FOLDER's embeddings. Each finished
    method is recorded in --out; --resume continues an interrupted comparison."""
    from ..compare import RESULT_FILE, ComparisonInterrupted, compare_methods

    if preset is not None:
        presets.get_preset(preset)
    asked = [m.strip() for m in methods_.split(",") if m.strip()] if methods_ is not None else None
    if asked is not None and not asked:
        raise FilterkitError("--methods is empty: list methods separated by commas, e.g. moco-v3,simclr")
    out = out if out is not None else Path(f"compare-{folder.resolve().name or 'root'}")
    say = (lambda line: None) if quiet else echo_err
    try:
        comparison = compare_methods(folder, out, minutes, asked, labelled, exemplars, preset, depth, batch_size,
                                     seed, device, workers, data_in_memory, max_images, progress=not quiet, say=say,
                                     max_steps=max_steps, resume=resume, overwrite=overwrite)
    except ComparisonInterrupted as e:
        given = [("--minutes", repr(minutes)),  # exactly as recorded: :g rounds to 6 digits
                 ("--out", out), ("--methods", methods_), ("--labelled", labelled),
                 ("--exemplars", exemplars), ("--preset", preset), ("--depth", depth), ("--batch-size", batch_size),
                 ("--seed", seed if seed != 0 else None), ("--max-images", max_images if max_images != 1000 else None),
                 ("--max-steps", max_steps), ("--device", device if device != "auto" else None),
                 ("--workers", workers)]
        words = ["filterkit", "compare-methods", str(folder)]
        for flag, value in given:
            if value is not None:
                words += [flag, str(value)]
        words += [*(["--data-in-memory"] if data_in_memory else []), *(["-q"] if quiet else []),
                  *(["--json"] if as_json else []), "--resume"]
        echo_err(f"interrupted: {e}; continue with `{shlex.join(words)}`")
        raise typer.Exit(130) from None
    doc = comparison.to_dict()
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    _print_comparison(doc, out / RESULT_FILE)
    if doc["winner"] is not None:
        typer.echo(f"winner: {doc['winner']['method']} (by {doc['ranked_by']}); its model: {out / doc['winner']['model']}")


_COLUMNS = (("knn_top1", "kNN"), ("exemplar_auroc", "AUROC"), ("rankme", "RankMe"), ("alignment", "align"),
            ("uniformity", "unif"))


def _print_comparison(doc: dict, path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    def fmt(value) -> str:
        return "-" if value is None else f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"

    shown = [(k, title) for k, title in _COLUMNS
             if any((r["signals"] or {}).get(k) is not None for r in doc["runs"])]
    table = Table(title=f"{len(doc['runs'])} methods on {doc['folder']}, {doc['minutes_per_method']:g} min each "
                        f"({doc['preset']}, seed {doc['seed']}); ranked by {doc['ranked_by']}", title_justify="left")
    for column in ("#", "method", "steps", "stop", *(t + ("▼" if k == doc["ranked_by"] else "") for k, t in shown)):
        table.add_column(column, justify="left" if column in ("method", "stop") else "right", no_wrap=True)
    for rank, r in enumerate(doc["runs"], 1):
        name = r["method"] + (" (labels)" if r["supervised"] else "")
        if r["signals"] is None:
            table.add_row(str(rank), f"[red]{name}[/]", str(r["steps"]), "[red]failed[/]", *["-"] * len(shown))
            continue
        style = "bold green" if rank == 1 else ""
        table.add_row(str(rank), f"[{style}]{name}[/]" if style else name, f"{r['steps']}/{r['total_steps']}",
                      r["stopped_by"] or "-", *[fmt(r["signals"][k]) for k, _ in shown])
    for base, values in doc["baselines"].items():
        table.add_row("", f"[dim]{base.replace('_', ' ')}[/]", "", "", *[f"[dim]{fmt(values.get(k))}[/]" for k, _ in shown])
    Console().print(table)
    for r in doc["runs"]:
        if r["error"]:
            typer.echo(f"{r['method']} failed: {r['error']}")
        elif r.get("resumed_at_step") is not None:
            typer.echo(f"{r['method']}: interrupted, then continued from its checkpoint of step {r['resumed_at_step']} "
                       f"({r['wall_seconds']:g} s of training in all)")
    typer.echo("▼ ranks the methods. kNN: weighted kNN top-1 on --labelled; AUROC: the exemplars' leave-one-out "
               "keep-like AUROC; RankMe: effective rank of the embeddings (all three: higher is better); align, "
               f"unif: alignment of two views and uniformity (lower is better). Written to {path}")
