"""Record measured quality in a trained model directory and write its MODEL_CARD.md.

    python scripts/write_model_card.py RUN_DIR --eval imagenette_heldout=a.json \
        --eval cifar10_test=b.json --speed 123.4 --speed-note "..." --data-note "..."

Each --eval file is the output of `filterkit eval --json`. The quality goes into config.json
(``quality``); the card is generated from config.json so it never disagrees with it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from filterkit.encoder import Encoder
from filterkit.modeldir import CARD_FILE, CONFIG_FILE, update_model_config
from filterkit.fsutil import atomic_write_text


def recipe(training: dict) -> str:
    return (f"batch {training['batch_size']}, AdamW lr {training['lr']:g} (warmup "
            f"{training['warmup_epochs']:g} epochs, then half-cosine), weight decay {training['weight_decay']:g}, "
            f"temperature {training['temperature']:g}, momentum {training['momentum']:g} → 1 (cosine), "
            f"projector/predictor hidden {training['proj_hidden']}/{training['pred_hidden']}, out "
            f"{training['out_dim']}, crops from {training['min_crop_scale']:g} of the area, "
            f"{training['steps']} steps" + (f" of the {training['total_steps']} its LR schedule spans (stopped early, "
                                            "late in the cosine decay)"
                                            if training["steps"] < training["total_steps"] else "")
            + f", seed {training['seed']}.")


def card(doc: dict, speed_note: str, data_note: str, limitations: list[str]) -> str:
    arch, training, quality = doc["architecture"], doc["training"], doc["quality"]
    compute = training.get("compute", {})
    lines = [
        f"# {Path(doc.get('name', 'filterkit encoder')).name}",
        "",
        "The default encoder of filterkit: a small Vision Transformer pretrained by `filterkit pretrain`",
        "(MoCo v3, self-supervised, no labels). `Encoder.load()` and every command without `--model`",
        "use it.",
        "",
        "## Architecture",
        f"- ViT (timm `{doc['timm']['model_name']}` with {json.dumps(doc['timm']['kwargs'])}): width "
        f"{arch['embed_dim']}, depth {arch['depth']}, {arch['num_heads']} heads, patch {arch['patch_size']}, "
        f"input {arch['img_size']} px, fixed 2D sin-cos position embedding.",
        f"- Embedding: the final-norm CLS token, {doc['embedding_dim']} dimensions, L2-normalised.",
        "- Weights: `model.safetensors` (fp32), loadable with `strict=True` into the timm model above.",
        "",
        "## Data",
        data_note,
        "",
        "## Recipe",
    ]
    stages = doc.get("stages", [])  # earlier runs this one started from (--init-from), oldest first
    if stages:
        runs = [*stages, doc]
        walls = [r["training"].get("compute", {}).get("wall_seconds", 0) for r in runs]
        for i, run in enumerate(runs, 1):
            t = run["training"]
            start = (f" (`--init-from` stage {i - 1}: {t['init']['loaded']}; new AdamW and schedules)"
                     if i > 1 else "")
            lines.append(f"- Stage {i}{start}, data {Path(run['data']['folder']).name} "
                         f"({run['data']['images']} images): {recipe(t)}")
        lines.append(
            f"- Compute: {compute.get('device', '?')}, {compute.get('processes', 1)} process(es), "
            f"{compute.get('torch_threads', '?')} threads, {compute.get('precision', '?')}, "
            f"{sum(walls) / 60:.0f} minutes wall-clock ({' + '.join(f'{w / 60:.0f}' for w in walls)}).")
    else:
        lines += [
            f"- MoCo v3: {recipe(training)}",
            f"- Compute: {compute.get('device', '?')}, {compute.get('processes', 1)} process(es), "
            f"{compute.get('torch_threads', '?')} threads, {compute.get('precision', '?')}, "
            f"{compute.get('wall_seconds', 0) / 60:.0f} minutes wall-clock.",
        ]
    lines += [
        "- Reproduce: `bash scripts/train_default_model.sh` (see the script for the data layout).",
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
    lines += [
        "",
        f"- Embedding speed: {speed_note}",
    ]
    if dedup is not None:
        lines.append(f"- Dedup threshold (cosine): {dedup:.4f}, calibrated by `filterkit model calibrate` on "
                     "held-out photos (planted near-duplicates, precision target in config.json).")
    lines += ["", "## Limitations"] + [f"- {x}" for x in limitations]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--eval", action="append", default=[], metavar="NAME=FILE")
    parser.add_argument("--speed-note", required=True)
    parser.add_argument("--data-note", required=True)
    parser.add_argument("--limitation", action="append", default=[])
    parser.add_argument("--name", help="the card's title (default: the folder's name)")
    args = parser.parse_args()
    quality = {}
    for item in args.eval:
        name, _, file = item.partition("=")
        quality[name] = json.loads(Path(file).read_text())
    Encoder.load(args.model_dir, device="cpu")  # refuse a directory that does not load
    update_model_config(args.model_dir, quality=quality)
    doc = json.loads((args.model_dir / CONFIG_FILE).read_text())
    doc["name"] = args.name or args.model_dir.name
    doc["stages"] = []
    init = (doc.get("training") or {}).get("init")
    while init and (Path(init["from"]) / CONFIG_FILE).is_file():
        earlier = json.loads((Path(init["from"]) / CONFIG_FILE).read_text())
        doc["stages"].insert(0, earlier)
        init = (earlier.get("training") or {}).get("init")
    atomic_write_text(args.model_dir / CARD_FILE, card(doc, args.speed_note, args.data_note, args.limitation))
    print(f"wrote {args.model_dir / CARD_FILE}")


if __name__ == "__main__":
    main()
