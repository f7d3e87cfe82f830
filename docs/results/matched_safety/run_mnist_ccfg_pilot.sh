#!/usr/bin/env bash
# Contrastive CFG against DNG at matched safety on MNIST with tau chosen by the pilot rule (issue 28): tau 0.025
# (scripts/ccfg_tau.py on the pilot seeds, the rule that chose 0.05 on Fashion-MNIST; run_mnist_ccfg.sh used the
# dimension rule instead), target 1 % (the target of run_mnist_ccfg.sh; one target to fit the session that ran it,
# ≈ 50 min on 2 quiet AVX2 cores -- add 0.003 to targets to extend it: probes and points are reused), N = 500 shared
# evaluation seeds (0..499), pilot 300, 50 steps, tolerance 0.5. dng's probes and grid points are the committed ones of
# run_mnist_ccfg.sh (same seeds and fingerprints: reused, not re-sampled); everything of ccfg is sampled here. Resumable: re-run to continue.
# When it has finished: collect.sh outputs/issue28/mnist_ccfg_pilot docs/results/matched_safety/mnist_ccfg_pilot
set -euo pipefail
cd "$(dirname "$0")/../../.."
export DNG_NATIVE_BF16=0  # published in fp32: sampler.precision=auto (the default) stays fp32 on every CPU/GPU
dst=outputs/issue28/mnist_ccfg_pilot
docs/results/matched_safety/reuse.sh docs/results/matched_safety/mnist_ccfg "$dst" calibrate/dng eval/dng
exec nice -n 10 dng compare "methods=[ccfg,dng]" "targets=[0.01]" "method_overrides={ccfg:{tau:0.025}}" \
    n_samples=500 pilot_n=300 tolerance=0.5 sampler.progress=false hydra.run.dir="$dst"
