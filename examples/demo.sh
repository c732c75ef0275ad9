#!/usr/bin/env bash
# The quickstart demo: embed the example photos, search them with near-duplicate queries, and
# filter them keeping images like the queries, with an HTML report.
# Until filterkit ships its default encoder this uses a randomly initialised ViT, which
# already finds near-duplicates (flips, crops, resizes) of real photos.
set -euo pipefail
cd "$(dirname "$0")/.."
FK=.venv/bin/filterkit
OUT=out/demo
MODEL="$OUT/random-vit-tiny"
mkdir -p "$OUT"
[ -f "$MODEL/config.json" ] || $FK model init --preset vit-tiny-16-224 --out "$MODEL"
$FK embed examples/photos --model "$MODEL" --cache "$OUT/cache.sqlite"
$FK search examples/queries/*.jpg --in examples/photos --model "$MODEL" --cache "$OUT/cache.sqlite" -k 3 -q
$FK filter examples/photos --keep-like examples/queries --model "$MODEL" --cache "$OUT/cache.sqlite" \
    --report "$OUT/filter.html" -q
