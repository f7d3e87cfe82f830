#!/usr/bin/env bash
# Copy the files behind a finished `dng compare` into docs/results (no samples): compare.json/csv/md/png, the
# command's overrides, every calibration.json and metrics.json, and every grid point's records.npz (not the probes') (each seed's
# class and features: tests/test_docs.py re-runs the compare on a copy of them and checks that nothing is sampled).
#   docs/results/matched_safety/collect.sh outputs/issue23/fashion docs/results/matched_safety/fashion
set -euo pipefail
src=${1:?usage: collect.sh <compare folder> <destination>} dst=${2:?usage: collect.sh <compare folder> <destination>}
[ -f "$src/compare.json" ] || { echo "collect.sh: $src has no compare.json (not a finished compare)" >&2; exit 2; }
mkdir -p "$dst"
cp "$src"/compare.{json,csv,md,png} "$dst"/
cp "$src/.hydra/overrides.yaml" "$dst/overrides.yaml"
(cd "$src" && find calibrate \( -name metrics.json -o -name calibration.json \) -print0 &&
    find eval \( -name metrics.json -o -name records.npz \) -print0) |
    while IFS= read -r -d '' f; do mkdir -p "$dst/$(dirname "$f")" && cp "$src/$f" "$dst/$f"; done
echo "collected $(cd "$dst" && find . -type f | wc -l) files into $dst"
