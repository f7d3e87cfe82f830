#!/usr/bin/env bash
# SUPERSEDED (docs/changelog.md): made by the procedure before issue 41 (grid_factors, Holm, the band fallback); the
# current dng compare places its grid by rate and analyses the band-averaged estimand, so re-running this samples
# a different grid. Its grid points kept no records.npz, so it cannot be re-analysed: kept as the record only.
# The interim NP-vs-SLD table (docs/results.md, matched safety): the np and sld results of run_mnist.sh (finished
# before its dng part), tabulated on their own. Copies them into a fresh folder and runs dng compare there for
# methods=[np,sld]: every probe and grid point is reused by its fingerprint (nothing is sampled).
set -euo pipefail
cd "$(dirname "$0")/../../../.."
export DNG_NATIVE_BF16=0  # published in fp32: sampler.precision=auto (the default) stays fp32 on every CPU/GPU
src=outputs/issue23/mnist dst=outputs/issue23/mnist_np_sld
mkdir -p "$dst/calibrate" "$dst/eval"
for m in np sld; do
  cp -r "$src/calibrate/$m" "$src/calibrate/$m-0.01" "$src/calibrate/$m-0.003" "$dst/calibrate/"
  cp -r "$src/eval/$m" "$dst/eval/"
done
find "$dst" -name .dng.lock -delete  # the copies' locks name the source run's process
exec dng compare n_samples=1000 pilot_n=300 tolerance=0.5 "methods=[np,sld]" sampler.progress=false hydra.run.dir="$dst"
