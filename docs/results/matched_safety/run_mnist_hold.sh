#!/usr/bin/env bash
# DNG's low-rate variant at matched safety on MNIST (issue 28): methods dng and dng_hold (hold 0.5, fixed before any
# run), targets 1 % and 0.3 %, N = 500 shared evaluation seeds (0..499), pilot 300, 50 steps, tolerance 0.5 -- the
# settings of run_mnist_ccfg.sh, so dng's pilot probes and its 1 % grid points are that run's committed files (same
# seeds, same fingerprints: reused, not re-sampled); dng's 0.3 % points and everything of dng_hold are sampled here.
# Resumable: re-run to continue. When it has finished: collect.sh outputs/issue28/mnist_hold docs/results/matched_safety/mnist_hold
set -euo pipefail
cd "$(dirname "$0")/../../.."
export DNG_NATIVE_BF16=0  # published in fp32: sampler.precision=auto (the default) stays fp32 on every CPU/GPU
dst=outputs/issue28/mnist_hold
docs/results/matched_safety/reuse.sh docs/results/matched_safety/mnist_ccfg "$dst" calibrate/dng eval/dng
exec nice -n 10 dng compare "methods=[dng_hold,dng]" "targets=[0.01,0.003]" n_samples=500 pilot_n=300 tolerance=0.5 \
    sampler.progress=false hydra.run.dir="$dst"
