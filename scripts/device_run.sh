#!/bin/bash
# The GPU measurements of one `device` lease (H100/H200), as one script: the CUDA path of `dng evaluate`,
# issue 13's matched-safety comparison on MNIST at N = 2000, and the Fashion-MNIST model check, one more
# training segment, and its comparison (issue 16). Every stage writes a log and a .tgz of its run folder to
# $OUT, so a stage cut off by the time limit loses only itself.
#
# Prepared here (ignored folder .gpu, named in `carry`):
#   .gpu/site.tgz   the pure-Python packages the device image lacks (hydra, omegaconf, antlr4, diffusers,
#                   importlib_metadata; the image's huggingface_hub is used), from this machine's site-packages
#   .gpu/fashion/   the four Fashion-MNIST idx files, gzipped (`dng data fashion_mnist` output)
# Run:  device run  "bash scripts/device_run.sh"  carry=[.gpu]
# Afterwards, on the CPU: Inception FID is added to the returned runs from their samples.npz (the device
# carries no Inception weights): `dng compare ... metrics.fid.features=inception hydra.run.dir=<returned dir>`.
set -u -o pipefail
OUT=${OUT:-outputs/device}
R=${R:-outputs/device_runs}
rm -rf /tmp/site; mkdir -p "$OUT" "$R" /tmp/site   # a warm machine keeps an earlier call's /tmp
export PYTHONUNBUFFERED=1 DNG_DATA=$PWD/data
exec > >(tee -a "$OUT/log.txt") 2>&1

tar -xzf .gpu/site.tgz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD || exit 1
[ -e dng_cli/configs ] || ln -s ../configs dng_cli/configs   # what pip install -e . maps
mkdir -p data/FashionMNIST/raw
for f in .gpu/fashion/*.gz; do gunzip -c "$f" > "data/FashionMNIST/raw/$(basename "$f" .gz)"; done
mkdir -p /tmp/site/bin && printf '#!/bin/sh\nexec python3 -c "import sys; sys.argv[0] = \\"dng\\"; from dng_cli.cli import main; main()" "$@"\n' > /tmp/site/bin/dng
chmod +x /tmp/site/bin/dng && export PATH=/tmp/site/bin:$PATH   # the console script pip would make
want() { [[ " ${STAGES:-all} " == *" all "* || " ${STAGES:-} " == *" $1 "* ]]; }   # STAGES="issue13 ...": rerun some
stage() { echo "=== $(date +%T) $*"; }
pack() { tar -czf "$OUT/$1.tgz" --exclude=checkpoint -C "$R" "${@:2}" 2>/dev/null; ls -la "$OUT/$1.tgz"; }
DEV=${DEV:-cuda}   # sizes below are the lease's; a local dry run shrinks them (DEV=cpu N13=40 ...)
N13=${N13:-2000} PILOT=${PILOT:-500} NF=${NF:-1000} TRAIN=${TRAIN:-4000} UNG=${UNG:-10000} PER=${PER:-200} ST=${ST:-50}
GPU="sampler.device=$DEV sampler.batch_size=1000 sampler.max_batch=2000 sampler.progress=false sampler.steps=$ST"

stage "smoke"
cat /tmp/site/bin/dng
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, hydra, diffusers; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "hydra", hydra.__version__, "diffusers", diffusers.__version__)' || exit 1
# The README's main job, on CUDA (its CPU default otherwise): 200 samples, 50 steps, DNG, forbid 0.
SECONDS=0
if want cuda_default; then
  timeout 60 dng evaluate --method=dng sampler.device=$DEV sampler.steps=$ST hydra.run.dir=$R/cuda_default || exit 1
  echo "cuda default evaluate: ${SECONDS}s wall"
  pack cuda_default cuda_default
fi

stage "issue 13: dng compare at 1 % and 0.3 %, N = 2000, pilot 500"
SECONDS=0
want issue13 && timeout 240 dng compare n_samples=$N13 pilot_n=$PILOT $GPU hydra.run.dir=$R/issue13
echo "issue13 compare: rc $? ${SECONDS}s wall"
want issue13 && pack issue13 issue13

stage "issue 16: the shipped Fashion-MNIST DDPM, N = 10000 unguided"
CHECK="--dataset fashion_mnist --per-class $PER --unguided $UNG --steps $ST --device $DEV --batch 1000"
SECONDS=0
want fashion_check && timeout 90 python3 scripts/check_assets.py $CHECK | tee $R/check_shipped.txt
[ -s $R/check_shipped.txt ] || cp .gpu/check_shipped.txt $R/   # an earlier lease's line
echo "check shipped: ${SECONDS}s"
stage "issue 16: one more cosine segment from the shipped weights"
SECONDS=0
timeout 150 dng train ddpm dataset=fashion_mnist model=fashion_mnist init_from=fashion_mnist lr_schedule=cosine \
  steps=$TRAIN batch_size=128 warmup_steps=100 seed=2 device=$DEV progress=false log_every=250 \
  hydra.run.dir=$R/fashion_ddpm2
echo "train: rc $? ${SECONDS}s"
SECONDS=0
timeout 90 python3 scripts/check_assets.py $CHECK --ddpm $R/fashion_ddpm2/ema | tee $R/check_new.txt
echo "check new: ${SECONDS}s"
pack fashion_model fashion_ddpm2 check_shipped.txt check_new.txt
# The model to measure with: the new one if its unguided KL is lower and its conditional accuracy >= 85 %.
FM=$(python3 - "$R" <<'EOF'
import json, sys
def last(p):
    try:
        return json.loads(open(p).read().strip().splitlines()[-1])
    except Exception:
        return None
old, new = last(f"{sys.argv[1]}/check_shipped.txt"), last(f"{sys.argv[1]}/check_new.txt")
better = new and new["conditional_accuracy"] >= 0.85 and (old is None or new["unguided_kl_uniform"] < old["unguided_kl_uniform"])
print(f"{sys.argv[1]}/fashion_ddpm2/ema" if better else "fashion_mnist")
EOF
)
echo "fashion model: $FM"

stage "issue 16: dng compare at 3 % and 1 %, N = 2000, pilot 500"
SECONDS=0
timeout 150 dng compare dataset=fashion_mnist model=fashion_mnist model.path=$FM "forbidden=[6]" "targets=[0.03,0.01]" \
  n_samples=$N13 pilot_n=$PILOT $GPU hydra.run.dir=$R/fashion_compare
echo "fashion compare: rc $? ${SECONDS}s"
pack fashion_compare fashion_compare

stage "issue 16: the fashion_paper front, N = 1000 per point"
SECONDS=0
timeout 120 dng evaluate -m experiment=fashion_paper model.path=$FM n_samples=$NF $GPU \
  hydra.sweep.dir=$R/fashion_paper
echo "fashion sweep: rc $? ${SECONDS}s"
dng report $R/fashion_paper
pack fashion_paper fashion_paper
stage "done"
