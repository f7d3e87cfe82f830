#!/usr/bin/env bash
# Issue 44's second headline compare, pre-registered in docs/results.md ("Pre-registered: the Fashion-MNIST headline")
# before any of its samples: Fashion-MNIST, remove Shirt (6), target 3 %, primary metric band-averaged KL kept (FID
# secondary), NP, SLD and CCFG (tau 0.05, the pilot rule's choice on this model, scripts/ccfg_tau.py, as in
# run_fashion.sh) each against DNG; N = 4000 shared evaluation seeds per grid point (dng plan
# docs/results/matched_safety/fashion: sigma_1 0.69-0.97, 80 % power for an effect of 0.05 with 3 primary claims needs
# 1965-3949). fp32 on ONNX Runtime, pinned as the MNIST headline's. Resumable over sessions; it starts after the MNIST
# headline (one CPU budget). Save progress: save_progress.sh outputs/issue44/headline_fashion
# docs/results/matched_safety/headline_fashion_progress; when finished: collect.sh outputs/issue44/headline_fashion
# docs/results/matched_safety/headline_fashion
set -euo pipefail
cd "$(dirname "$0")/../../.."
export DNG_NATIVE_BF16=0
if [ ! -d outputs/issue44/headline_fashion ] && [ -d docs/results/matched_safety/headline_fashion_progress ]; then
    mkdir -p outputs/issue44 && cp -r docs/results/matched_safety/headline_fashion_progress outputs/issue44/headline_fashion
fi
exec nice -n 10 dng compare dataset=fashion_mnist model=fashion_mnist "forbidden=[6]" "methods=[np,sld,ccfg,dng]" \
    "targets=[0.03]" "method_overrides={ccfg:{tau:0.05}}" n_samples=4000 pilot_n=300 sampler.backend=onnxruntime \
    tolerance=0.5 sampler.progress=false hydra.run.dir=outputs/issue44/headline_fashion
