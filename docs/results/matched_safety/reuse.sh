#!/usr/bin/env bash
# Seed a compare folder with another compare's finished results, so a new compare samples only what is new: each
# relative PATH (e.g. calibrate/dng, eval/dng) is copied from <from> into <to> unless <to> already has it (a resumed
# run keeps its own). Reuse is safe only on the same seeds and settings: `dng compare` checks every copied result's
# config against its own and refuses, never reuses, one made by another config.
#   docs/results/matched_safety/reuse.sh docs/results/matched_safety/mnist_ccfg outputs/issue28/mnist_hold calibrate/dng eval/dng
set -euo pipefail
from=${1:?usage: reuse.sh <from> <to> PATH...} to=${2:?usage: reuse.sh <from> <to> PATH...}
shift 2
for path in "$@"; do
  [ -d "$from/$path" ] || { echo "reuse.sh: $from/$path does not exist" >&2; exit 2; }
  [ -d "$to/$path" ] || { mkdir -p "$(dirname "$to/$path")" && cp -r "$from/$path" "$to/$path"; }
done
