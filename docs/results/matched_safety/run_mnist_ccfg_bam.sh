#!/usr/bin/env bash
# CCFG (tau 0.2 by the dimension rule) against DNG at matched safety on MNIST, 1 %, N = 500, under the band-averaged
# procedure of issue 41: the committed grids of mnist_ccfg (ccfg, dng) and mnist_hold (dng's points up to lambda 505),
# same seeds and fingerprints, are the starting grid (grid=extend); the compare adds only the points that bracket the
# band [0.5 %, 2 %] and fill its gaps to grid_max_ratio 1.5. Resumable: re-run to continue. When it has finished:
# collect.sh outputs/issue41/mnist_ccfg docs/results/matched_safety/mnist_ccfg_bam
set -euo pipefail
cd "$(dirname "$0")/../../.."
export DNG_NATIVE_BF16=0  # published in fp32: sampler.precision=auto (the default) stays fp32 on every CPU/GPU
dst=outputs/issue41/mnist_ccfg
src=docs/results/matched_safety
"$src/reuse.sh" "$src/mnist_hold" "$dst" calibrate/dng calibrate/dng-0.01 eval/dng
"$src/reuse.sh" "$src/mnist_ccfg" "$dst" calibrate/ccfg calibrate/ccfg-0.01 eval/ccfg "eval/dng/scale=13.8"
exec nice -n 10 dng compare "methods=[ccfg,dng]" "targets=[0.01]" n_samples=500 pilot_n=300 tolerance=0.5 grid=extend \
    sampler.progress=false hydra.run.dir="$dst"
