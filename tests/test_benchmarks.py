"""The benchmark scripts run end to end on tiny settings and print what their callers parse."""

import json
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.e2e


def _last_json(args, tmp_path):
    res = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _tiny_unet(tmp_path):
    """A 2-level UNet with class labels, saved as tmp_path/tiny (a stand-in for the shipped model's shape)."""
    from dng_cli.models import build_unet

    arch = dict(sample_size=28, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(4, 8),
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                norm_num_groups=4, num_class_embeds=11)
    build_unet(arch, seed=0).save_pretrained(tmp_path / "tiny")


def test_bench_sampler_tiny(tmp_path):
    _tiny_unet(tmp_path)
    out = _last_json([str(REPO / "scripts" / "bench_sampler.py"), "--model", str(tmp_path / "tiny"), "--batch", "4",
                      "--steps", "2", "--repeats", "1", "--no-compile", "--threads", "1"], tmp_path)
    ips = out["images_per_s"]  # the ratios are the timed cases' ratios (no timing is asserted)
    assert out["dng_over_np"] == pytest.approx(ips["np"] / ips["dng"])
    assert out["dng_over_raw"] == pytest.approx(ips["raw 2x"] / ips["dng"])
    assert out["speedup_vs_reference_eager"] == pytest.approx(ips["dng"] / ips["reference"])
    assert out["device"] == "cpu" and set(out["bookkeeping_ms_per_step"]) == {"none", "np", "sld", "dng"}


def test_bench_precision_tiny(tmp_path):
    """scripts/bench_precision.py: every precision x memory format case, and the native-bf16 check `auto` uses."""
    from dng_cli.spec import native_bf16

    _tiny_unet(tmp_path)
    out = _last_json([str(REPO / "scripts" / "bench_precision.py"), "--model", str(tmp_path / "tiny"), "--batch", "4",
                      "--max-batch", "2", "--seconds", "0.01", "--repeats", "1", "--threads", "1"], tmp_path)
    assert set(out["evals_per_s"]) == {"fp32/contiguous", "fp32/channels_last", "bf16/contiguous", "bf16/channels_last"}
    assert all(v > 0 for v in out["evals_per_s"].values())
    assert out["native_bf16"] == native_bf16("cpu")


def test_bench_steps_tiny(tmp_path):
    out = _last_json([str(REPO / "scripts" / "bench_steps.py"), "--n", "2", "--steps", "2,50", "--methods", "np",
                      "--out", str(tmp_path / "bs")], tmp_path)
    assert [r["steps"] for r in out["rows"]] == [2, 50]
    assert set(out["within_10pct_at_50"]["np"]) == {"kl_uniform", "fid", "kl_within_2se", "forbidden_rate_ci_overlap"}
    assert all(r["kl_uniform_se"] >= 0 for r in out["rows"])
    assert (tmp_path / "bs" / "bench_steps.md").is_file() and (tmp_path / "bs" / "bench_steps.png").is_file()
    (tmp_path / "bs" / "np-2" / "samples.png").unlink()  # a re-run reuses finished points: nothing is re-sampled
    again = _last_json([str(REPO / "scripts" / "bench_steps.py"), "--n", "2", "--steps", "2,50", "--methods", "np",
                        "--out", str(tmp_path / "bs")], tmp_path)
    assert again["rows"] == out["rows"] and not (tmp_path / "bs" / "np-2" / "samples.png").exists()


def test_precision_pairs_pairs_two_runs_of_the_same_seeds(tmp_path, compose):
    """scripts/precision_pairs.py on fp32 and bf16 runs of the tiny model: point differences equal the two
    metrics.json's, and McNemar's exact p is the binomial tail (6 vs 0 discordant pairs: 2/64)."""
    import importlib.util

    from dng_cli.commands import evaluate

    base = ["model=tiny_random", "n_samples=8", "sampler.steps=2", "sampler.batch_size=8", "sampler.progress=false",
            "method=dng"]
    a = evaluate.run(compose("evaluate", base), tmp_path / "fp32")
    b = evaluate.run(compose("evaluate", base + ["sampler.precision=bf16"]), tmp_path / "bf16")
    out = _last_json([str(REPO / "scripts" / "precision_pairs.py"), str(tmp_path / "fp32"), str(tmp_path / "bf16"),
                      "--bootstrap", "20"], tmp_path)
    assert out["precision"] == ["fp32", "bf16"] and 0 <= out["class_changed"] <= 1 and out["n"] == 8
    assert out["fid_diff"][0] == pytest.approx(b["fid"] - a["fid"], abs=1e-6)
    assert out["kl_kept_diff"][0] == pytest.approx(b["kl_kept"] - a["kl_kept"], abs=1e-9)
    spec = importlib.util.spec_from_file_location("precision_pairs", REPO / "scripts" / "precision_pairs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import numpy as np

    x = np.array([True] * 6 + [False] * 10)
    assert module.mcnemar_p(x, np.zeros(16, bool)) == pytest.approx(2 / 64)
    assert module.mcnemar_p(x, x) == 1.0


def test_precision_pairs_clearing_rule(tmp_path):
    """A method is cleared only if every one of its rows keeps McNemar p >= 0.05 and 0 inside both paired intervals."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("precision_pairs", REPO / "scripts" / "precision_pairs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ok = {"method": "np", "mcnemar_p": 0.5, "kl_kept_diff": [0.001, -0.002, 0.004], "fid_diff": [0.1, -0.1, 0.3]}
    assert module.unchanged(ok)
    assert not module.unchanged({**ok, "mcnemar_p": 0.01})
    assert not module.unchanged({**ok, "fid_diff": [0.2, 0.05, 0.4]})
    assert not module.unchanged({**ok, "kl_kept_diff": [-0.01, -0.02, -0.001]})
    for name, pair in {"mnist_np": ok, "fashion_np": {**ok, "mcnemar_p": 0.01}, "mnist_sld": {**ok, "method": "sld"}}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "pairs.json").write_text(json.dumps(pair))
    (tmp_path / "fashion_sld").mkdir()
    (tmp_path / "fashion_sld" / "pairs.json").write_text(json.dumps({**ok, "method": "sld"}))
    (tmp_path / "mnist_dng").mkdir()
    (tmp_path / "mnist_dng" / "pairs.json").write_text(json.dumps({**ok, "method": "dng"}))
    assert module.cleared(tmp_path) == {"sld"}  # np fails on one dataset, dng is not measured on fashion


def test_same_seeds_counts_the_samples_two_methods_share(tmp_path):
    """scripts/same_seeds.py: on records with a known difference it counts the changed samples, class changes and
    forbidden counts per shared scale; on the committed dng_hold compare it gives the published 3 of 9 x 500."""
    import numpy as np

    rng = np.random.default_rng(0)
    feats, classes = rng.normal(size=(6, 3)).astype(np.float32), np.array([0, 1, 2, 0, 4, 5])
    for method, scale, f, c in [("a", "2", feats, classes), ("b", "2", feats + np.array([[0], [1], [0], [0], [0], [1e-6]]),
                                 np.array([0, 3, 2, 0, 4, 5])), ("a", "4", feats, classes)]:
        (tmp_path / "cmp" / "eval" / method / f"scale={scale}").mkdir(parents=True)
        np.savez(tmp_path / "cmp" / "eval" / method / f"scale={scale}" / "records.npz", seeds=np.arange(6),
                 classes=c, features=f)
    out = _last_json([str(REPO / "scripts" / "same_seeds.py"), str(tmp_path / "cmp"), "a", "b"], tmp_path)
    assert out["rows"] == [{"scale": 2.0, "n": 6, "differ": 1, "class_changed": 1, "forbidden_a": 2, "forbidden_b": 2}]
    published = _last_json([str(REPO / "scripts" / "same_seeds.py"),
                            str(REPO / "docs" / "results" / "matched_safety" / "mnist_hold"), "dng_hold", "dng"], tmp_path)
    assert len(published["rows"]) == 9 and sum(r["differ"] for r in published["rows"]) == 3
    assert sum(r["class_changed"] for r in published["rows"]) == 0
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "same_seeds.py"), str(tmp_path / "cmp"), "a", "c"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode != 0 and res.stderr.count("\n") == 1 and "no scale evaluated for both" in res.stderr


def test_bench_backends_tiny(tmp_path):
    """scripts/bench_backends.py: every available backend per batch, its ratio to eager torch at that batch."""
    _tiny_unet(tmp_path)
    out = _last_json([str(REPO / "scripts" / "bench_backends.py"), "--model", str(tmp_path / "tiny"), "--batches", "2",
                      "4", "--seconds", "0.01", "--rounds", "1", "--threads", "1", "--backends", "torch", "onnxruntime"],
                     tmp_path)
    res = out["results"]
    assert set(res) == {"torch", "onnxruntime"} and set(res["torch"]) == {"2", "4"}
    for b in res:
        for batch, r in res[b].items():
            assert r["evals_per_s"] > 0 and r["ratio"] == pytest.approx(r["evals_per_s"] / res["torch"][batch]["evals_per_s"], rel=1e-2)
    assert out["gflop_per_eval"] > 0 and out["versions"]["onnxruntime"]


def test_make_fid_stats_writes_the_reference_evaluate_looks_up(tmp_path, tiny_mnist, compose):
    """scripts/make_fid_stats.py goes through evaluate's own producer (scoring.fid_reference): its file has the name
    a run's Scorer looks up, and holds the per-class sums of the split's classifier features."""
    import importlib.util

    import numpy as np
    import torch

    from dng_cli import metrics, scoring
    from dng_cli.models import load_classifier
    from dng_cli.sampler import to_uint8
    from dng_cli.spec import dataset_spec, resolve_run

    loader = importlib.util.spec_from_file_location("make_fid_stats", REPO / "scripts" / "make_fid_stats.py")
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    path = module.main(["--dataset", "mnist", "--root", str(tiny_mnist), "--split", "test", "--out", str(tmp_path)])
    run = resolve_run(compose("evaluate", [f"dataset.root={tiny_mnist}"]))
    key = "classifier-" + run.identity["weights.classifier"][:12]  # what scoring.Scorer names the reference
    assert path.name == scoring.reference_name("mnist", "test", key) and path.is_file()
    from dng_cli.data import load_tensors

    images, labels = load_tensors("mnist", str(tiny_mnist), "test")
    with torch.inference_mode():
        feats = metrics.ClassifierFeatures(load_classifier("mnist"))(to_uint8(images)).double()
    stats = metrics.load_stats(path)
    np.testing.assert_allclose(stats["sum"].sum(0), feats.sum(0).numpy(), rtol=1e-5)
    assert int(stats["n"].sum()) == len(images)
