#!/usr/bin/env bash
# Pretrain on a machine with a GPU, then measure:
#
#   bash scripts/gpu_pretrain.sh --data DIR --out DIR
#
# --data DIR (else $FILTERKIT_DATA, else ~/.cache/filterkit-data) holds cifar10/{train,test}/<class>/
# laid out as README.md describes ("Data for benchmarks and the default model"); --out (else $OUT)
# receives the results. Run it from a checkout: it runs filterkit from the tree, no install needed.
# TRAIN (a folder under DIR, default cifar10/train) is what is trained on, e.g. the splits/pretrain
# folder of scripts/make_splits.py (Imagenette's training split + CIFAR-10 train); EVAL=0 and
# SPEED=0 skip steps 4 and 5 (to run them elsewhere, on the model directory that comes back);
# EXTRA holds more pretrain options (e.g. "--min-crop-scale 0.2").
#
# The training images are decoded once into GPU memory (--data-in-memory: crops, jitter, grey,
# solarize run batched on the GPU), bf16 autocast. A short probe run measures steady
# images/s; the real run's schedule (epochs, --max-steps) is sized from it to fit MINUTES,
# so the cosine schedules end when the budget does. Then `filterkit eval` on CIFAR-10 test
# with the random-init and raw-pixel baselines, and benchmarks/pretrain_speed.py on the GPU.
# Written to OUT: model/config.json, model/model.safetensors (fp16, half the size; Encoder.load
# returns fp32), model/MODEL_CARD.md, eval.json, log.jsonl, speed.txt, run.txt. The training
# folder with its checkpoint stays in RUN (default /tmp/fk-gpu-run).
# With the defaults the script took 431 s on one H200 (benchmarks/README.md has its figures).
# CPU dry run: DEVICE=cpu PRECISION=fp32 BATCH=32 PROBE_STEPS=3 MINUTES=0.3 EVAL_PER_CLASS=50 \
#   PY=.venv/bin/python bash scripts/gpu_pretrain.sh --out /tmp/gpu-dry
set -euo pipefail
DATA=${FILTERKIT_DATA:-$HOME/.cache/filterkit-data}
OUT=${OUT:-}
while [ $# -gt 0 ]; do
  case $1 in
    --data) DATA=${2:?--data needs a folder}; shift 2 ;;
    --out) OUT=${2:?--out needs a folder}; shift 2 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (expected --data DIR, --out DIR)" >&2; exit 2 ;;
  esac
done
[ -n "$OUT" ] || { echo "give --out DIR (or set OUT): the folder that receives the results" >&2; exit 2; }
case $DATA in /*) ;; *) DATA=$PWD/$DATA ;; esac  # before the cd below
case $OUT in /*) ;; *) OUT=$PWD/$OUT ;; esac
TRAIN=${TRAIN:-cifar10/train}
EVAL=${EVAL:-1}
SPEED=${SPEED:-1}
NEEDS=(cifar10/train "$TRAIN"); [ "$EVAL" = 0 ] || NEEDS+=(cifar10/test)
for need in "${NEEDS[@]}"; do
  [ -d "$DATA/$need" ] || { echo "missing $DATA/$need: lay out CIFAR-10 as README.md describes" \
    "(\"Data for benchmarks and the default model\"), or pass --data DIR / set FILTERKIT_DATA" >&2; exit 1; }
done
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
PRECISION=${PRECISION:-bf16}
PRESET=${PRESET:-vit-tiny-4-32}  # ViT-Tiny, patch 4 on 32 px: the usual CIFAR ViT
BATCH=${BATCH:-512}
LR=${LR:-}                       # empty: the preset's GPU recipe (1.5e-4 x batch / 256)
MINUTES=${MINUTES:-5}          # the training run's wall-clock budget
PROBE_STEPS=${PROBE_STEPS:-40}
EVAL_PER_CLASS=${EVAL_PER_CLASS:-}  # empty: the whole of CIFAR-10 train and test
RUN=${RUN:-/tmp/fk-gpu-run}
PY=${PY:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # run from the tree: no install needed there
export PYTHONUNBUFFERED=1  # run.txt keeps what was printed even if the run is cut off
FK=("$PY" -m filterkit)
mkdir -p "$OUT"
exec > >(tee "$OUT/run.txt") 2>&1

{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true; } 2>/dev/null
"$PY" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())"
COMMON=(--preset "$PRESET" --batch-size "$BATCH" --device "$DEVICE" --precision "$PRECISION" --data-in-memory --quiet)
[ -n "$LR" ] && COMMON+=(--lr "$LR")
# shellcheck disable=SC2206  # EXTRA: more pretrain options, split on spaces
[ -n "${EXTRA:-}" ] && COMMON+=($EXTRA)

# 1. Probe: steady images/s (median of the second half of the steps: the first ones warm up), on
# one class hard-linked apart so that its decode takes a tenth of the time.
rm -rf /tmp/fk-probe /tmp/fk-probe-data && mkdir -p /tmp/fk-probe-data
cp -al "$DATA/cifar10/train/airplane" /tmp/fk-probe-data/ 2>/dev/null \
  || cp -a "$DATA/cifar10/train/airplane" /tmp/fk-probe-data/  # hard links fail across filesystems
"${FK[@]}" pretrain /tmp/fk-probe-data --out /tmp/fk-probe "${COMMON[@]}" --max-steps "$PROBE_STEPS" \
    --checkpoint-every 100000
N_TRAIN=$(find "$DATA/$TRAIN" -type f | wc -l)
read -r STEPS EPOCHS WARMUP IPS < <("$PY" - /tmp/fk-probe/training/log.jsonl "$MINUTES" "$BATCH" "$N_TRAIN" <<'EOF'
import json, math, statistics, sys
log, minutes, batch, n = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rows = [json.loads(line) for line in open(log) if '"images_per_s"' in line]
ips = statistics.median(r["images_per_s"] for r in rows[len(rows) // 2:])
steps = max(1, int(minutes * 60 * ips / batch))
epochs = max(1, math.ceil(steps * batch / n))
warmup = round(min(10.0, 0.1 * steps * batch / n), 2)  # 10 % of the run, at most the recipe's 10
print(steps, epochs, warmup, round(ips, 1))
EOF
)
echo "probe: $IPS img/s at batch $BATCH -> $STEPS steps ($EPOCHS epochs, warmup $WARMUP) in $MINUTES min"

# 2. The run, sized to the budget.
rm -rf "$RUN"
start=$(date +%s)
"${FK[@]}" pretrain "$DATA/$TRAIN" --out "$RUN" "${COMMON[@]}" --epochs "$EPOCHS" --max-steps "$STEPS" \
    --warmup-epochs "$WARMUP" --json-log "$OUT/log.jsonl" \
    --checkpoint-every 1000
echo "trained $STEPS steps in $(( $(date +%s) - start )) s"
# From here on each step reports its failure and the next one still runs, so one failure does
# not lose the other measurements.
set +e

# 3. The model directory, weights in fp16 to halve the file (Encoder.load returns fp32).
"$PY" -c "import sys, torch; from filterkit import Encoder; \
Encoder.load(sys.argv[1], device='cpu').save(sys.argv[2], overwrite=True, weights_dtype=torch.float16)" \
    "$RUN" "$OUT/model" || echo "fp16 model directory FAILED"

# 4. kNN on CIFAR-10 test with both baselines, same run.
EVAL_ARGS=(--model "$RUN" --train "$DATA/cifar10/train" --test "$DATA/cifar10/test" --device "$DEVICE" --json --quiet)
[ -n "$EVAL_PER_CLASS" ] && EVAL_ARGS+=(--max-per-class "$EVAL_PER_CLASS")
if [ "$EVAL" != 0 ]; then
  "${FK[@]}" eval "${EVAL_ARGS[@]}" > "$OUT/eval.json" \
    && "$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); print('kNN top-1', d['knn_top1'], {k: v['knn_top1'] for k, v in d['baselines'].items()})" "$OUT/eval.json" \
    || echo "eval FAILED"
fi

# 5. Training-step speed against the paper-pseudocode reference, alternated in one run.
if [ "$SPEED" != 0 ]; then
  "$PY" benchmarks/pretrain_speed.py --preset "$PRESET" --batch-size "$BATCH" --device "$DEVICE" --steps 5 --rounds 3 \
      | tee "$OUT/speed.txt"
fi
