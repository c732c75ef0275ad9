#!/usr/bin/env bash
# The quickstart demo: embed the example photos and search them with near-duplicate queries.
# Until filterkit ships its default encoder this uses a randomly initialised ViT, which
# already finds near-duplicates (flips, crops, resizes) of real photos.
set -euo pipefail
cd "$(dirname "$0")/.."
FK=.venv/bin/filterkit
OUT=out/demo
mkdir -p "$OUT"
[ -f "$OUT/random-vit-tiny/config.json" ] || $FK model init --preset vit-tiny-16-224 --out "$OUT/random-vit-tiny"
$FK embed examples/photos --model "$OUT/random-vit-tiny" --cache "$OUT/cache.sqlite"
$FK search examples/queries/*.jpg --in examples/photos --model "$OUT/random-vit-tiny" --cache "$OUT/cache.sqlite" -k 3 -q
