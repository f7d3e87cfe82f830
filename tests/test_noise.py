"""Samples depend on their seeds only: all noise comes from per-seed CPU generators, moved to the device."""

import json

import pytest
import torch

from dng_cli import RunRefused, sampler
from dng_cli.sampler import randn


def test_noise_rows_come_from_their_own_seed_whatever_the_batch():
    seeds = [3, 11, 7, 0]
    alone = [torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(s)) for s in seeds]
    batch = randn((4, 1, 4, 4), [torch.Generator().manual_seed(s) for s in seeds], device="cpu")
    assert all(torch.equal(batch[j], alone[j]) for j in range(4))
    assert torch.equal(randn((2, 1, 4, 4), [torch.Generator().manual_seed(s) for s in seeds[2:]], device="cpu"), batch[2:])


def test_generators_are_on_the_cpu_whatever_the_sampling_device(monkeypatch):
    """sampler.generate hands the sampler CPU generators even for another device (here 'meta'), and draws
    x_T on them: the noise of a CUDA run is the CPU run's noise, moved."""
    seen = {}

    def fake_sample(eps_fn, schedule, guidance, x_T, generator=None, **kwargs):
        seen["gens"], seen["x_T"] = generator, x_T
        return None

    monkeypatch.setattr(sampler, "sample", fake_sample)
    setup = sampler.SamplingSetup(None, None, None, (1, 4, 4), torch.device("meta"), "small")
    sampler.generate(setup, [5, 6])
    assert all(g.device.type == "cpu" for g in seen["gens"]) and seen["x_T"].device.type == "meta"
    first = torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(randn((2, 1, 4, 4), [torch.Generator().manual_seed(s) for s in (5, 6)], device="cpu")[0], first)


def test_batch_size_does_not_change_the_samples(compose, tmp_path):
    from dng_cli.commands import evaluate

    base = ["model=tiny_random", "n_samples=5", "sampler.steps=3", "sampler.progress=false", "method=dng"]
    a = evaluate.run(compose("evaluate", base + ["sampler.batch_size=5"]), tmp_path / "a")
    b = evaluate.run(compose("evaluate", base + ["sampler.batch_size=2", "sampler.max_batch=3"]), tmp_path / "b")
    import numpy as np

    with np.load(tmp_path / "a" / "samples.npz") as fa, np.load(tmp_path / "b" / "samples.npz") as fb:
        assert np.array_equal(fa["images"], fb["images"])
    assert a["fingerprint"] == b["fingerprint"] and a["sampled_on"] == "cpu" and a["noise"] == "cpu-generators"


def test_a_result_drawn_with_gpu_side_noise_is_not_reused(compose, tmp_path):
    """A metrics.json of a CUDA run made before the noise moved to CPU generators (no "noise" marker) has
    the same fingerprint as a run now, but not the same samples: refused, not skipped."""
    from dng_cli.commands import evaluate

    cfg = compose("evaluate", ["model=tiny_random", "n_samples=3", "sampler.steps=1", "sampler.progress=false"])
    out = tmp_path / "run"
    m = evaluate.run(cfg, out)
    old = {k: v for k, v in m.items() if k not in ("noise", "sampled_on")}
    old["config"]["sampler"]["device"] = "cuda"
    (out / "metrics.json").write_text(json.dumps(old))
    with pytest.raises(RunRefused, match="sampled on cuda with noise drawn there"):
        evaluate.run(cfg, out)
    old["config"]["sampler"]["device"] = "cpu"  # a CPU run of then: the same noise as now
    (out / "metrics.json").write_text(json.dumps(old))
    assert evaluate.run(cfg, out)["fingerprint"] == m["fingerprint"]
