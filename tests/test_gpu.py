"""GPU checks, run as a whole in a session that is lent a GPU: `pytest -m gpu tests/test_gpu.py`.
Skipped without CUDA. CUDA sampling equals CPU sampling on the same seeds up to float error (the noise is
drawn on the CPU), the result does not depend on the batch size on CUDA, and scripts/bench_sampler.py times
the sampler on CUDA (`-s` prints its table)."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
BASE = ["model=mnist", "n_samples=64", "sampler.steps=10", "sampler.progress=false", "method=dng"]


def _images(compose, tmp_path, name, extra):
    import numpy as np

    from dng_cli.commands import evaluate

    m = evaluate.run(compose("evaluate", BASE + extra), tmp_path / name)
    with np.load(tmp_path / name / "samples.npz") as f:
        return m, f["images"].astype(int)


def test_cuda_sampling_equals_cpu_sampling(compose, tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cpu, a = _images(compose, tmp_path, "cpu", ["sampler.device=cpu"])
    gpu, b = _images(compose, tmp_path, "gpu", ["sampler.device=cuda"])
    assert gpu["sampled_on"].startswith("cuda") and cpu["sampled_on"] == "cpu"
    assert abs(a - b).max() <= 2  # uint8 levels: float error through 10 steps
    assert (a != b).mean() < 0.01
    assert gpu["histogram_counts"] == cpu["histogram_counts"] or sum(
        abs(x - y) for x, y in zip(gpu["histogram_counts"], cpu["histogram_counts"])) <= 2


def test_batch_size_does_not_change_cuda_samples(compose, tmp_path):
    _, a = _images(compose, tmp_path, "b64", ["sampler.device=cuda", "sampler.batch_size=64"])
    _, b = _images(compose, tmp_path, "b16", ["sampler.device=cuda", "sampler.batch_size=16"])
    assert abs(a - b).max() <= 1


def test_cuda_throughput_benchmark(tmp_path):
    """The CUDA throughput table: scripts/bench_sampler.py on CUDA at batch 1000 (one network call per step) —
    its printed table is the README's GPU performance table; here it must run and time the cases on CUDA."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_sampler.py"
    res = subprocess.run([sys.executable, str(script), "--device", "cuda", "--batch", "1000", "--max-batch", "0",
                          "--steps", "20", "--repeats", "2", "--no-compile"], capture_output=True, text=True,
                         timeout=900)
    print(res.stdout)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["device"].startswith("cuda") and out["batch"] == 1000
    assert out["dng_over_np"] == pytest.approx(out["images_per_s"]["np"] / out["images_per_s"]["dng"])
