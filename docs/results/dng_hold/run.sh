#!/usr/bin/env bash
# method=dng_hold against method=dng at the default λ 10 on the same 500 seeds (issue 28's first guided check; the
# dng run is the main job's dng_n500). Resumable. Then the metrics.json files are copied here and `dng report`
# tabulates them; tests/test_docs.py regenerates the table in docs/results.md from these files.
set -euo pipefail
cd "$(dirname "$0")/../../.."
export DNG_NATIVE_BF16=0  # published in fp32: sampler.precision=auto (the default) stays fp32 on every CPU/GPU
for m in dng dng_hold; do
  nice -n 10 dng evaluate method=$m n_samples=500 sampler.progress=false hydra.run.dir=outputs/issue28/${m}_n500
  mkdir -p docs/results/dng_hold/${m}_n500 && cp outputs/issue28/${m}_n500/metrics.json docs/results/dng_hold/${m}_n500/
done
dng report docs/results/dng_hold
