#!/usr/bin/env bash
# The "Several forbidden classes at once" table of docs/results.md: forbid 0, 6 and 8 on the shipped MNIST model,
# N = 100, 50 steps, seeds 0..99 shared by every row. Resumable (finished points are skipped). Then the metrics.json
# files (no samples) are copied here and `dng report` tabulates them; tests/test_docs.py regenerates the table.
set -euo pipefail
cd "$(dirname "$0")/../../.."
export DNG_NATIVE_BF16=0  # published in fp32: sampler.precision=auto (the default) stays fp32 on every CPU/GPU
out=outputs/multirun/multiclass_cpu
nice -n 10 dng evaluate -m "method=np,sld" "forbidden=[0,6,8]" n_samples=100 sampler.steps=50 sampler.progress=false hydra.sweep.dir=$out
nice -n 10 dng evaluate -m method=dng_fewstep "forbidden=[0,6,8]" method.prior=0.2 n_samples=100 sampler.steps=50 sampler.progress=false hydra.sweep.dir=$out
here=docs/results/several_classes
(cd $out && find . -name metrics.json) | while read -r f; do mkdir -p "$here/$(dirname "$f")" && cp "$out/$f" "$here/$f"; done
dng report $here
