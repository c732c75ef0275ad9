"""Commands that train and measure encoders: pretrain, eval."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import methods, presets
from ..errors import FilterkitError
from .common import BatchOpt, DeviceOpt, FollowOpt, JsonOpt, ModelOpt, QuietOpt, WorkersOpt, app, echo_err, load_encoder, print_skips


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
    momentum: Annotated[Optional[float], typer.Option("--momentum", help="Initial EMA momentum m0.", show_default=str(presets.TRAIN_DEFAULTS["momentum"]))] = None,
    warmup_epochs: Annotated[Optional[float], typer.Option("--warmup-epochs", help="Linear LR warmup before the half-cosine.", show_default="the preset's recipe")] = None,
    depth: Annotated[Optional[int], typer.Option("--depth", min=1, help="Number of blocks.", show_default=presets.depth_help())] = None,
    min_crop_scale: Annotated[Optional[float], typer.Option("--min-crop-scale", min=0.01, max=1.0, help="Smallest random-crop area.", show_default=f"the preset's recipe, else {presets.TRAIN_DEFAULTS['min_crop_scale']}")] = None,
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
                           momentum=momentum, warmup_epochs=warmup_epochs, depth=depth,
                           min_crop_scale=min_crop_scale, seed=seed, checkpoint_every=checkpoint_every, minutes=minutes,
                           predictor=False if no_predictor else None, freeze_patch_embed=freeze_patch_embed or None,
                           data_in_memory=data_in_memory or None)
    try:
        result = run_pretrain(folder, out, options, resume=resume, device=device, precision=precision,
                              workers=workers, knn_train=knn_train, knn_test=knn_test,
                              knn_max_per_class=knn_max_per_class, json_log=json_log,
                              follow_symlinks=follow_symlinks, stop_at_step=stop_at_step,
                              progress=not quiet)
    except TrainingInterrupted as e:  # a plain KeyboardInterrupt came before any checkpoint was saved
        echo_err(f"interrupted: checkpoint saved at step {e.step}; continue with "
                 f"`filterkit pretrain {folder} --out {out} --resume`")
        raise typer.Exit(130) from None
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
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Weighted kNN accuracy of --model, with the random-init and raw-pixel baselines."""
    from ..evaluate import evaluate

    encoder = load_encoder(model, device)
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

