#!/usr/bin/env bash
# fp32 against bf16 for method=dng on MNIST (issue 29's paired check, one method and dataset): N = 1000, 50 steps,
# the same seeds 0..999; then the paired comparison (pairs.json here; 200 bootstrap replicates).
set -euo pipefail
cd "$(dirname "$0")/../../../.."
export DNG_NATIVE_BF16=0  # published in fp32: sampler.precision=auto (the default) stays fp32 on every CPU/GPU
for p in bf16 fp32; do
  dng evaluate --method=dng n_samples=1000 sampler.precision=$p sampler.progress=false hydra.run.dir=outputs/issue29/mnist_dng_$p
done
python scripts/precision_pairs.py outputs/issue29/mnist_dng_fp32 outputs/issue29/mnist_dng_bf16 --bootstrap 200
