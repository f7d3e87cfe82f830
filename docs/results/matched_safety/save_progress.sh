#!/usr/bin/env bash
# Copy the finished units of an UNFINISHED `dng compare` into docs/results (no samples), so that a new machine (where
# outputs/ starts empty) resumes it instead of starting over: every calibration.json and probe/grid-point metrics.json,
# and the grid points' records.npz. run_headline_mnist.sh copies them back when its outputs folder is missing; a
# finished unit is found again by its identity ("was made by this config: skipping finished run").
#   docs/results/matched_safety/save_progress.sh outputs/issue44/headline_mnist docs/results/matched_safety/headline_mnist_progress
set -euo pipefail
src=${1:?usage: save_progress.sh <compare folder> <destination>} dst=${2:?usage: save_progress.sh <compare folder> <destination>}
rm -rf "$dst.tmp" && mkdir -p "$dst.tmp"
(cd "$src" && find calibrate eval \( -name metrics.json -o -name calibration.json -o -name records.npz \) -print0 2>/dev/null || true) |
    while IFS= read -r -d '' f; do
        case "$f" in calibrate/*records.npz) continue ;; esac
        mkdir -p "$dst.tmp/$(dirname "$f")" && cp "$src/$f" "$dst.tmp/$f"
    done
rm -rf "$dst" && mv "$dst.tmp" "$dst"
echo "saved $(cd "$dst" && find . -type f | wc -l) files of finished units into $dst"
