#!/usr/bin/env bash
# Issue 44's at-risk strata: the unguided chains of seeds 0..1999 (the compares' evaluation seeds 0..499 and more),
# MNIST (forbidden 0) and Fashion-MNIST (forbidden 6), 50 steps, fp32; records.npz marks each seed's final class.
# Resumable. Then: python scripts/stratified_rate.py (see docs/results.md, "Stratified at-risk seeds").
set -euo pipefail
cd "$(dirname "$0")/../../.."
export DNG_NATIVE_BF16=0
out=outputs/issue44
dng evaluate method=none n_samples=2000 sampler.progress=false hydra.run.dir=$out/unguided_mnist
dng evaluate method=none n_samples=2000 dataset=fashion_mnist model=fashion_mnist "forbidden=[6]" sampler.progress=false \
  hydra.run.dir=$out/unguided_fashion
