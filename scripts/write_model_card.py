"""Record measured quality in a trained model directory and write its MODEL_CARD.md.

    python scripts/write_model_card.py MODEL_DIR --eval imagenette_heldout=a.json \
        --eval cifar10_test=b.json --speed-note "..." --data-note "..." --limitation "..."
    python scripts/write_model_card.py MODEL_DIR      # regenerate the card from the directory alone

Each --eval file is the output of `filterkit eval --json`; the quality goes into config.json
(``quality``). The notes and the title go into config.json too (``card``: ``title``, ``data``,
``speed``, ``limitations``), and the recipe of every stage comes from config.json's training
provenance (``training`` and, for a chain of ``--init-from`` runs, ``training.stages``), so the
card never disagrees with config.json and can be rewritten from the directory alone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors import safe_open

from filterkit.encoder import Encoder
from filterkit.fsutil import atomic_write_text
from filterkit.modeldir import CARD_FILE, CONFIG_FILE, DEFAULT_MODEL, WEIGHTS_FILE, update_model_config


def recipe(training: dict) -> str:
    return (f"batch {training['batch_size']}, AdamW lr {training['lr']:g} (warmup "
            f"{training['warmup_epochs']:g} epochs, then half-cosine), weight decay {training['weight_decay']:g}, "
            f"temperature {training['temperature']:g}, momentum {training['momentum']:g} → 1 (cosine), "
            f"projector/predictor hidden {training['proj_hidden']}/{training['pred_hidden']}, out "
            f"{training['out_dim']}, crops from {training['min_crop_scale']:g} of the area, "
            f"{training['steps']} steps" + (f" of the {training['total_steps']} its LR schedule spans (stopped early, "
                                            f"at {training['steps'] / training['total_steps']:.0%} of it)"
                                            if training["steps"] < training["total_steps"] else "")
            + f", seed {training['seed']}.")


def _count(n) -> str:
    return f"{n:,}" if isinstance(n, int) else str(n)


def stage_line(i: int, run: dict) -> str:
    """One stage of the recipe: ``run`` is config.json itself or an entry of training.stages."""
    t, data = run.get("training"), run.get("data") or {}
    if not t:
        return f"- Stage {i}: model {run.get('name', '?')} ({run.get('model_id', '?')}), training not recorded."
    init = t.get("init") or {}
    start = (f" (`--init-from` stage {i - 1}: {init.get('loaded', '?')}; new AdamW and schedules)"
             if i > 1 else "")
    return (f"- Stage {i}{start}, data `{data.get('name', '?')}` ({_count(data.get('images', '?'))} images): "
            f"{recipe(t)}" + (f" Model id `{run['model_id']}`." if run.get("model_id") else ""))


def stored_dtype(weights: Path) -> str:
    """fp16 / fp32 / ...: the dtype the weights are stored in (the first tensor's; all share it)."""
    with safe_open(weights, framework="pt") as f:
        name = str(f.get_slice(next(iter(f.keys()))).get_dtype())
    return {"F16": "fp16", "BF16": "bf16", "F32": "fp32"}.get(name, name)


def card(doc: dict, weights_dtype: str = "fp32", reference=None) -> str:
    """The card's Markdown; ``reference``: the directory's reference mean (reference.read_reference), if any."""
    arch, training, quality = doc["architecture"], doc["training"], doc.get("quality") or {}
    notes = doc.get("card") or {}
    compute = training.get("compute", {})
    title = notes.get("title", "filterkit encoder")
    data = doc.get("data") or {}
    shipped = title == DEFAULT_MODEL
    lines = [
        f"# {title}",
        "",
        f"{'The default encoder of filterkit' if shipped else 'A filterkit encoder'}: a small Vision Transformer "
        "pretrained by `filterkit pretrain`",
        f"({training.get('method', 'MoCo v3')}, self-supervised, no labels)."
        + (" `Encoder.load()` and every command without `--model` use it." if shipped else ""),
        "",
        "## Architecture",
        f"- ViT (timm `{doc['timm']['model_name']}` with {json.dumps(doc['timm']['kwargs'])}): width "
        f"{arch['embed_dim']}, depth {arch['depth']}, {arch['num_heads']} heads, patch {arch['patch_size']}, "
        f"input {arch['img_size']} px, fixed 2D sin-cos position embedding.",
        f"- Embedding: the final-norm CLS token, {doc['embedding_dim']} dimensions, L2-normalised.",
        f"- Weights: `model.safetensors` ({weights_dtype}; `Encoder.load` returns fp32), loadable with "
        "`strict=True` into the timm model above.",
        "",
        "## Data",
        notes.get("data") or f"`{data.get('name', '?')}` ({_count(data.get('images', '?'))} images).",
        "",
        "## Recipe",
    ]
    stages = training.get("stages") or []  # earlier runs this one started from (--init-from), oldest first
    if stages:
        runs = [*stages, doc]
        walls = [(r.get("training") or {}).get("compute", {}).get("wall_seconds", 0) for r in runs]
        lines += [stage_line(i, run) for i, run in enumerate(runs, 1)]
        lines.append(
            f"- Compute: {compute.get('device', '?')}, {compute.get('processes', 1)} process(es), "
            f"{compute.get('torch_threads', '?')} threads, {compute.get('precision', '?')}, "
            f"{sum(walls) / 60:.0f} minutes wall-clock ({' + '.join(f'{w / 60:.0f}' for w in walls)}).")
    else:
        lines += [
            f"- {training.get('method', 'MoCo v3')}: {recipe(training)}",
            f"- Compute: {compute.get('device', '?')}, {compute.get('processes', 1)} process(es), "
            f"{compute.get('torch_threads', '?')} threads, {compute.get('precision', '?')}, "
            f"{compute.get('wall_seconds', 0) / 60:.0f} minutes wall-clock.",
        ]
    if shipped:
        lines.append("- Reproduce: `bash scripts/train_default_model.sh` (see the script and README.md, "
                     "\"Data for benchmarks and the default model\", for the data layout).")
    lines += [
        "",
        "## Measured quality",
        "Weighted kNN (DINO protocol: k = 20, T = 0.07, cosine on L2-normalised features), top-1,",
        "with the baselines measured in the same run (`filterkit eval --json`):",
        "",
        "| evaluation | this model | random init (same architecture) | raw pixels (32×32) |",
        "| --- | --- | --- | --- |",
    ]
    for name, q in quality.items():
        if not isinstance(q, dict) or "knn_top1" not in q:
            continue
        b = q["baselines"]
        n = q.get("protocol", {})
        lines.append(f"| {name} ({n.get('n_train', '?')} train / {n.get('n_test', '?')} test) | "
                     f"**{q['knn_top1']:.4f}** | {b['random_init']['knn_top1']:.4f} | {b['raw_pixels']['knn_top1']:.4f} |")
    dedup = doc.get("thresholds", {}).get("dedup")
    lines.append("")
    if notes.get("speed"):
        lines.append(f"- Embedding speed: {notes['speed']}")
    if dedup is not None:
        lines.append(f"- Dedup threshold (cosine): {dedup:.4f}, calibrated by `filterkit model calibrate` on "
                     "held-out photos (planted near-duplicates, precision target in config.json).")
    if reference is not None:
        lines.append(f"- Reference mean (`reference.safetensors`, what `filterkit outliers` centres on): the mean "
                     f"embedding of {reference.fitted_on:,} images, {reference.reference}; written by "
                     "`filterkit model reference`.")
    if notes.get("limitations"):
        lines += ["", "## Limitations"] + [f"- {x}" for x in notes["limitations"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--eval", action="append", default=[], metavar="NAME=FILE",
                        help="replaces config.json's quality with these evaluations")
    parser.add_argument("--speed-note", help="default: config.json's card.speed")
    parser.add_argument("--data-note", help="default: config.json's card.data")
    parser.add_argument("--limitation", action="append", default=[], help="default: config.json's card.limitations")
    parser.add_argument("--name", help="the card's title (default: config.json's card.title, else the folder's name)")
    args = parser.parse_args()
    # Refuse a directory that does not load, or whose reference is stale, before writing anything.
    reference = Encoder.load(args.model_dir, device="cpu").reference()
    doc = json.loads((args.model_dir / CONFIG_FILE).read_text())
    if not doc.get("training"):
        raise SystemExit(f"{args.model_dir / CONFIG_FILE} has no training provenance: not a pretrained model")
    updates = {}
    if args.eval:
        updates["quality"] = {}
        for item in args.eval:
            name, _, file = item.partition("=")
            updates["quality"][name] = json.loads(Path(file).read_text())
    notes = dict(doc.get("card") or {})
    notes.setdefault("title", args.model_dir.resolve().name)
    given = {"title": args.name, "data": args.data_note, "speed": args.speed_note,
             "limitations": args.limitation or None}
    notes.update({k: v for k, v in given.items() if v is not None})
    if notes != doc.get("card"):
        updates["card"] = notes
    if updates:
        update_model_config(args.model_dir, **updates)
        doc = json.loads((args.model_dir / CONFIG_FILE).read_text())
    atomic_write_text(args.model_dir / CARD_FILE, card(doc, stored_dtype(args.model_dir / WEIGHTS_FILE), reference))
    print(f"wrote {args.model_dir / CARD_FILE}")


if __name__ == "__main__":
    main()
