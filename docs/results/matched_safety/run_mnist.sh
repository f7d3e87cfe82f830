#!/usr/bin/env bash
# The MNIST matched-safety comparison (issue 23) with the paired-bootstrap procedure: np, sld, dng at 1 % and
# 0.3 % forbidden, N = 1000 shared evaluation seeds, pilot 300, 50 steps. Resumable: re-run to continue.
# When it has finished, copy its compare.json/csv/md and calibrate/*/calibration.json here.
cd "$(dirname "$0")/../../.."
exec nice -n 10 dng compare n_samples=1000 pilot_n=300 tolerance=0.5 sampler.progress=false \
    hydra.run.dir=outputs/issue23/mnist
