#!/usr/bin/env bash
# The "MNIST, remove digit 0 (the paper's protocol, CPU-sized)" table of docs/results.md: the experiment's 15 points
# with the legacy dng_fewstep preset, N = 120, 50 steps, seeds 0..119 shared by every point. Resumable. Then the
# metrics.json files (no samples) are copied here and `dng report` tabulates them; tests/test_docs.py regenerates
# the table from these files.
set -euo pipefail
cd "$(dirname "$0")/../../.."
export DNG_NATIVE_BF16=0  # published in fp32: sampler.precision=auto (the default) stays fp32 on every CPU/GPU
out=outputs/multirun/mnist_paper_cpu
nice -n 10 dng evaluate -m experiment=mnist_paper n_samples=120 sampler.steps=50 sampler.progress=false \
  method=np,sld,dng_fewstep hydra.sweep.dir=$out
here=docs/results/paper_protocol
(cd $out && find . -name metrics.json) | while read -r f; do mkdir -p "$here/$(dirname "$f")" && cp "$out/$f" "$here/$f"; done
dng report $here
