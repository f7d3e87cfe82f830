#!/usr/bin/env bash
# Issue 44's headline compare, pre-registered in docs/results.md ("Pre-registered: the headline compare") before any
# of its samples: MNIST, remove 0, target 1 %, primary metric band-averaged KL kept (FID secondary), NP, SLD and CCFG
# (tau 0.025, the pilot rule's, scripts/ccfg_tau.py) each against DNG; N = 2600 shared evaluation seeds per grid
# point (dng plan: 80 % power for an effect of 0.05 with 3 primary claims at sigma_1 0.75-0.79). fp32 on ONNX
# Runtime, pinned (not auto): the backend is part of a result's identity (docs/performance.md), so every session,
# on whatever machine, resumes the same grid points. Resumable: re-run to continue; it runs over several sessions. When finished: collect.sh outputs/issue44/headline_mnist docs/results/matched_safety/headline_mnist
set -euo pipefail
cd "$(dirname "$0")/../../.."
export DNG_NATIVE_BF16=0
# a new machine starts without outputs/: resume from the finished units committed so far (save_progress.sh)
if [ ! -d outputs/issue44/headline_mnist ] && [ -d docs/results/matched_safety/headline_mnist_progress ]; then
    mkdir -p outputs/issue44 && cp -r docs/results/matched_safety/headline_mnist_progress outputs/issue44/headline_mnist
fi
exec nice -n 10 dng compare "methods=[np,sld,ccfg,dng]" "targets=[0.01]" "method_overrides={ccfg:{tau:0.025}}" \
    n_samples=2600 pilot_n=300 sampler.backend=onnxruntime tolerance=0.5 sampler.progress=false hydra.run.dir=outputs/issue44/headline_mnist
