#!/usr/bin/env bash
# Contrastive CFG against DNG at matched safety on MNIST (issue 28): methods ccfg and dng, target 1 %, N = 500 shared
# evaluation seeds (0..499), pilot 300, 50 steps, tolerance 0.5 — N and the single target chosen for a 2-core CPU
# session (≈ 75 min on 2 quiet AVX2 cores). ccfg's τ is its paper's 0.2 carried to 1×28×28 by the stated dimension rule (τ̂ = τ·16384/D),
# fixed before any run. DNG's pilot probes are the committed ones of run_mnist.sh (same pilot seeds, same
# fingerprints, so they are reused, not re-sampled); everything else is sampled here. Resumable: re-run to continue.
# When it has finished, copy its compare.* , calibrate/*/calibration.json, metrics.json and records.npz files to
# mnist_ccfg/ here (records.npz: each seed's class and classifier features, so a later compare can add methods).
set -euo pipefail
cd "$(dirname "$0")/../../.."
export DNG_NATIVE_BF16=0  # published in fp32: sampler.precision=auto (the default) stays fp32 on every CPU/GPU
dst=outputs/issue28/mnist_ccfg
docs/results/matched_safety/reuse.sh docs/results/superseded/matched_safety/mnist "$dst" calibrate/dng
exec nice -n 10 dng compare "methods=[ccfg,dng]" "targets=[0.01]" n_samples=500 pilot_n=300 tolerance=0.5 \
    sampler.progress=false hydra.run.dir="$dst"
