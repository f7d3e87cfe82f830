#!/usr/bin/env bash
# Re-analyse a committed compare with the current procedure, sampling nothing (issue 41): copies
# docs/results/matched_safety/<name> to outputs/reanalysis/<name>, runs `dng compare <its overrides.yaml> grid=existing`
# there (every probe and grid point is read back from its metrics.json/records.npz), and copies the new
# compare.json/csv/md/png back. overrides.yaml stays: it says how the points were sampled.
#   docs/results/matched_safety/reanalyse.sh fashion
set -euo pipefail
cd "$(dirname "$0")/../../.."
name=${1:?usage: reanalyse.sh <name under docs/results/matched_safety>}
src=docs/results/matched_safety/$name dst=outputs/reanalysis/$name
[ -f "$src/overrides.yaml" ] || { echo "reanalyse.sh: $src has no overrides.yaml" >&2; exit 2; }
rm -rf "$dst" && mkdir -p "$(dirname "$dst")" && cp -r "$src" "$dst"
mapfile -t overrides < <(python -c "from omegaconf import OmegaConf
for o in OmegaConf.load('$src/overrides.yaml'):
    print(o) if not o.startswith('hydra.') else None")
export DNG_NATIVE_BF16=0  # published in fp32
dng compare "${overrides[@]}" grid=existing hydra.run.dir="$dst"
cp "$dst"/compare.{json,csv,md,png} "$src"/
