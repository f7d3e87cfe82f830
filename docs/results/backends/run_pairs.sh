#!/usr/bin/env bash
# Issue 43's paired table: torch (eager, NHWC) against each graph backend at every row of the precision table
# (docs/results/precision: the same method, dataset and calibrated scale), fp32, N = 1000, 50 steps, seeds 0..999
# for both backends; then scripts/precision_pairs.py per row (pairs.json; 200 paired bootstrap replicates).
# Resumable (finished evaluations are reused). Usage: ROWS="mnist_dng ..." run_pairs.sh [backend ...]
# (default: onnxruntime, every row; the rows of the published table ran in the default order, first to last).
set -euo pipefail
cd "$(dirname "$0")/../../.."
export DNG_NATIVE_BF16=0  # fp32 on every machine: the graph backends run fp32 only
out=outputs/issue43
backends=("${@:-onnxruntime}")
for row in ${ROWS:-mnist_dng fashion_dng mnist_np mnist_sld mnist_ccfg fashion_np fashion_sld}; do
  ref=docs/results/precision/$row/fp32/metrics.json
  read -r method scale <<<"$(python -c "import json; m=json.load(open('$ref')); print(m['method'], m['guidance_scale'])")"
  extra=()
  [[ $row == fashion_* ]] && extra=(dataset=fashion_mnist model=fashion_mnist "forbidden=[6]")
  for b in torch "${backends[@]}"; do
    dng evaluate --method="$method" method.guidance_scale="$scale" n_samples=1000 sampler.precision=fp32 \
      sampler.backend="$b" sampler.progress=false "${extra[@]}" hydra.run.dir=$out/$row/$b
  done
  for b in "${backends[@]}"; do
    python scripts/precision_pairs.py $out/$row/torch $out/$row/$b --bootstrap 200 | tail -1 > $out/$row/pairs-$b.json
  done
done
