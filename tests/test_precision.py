"""sampler.precision: fp32 is bit for bit what every earlier run drew; bf16 autocasts the network only and is its
own result; auto falls back to fp32 without native bf16 or for a method the paired table has not cleared."""

import numpy as np
import pytest
import torch

from dng_cli import UserError, models, spec
from dng_cli.commands import evaluate

BASE = ["model=tiny_random", "n_samples=8", "sampler.steps=3", "sampler.batch_size=4", "sampler.progress=false",
        "method=np", "method.guidance_scale=2"]


def _run(compose, folder, extra):
    m = evaluate.run(compose("evaluate", BASE + extra), folder)
    with np.load(folder / "samples.npz") as f:
        return m, f["images"]


def test_fp32_is_bit_for_bit_the_run_without_the_key(compose, tmp_path):
    a, ia = _run(compose, tmp_path / "fp32", ["sampler.precision=fp32"])
    b, ib = _run(compose, tmp_path / "none", ["~sampler.precision"])
    assert np.array_equal(ia, ib) and a["fingerprint"] == b["fingerprint"] and a["precision"] == "fp32"
    assert "sampler.precision" not in dict(spec.resolve_run(compose("evaluate", BASE)).identity)
    # the shipped default, auto, is that same result where it resolves to fp32 (no native bf16: the suite's setting)
    assert compose("evaluate", BASE).sampler.precision == "auto"
    c, ic = _run(compose, tmp_path / "default", [])
    assert np.array_equal(ia, ic) and c["fingerprint"] == a["fingerprint"] and c["precision"] == "fp32"
    assert c["config"]["sampler"]["precision"] == "fp32"  # the result records the precision used, not "auto"


def test_bf16_autocasts_the_network_and_is_its_own_result(compose, tmp_path):
    a, ia = _run(compose, tmp_path / "fp32", [])
    b, ib = _run(compose, tmp_path / "bf16", ["sampler.precision=bf16"])
    assert b["precision"] == "bf16" and b["fingerprint"] != a["fingerprint"]
    assert not np.array_equal(ia, ib)  # bf16 network outputs differ ...
    assert np.abs(ia.astype(int) - ib.astype(int)).mean() < 8  # ... by rounding, not by another chain
    with pytest.raises(UserError, match="made by another config|another config"):  # never reused as the fp32 result
        evaluate.run(compose("evaluate", BASE + ["sampler.precision=bf16"]), tmp_path / "fp32")


def test_the_network_output_stays_float32(compose):
    net = models.Network(models.build_unet(dict(compose("evaluate", BASE).model.unet), seed=0).eval(), precision="bf16")
    x = torch.randn(2, 1, 28, 28)
    with torch.inference_mode():
        out = net(x, torch.tensor([10, 500]), torch.tensor([10, 0]))
        ref = models.Network(net.unet, precision="fp32")(x, torch.tensor([10, 500]), torch.tensor([10, 0]))
    assert out.dtype == torch.float32 and not torch.equal(out, ref)
    assert (out - ref).norm() / ref.norm() < 0.05


def test_auto_falls_back_to_fp32(compose, monkeypatch):
    cfg = compose("evaluate", BASE + ["sampler.precision=auto"])
    monkeypatch.setattr(spec, "native_bf16", lambda device: False)
    assert spec.precision_for(cfg.sampler, cfg.method.name) == "fp32"
    monkeypatch.setattr(spec, "BF16_CLEARED", frozenset({"np"}))
    assert spec.precision_for(cfg.sampler, cfg.method.name) == "fp32"  # no native bf16: fp32 even for a cleared method
    monkeypatch.setattr(spec, "native_bf16", lambda device: True)
    assert spec.precision_for(cfg.sampler, cfg.method.name) == "bf16"
    assert dict(spec.resolve_run(cfg).identity)["sampler.precision"] == "bf16"
    monkeypatch.setattr(spec, "BF16_CLEARED", frozenset())
    assert spec.precision_for(cfg.sampler, cfg.method.name) == "fp32"  # native bf16, but the method is not cleared


def test_an_unknown_precision_is_one_line(compose):
    with pytest.raises(UserError, match="sampler.precision='fp16' is invalid: allowed are fp32, bf16, auto"):
        evaluate.check_cfg(compose("evaluate", BASE + ["sampler.precision=fp16"]))


def test_memory_format_auto_is_nchw_only_for_bf16_on_a_cpu(compose):
    from dng_cli import spec

    def layout(*extra):
        return spec.sampler_spec(compose("evaluate", BASE + list(extra)).sampler, "np").channels_last

    assert layout() is True  # the shipped default (auto) at fp32: NHWC, as before
    assert layout("sampler.precision=bf16") is False
    assert layout("sampler.precision=bf16", "sampler.channels_last=true") is True  # an explicit choice is kept
    assert layout("sampler.channels_last=false") is False
    assert spec.channels_last_for("auto", "bf16", "cuda") is True
    with pytest.raises(UserError, match="sampler.channels_last='nhwc' is invalid: it must be true, false or auto"):
        evaluate.check_cfg(compose("evaluate", BASE + ["sampler.channels_last=nhwc"]))


def test_a_compare_decides_auto_once_for_all_its_methods(compose, monkeypatch):
    """A compare never mixes precisions: auto is bf16 only where every compared method would be bf16."""
    from dng_cli.commands import compare

    tiny = ["model=tiny_random", "sampler.precision=auto"]
    monkeypatch.setattr(spec, "native_bf16", lambda device: True)
    monkeypatch.setattr(spec, "BF16_CLEARED", frozenset({"np", "dng"}))
    assert compare.one_precision(compose("compare", tiny + ["methods=[np,dng]"])).sampler.precision == "bf16"
    assert compare.one_precision(compose("compare", tiny + ["methods=[np,sld,dng]"])).sampler.precision == "fp32"
    fixed = compose("compare", tiny[:1] + ["methods=[np,sld]", "sampler.precision=bf16"])
    assert compare.one_precision(fixed).sampler.precision == "bf16"  # an explicit precision is kept
    # with a launcher the nodes' hardware is unknown here: auto is fp32, an explicit bf16 is kept
    assert compare.one_precision(compose("compare", tiny + ["methods=[np,dng]"]), launcher=True).sampler.precision == "fp32"
    assert compare.one_precision(fixed, launcher=True).sampler.precision == "bf16"
    monkeypatch.setattr(spec, "native_bf16", lambda device: False)
    assert compare.one_precision(compose("compare", tiny + ["methods=[np,dng]"])).sampler.precision == "fp32"


def test_dng_native_bf16_overrides_the_cpu_check(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("DNG_NATIVE_BF16", "1")
    assert spec.native_bf16(cpu) is True
    monkeypatch.setattr(spec, "BF16_CLEARED", frozenset({"np"}))
    assert spec.resolve_precision("auto", cpu, "np") == "bf16"
    monkeypatch.setenv("DNG_NATIVE_BF16", "0")
    assert spec.native_bf16(cpu) is False and spec.resolve_precision("auto", cpu, "np") == "fp32"
    monkeypatch.setenv("DNG_NATIVE_BF16", "yes")
    with pytest.raises(UserError, match="DNG_NATIVE_BF16='yes' is invalid: 0 or 1"):
        spec.native_bf16(cpu)
