#!/usr/bin/env bash
# The MNIST matched-safety comparison (issue 23) with the paired-bootstrap procedure: np, sld, dng at 1 % and
# 0.3 % forbidden, N = 1000 shared evaluation seeds, pilot 300, 50 steps. Resumable: re-run to continue.
# When it has finished, copy its compare.json/csv/md and calibrate/*/calibration.json here.
cd "$(dirname "$0")/../../.."
export DNG_NATIVE_BF16=0  # published in fp32: sampler.precision=auto (the default) stays fp32 on every CPU/GPU
exec nice -n 10 dng compare n_samples=1000 pilot_n=300 tolerance=0.5 sampler.progress=false \
    hydra.run.dir=outputs/issue23/mnist
