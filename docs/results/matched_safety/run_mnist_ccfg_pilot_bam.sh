#!/usr/bin/env bash
# CCFG at the pilot-rule tau 0.025 against DNG at matched safety on MNIST, 1 %, N = 500, under the band-averaged
# procedure of issue 41: DNG's grid is the committed one of mnist_ccfg_bam (already covering the band), CCFG's the
# committed one of mnist_ccfg_pilot; grid=extend adds only what brackets CCFG's band and fills its gaps to 1.5.
# Resumable: re-run to continue. When it has finished:
# collect.sh outputs/issue41/mnist_ccfg_pilot docs/results/matched_safety/mnist_ccfg_pilot_bam
set -euo pipefail
cd "$(dirname "$0")/../../.."
export DNG_NATIVE_BF16=0  # published in fp32: sampler.precision=auto (the default) stays fp32 on every CPU/GPU
dst=outputs/issue41/mnist_ccfg_pilot
src=docs/results/matched_safety
"$src/reuse.sh" "$src/mnist_ccfg_bam" "$dst" calibrate/dng calibrate/dng-0.01 eval/dng
"$src/reuse.sh" "$src/mnist_ccfg_pilot" "$dst" calibrate/ccfg calibrate/ccfg-0.01 eval/ccfg
exec nice -n 10 dng compare "methods=[ccfg,dng]" "targets=[0.01]" "method_overrides={ccfg:{tau:0.025}}" n_samples=500 \
    pilot_n=300 tolerance=0.5 grid=extend sampler.progress=false hydra.run.dir="$dst"
