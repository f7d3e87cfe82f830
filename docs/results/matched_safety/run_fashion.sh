#!/usr/bin/env bash
# The Fashion-MNIST matched-safety comparison (issues 23 and 28) with the current procedure: np, sld, dng and ccfg,
# remove Shirt (6), targets 3 % and 1 % (the classifier's floor is ~2.3 %), N = 1000 shared evaluation seeds,
# pilot 300, 50 steps. Resumable: re-run to continue. ~6 h on 2 CPU cores; on a GPU add
# `sampler.device=cuda sampler.batch_size=1000 sampler.max_batch=2000`. When it has finished, copy its
# compare.json/csv/md/png and calibrate/*/calibration.json (+ the metrics.json files) to fashion/ here.
cd "$(dirname "$0")/../../.."
exec nice -n 10 dng compare dataset=fashion_mnist model=fashion_mnist "forbidden=[6]" "methods=[np,sld,dng,ccfg]" \
    "targets=[0.03,0.01]" n_samples=1000 pilot_n=300 tolerance=0.5 sampler.progress=false \
    hydra.run.dir=outputs/issue23/fashion
