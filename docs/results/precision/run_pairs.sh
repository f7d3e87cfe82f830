#!/usr/bin/env bash
# Issue 29's paired fp32-vs-bf16 table beyond DNG on MNIST: each method at its calibrated scale, N = 1000, 50 steps,
# seeds 0..999 for both precisions. MNIST (remove 0): np and sld at their λ*(1 %) of the matched-safety compare
# (docs/results/superseded/matched_safety/mnist), ccfg at its own pilot calibration to 1 % (fp32, pilot seeds, tolerance 0.5).
# Fashion-MNIST (remove Shirt): every method calibrated to 3 % the same way. bf16 runs use contiguous memory
# (bf16 contiguous 716 vs channels_last 479 evals/s here; the memory format is not part of a result's identity).
# Resumable (finished evaluations are reused). Writes outputs/issue29/<dataset>_<method>/pairs.json.
set -euo pipefail
cd "$(dirname "$0")/../../.."
export DNG_NATIVE_BF16=0  # published in fp32: sampler.precision=auto (the default) stays fp32 on every CPU/GPU
out=outputs/issue29
pair() {  # dataset method scale [extra overrides...]
  local ds=$1 m=$2 s=$3; shift 3
  for p in bf16 fp32; do
    local cl=true; [ $p = bf16 ] && cl=false
    dng evaluate --method=$m method.guidance_scale=$s n_samples=1000 sampler.precision=$p sampler.channels_last=$cl \
      sampler.progress=false "$@" hydra.run.dir=$out/${ds}_${m}_$p
  done
  mkdir -p $out/${ds}_$m
  python scripts/precision_pairs.py $out/${ds}_${m}_fp32 $out/${ds}_${m}_bf16 --bootstrap 200 | tail -1 > $out/${ds}_$m/pairs.json
}
calibrated() {  # dataset method target [extra overrides...] -> prints scale_star
  local ds=$1 m=$2 t=$3; shift 3
  dng calibrate method=$m target_forbidden=$t tolerance=0.5 max_probes=8 sampler.progress=false "$@" \
    hydra.run.dir=$out/calibrate_${ds}_$m >&2
  python -c "import json,sys; print(json.load(open('$out/calibrate_${ds}_$m/calibration.json'))['scale_star'])"
}
pair mnist np 0.3207
pair mnist sld 0.6608
pair mnist ccfg "$(calibrated mnist ccfg 0.01)"
F=(dataset=fashion_mnist model=fashion_mnist "forbidden=[6]")
for m in dng np sld ccfg; do
  pair fashion $m "$(calibrated fashion $m 0.03 "${F[@]}")" "${F[@]}"
done
