#!/usr/bin/env bash
# The Fashion-MNIST matched-safety comparison (issues 23 and 28) with the current procedure: np, sld, dng and ccfg,
# remove Shirt (6), targets 3 % and 1 % (the classifier's floor is ~2.3 %), N = 500 shared evaluation seeds (as the
# MNIST ccfg compare; 1000 would take ~7 h here: ~8 grid points per method at ~11 min each), pilot 300, 50 steps.
# CCFG at τ 0.05, the pilot rule's choice on this model (scripts/ccfg_tau.py: the τ whose weight best separates
# unguided pilot chains that end as Shirt from the others; its paper's 0.2 by the dimension rule gives half that
# separation), set before any guided run of it.
# Resumable: re-run to continue. 4.9 h of sampling on 2 CPU cores summed over its metrics.json (30 grid points 3.0 h,
# 23 pilot probes 1.9 h), spread over three sessions; the files behind the table are in fashion/ here (tests/test_docs.py re-runs the compare on a copy). On a GPU add
# `sampler.device=cuda sampler.batch_size=1000 sampler.max_batch=2000`. When it has finished, copy the files behind
# the table to fashion/ here: docs/results/matched_safety/collect.sh outputs/issue23/fashion docs/results/matched_safety/fashion
set -euo pipefail
cd "$(dirname "$0")/../../.."
export DNG_NATIVE_BF16=0  # published in fp32: sampler.precision=auto (the default) stays fp32 on every CPU/GPU
exec nice -n 10 dng compare dataset=fashion_mnist model=fashion_mnist "forbidden=[6]" "methods=[np,sld,dng,ccfg]" \
    "targets=[0.03,0.01]" "method_overrides={ccfg:{tau:0.05}}" n_samples=500 pilot_n=300 tolerance=0.5 sampler.progress=false \
    hydra.run.dir=outputs/issue23/fashion
