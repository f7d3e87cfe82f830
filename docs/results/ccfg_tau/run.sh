#!/usr/bin/env bash
# Issue 28: Contrastive CFG's τ chosen on the pilot seeds (1000000…1000299, unguided chains, 50 steps) by the rule in
# scripts/ccfg_tau.py, once per shipped model, before any guided CCFG run at that τ. ≈ 3.5 min each on 2 idle cores.
set -euo pipefail
cd "$(dirname "$0")/../../.."
for ds in mnist fashion_mnist; do
  python scripts/ccfg_tau.py --dataset $ds --out docs/results/ccfg_tau | tail -1 > /dev/null
done
