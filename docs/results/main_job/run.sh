#!/usr/bin/env bash
# The main-job table of docs/results.md ("What the main job shows"): the shipped MNIST model at `dng evaluate`'s
# defaults and the variations around them, seeds 0..N-1 shared by every row. Resumable (finished runs are skipped).
# Then `dng report` tabulates them and the metrics.json files (no samples) are copied here; tests/test_docs.py
# regenerates the published table from these files.
set -euo pipefail
cd "$(dirname "$0")/../../.."
export DNG_NATIVE_BF16=0  # published in fp32: sampler.precision=auto (the default) stays fp32 on every CPU/GPU
out=outputs/main_job
run() { name=$1; shift; nice -n 10 dng evaluate "$@" sampler.progress=false hydra.run.dir=$out/$name; }
run unguided method=none
run dng method=dng
run dng_n500 method=dng n_samples=500
run dng_scale3 method=dng method.guidance_scale=3
run dng_scale30 method=dng method.guidance_scale=30
run dng_official_readme method=dng_official_readme
run dng_official_cli method=dng_official_cli
run dng_detector method=dng method.guidance_scale=0
run dng_steps100 method=dng sampler.steps=100
run dng_steps250 method=dng sampler.steps=250
for d in $out/*/; do
  name=$(basename "$d")
  mkdir -p docs/results/main_job/$name && cp "$d/metrics.json" docs/results/main_job/$name/
done
dng report docs/results/main_job
