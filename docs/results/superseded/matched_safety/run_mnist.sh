#!/usr/bin/env bash
# SUPERSEDED (docs/changelog.md): made by the procedure before issue 41 (grid_factors, Holm, the band fallback); the
# current dng compare places its grid by rate and analyses the band-averaged estimand, so re-running this samples
# a different grid. Its grid points kept no records.npz, so it cannot be re-analysed: kept as the record only.
# The MNIST matched-safety comparison (issue 23) with the paired-bootstrap procedure: np, sld, dng at 1 % and
# 0.3 % forbidden, N = 1000 shared evaluation seeds, pilot 300, 50 steps. Resumable: re-run to continue.
# When it has finished, copy its compare.json/csv/md and calibrate/*/calibration.json here.
cd "$(dirname "$0")/../../../.."
export DNG_NATIVE_BF16=0  # published in fp32: sampler.precision=auto (the default) stays fp32 on every CPU/GPU
exec nice -n 10 dng compare n_samples=1000 pilot_n=300 tolerance=0.5 sampler.progress=false \
    hydra.run.dir=outputs/issue23/mnist
