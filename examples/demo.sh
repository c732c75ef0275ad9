#!/usr/bin/env bash
# The quickstart: filter the example photos with the default encoder that ships in models/,
# keeping photos like examples/exemplars and rejecting photos like examples/negatives.
# Writes an HTML report (with CSV and JSON beside it) to out/demo/filter.html.
# With the shipped encoder it keeps the four edited copies of the exemplars, and also the two
# astronaut photos, which it puts nearer both exemplars than they are to each other: the automatic
# threshold from two exemplars is their mutual similarity (README.md, Quickstart, says more).
set -euo pipefail
cd "$(dirname "$0")/.."
FK=${FK:-.venv/bin/filterkit}
OUT=${OUT:-out/demo}
mkdir -p "$OUT"
$FK filter examples/incoming --keep-like examples/exemplars --reject-like examples/negatives \
    --cache "$OUT/cache.sqlite" --report "$OUT/filter.html" --quiet
