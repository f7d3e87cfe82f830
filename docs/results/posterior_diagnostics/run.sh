#!/usr/bin/env bash
# The offline posterior replays behind docs/method.md ("DNG's low-rate plateau and method=dng_hold"): one unguided
# 50-step chain of N = 200 on the shipped MNIST model (seeds 0..199), every setting replayed on it; ~5 min on
# 2 CPU cores. The analytic mixture (exact scores, seconds) beside it.
set -euo pipefail
cd "$(dirname "$0")/../../.."
python scripts/posterior_diagnostics.py --model mnist --n 200 --steps 50 --threads 1 --out outputs/posterior_diagnostics
python scripts/posterior_diagnostics.py --model gmm --steps 50 --out outputs/posterior_diagnostics
cp outputs/posterior_diagnostics/posterior_diagnostics_{mnist,gmm}.{md,json} docs/results/posterior_diagnostics/
