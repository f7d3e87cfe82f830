"""Multirun sweeps: submitit_local on the tiny model, resume, a failing job, SLURM composition."""

import json
import subprocess
import sys

import pytest


def test_slurm_launcher_composes(compose):
    cfg = compose("evaluate", ["launcher=slurm", "hydra.launcher.partition=gpu"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.partition == "gpu" and cfg.hydra.launcher.gpus_per_node == 1
    assert cfg.sampler.device == "auto"


def test_local_launcher_composes(compose):
    cfg = compose("evaluate", ["launcher=local"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("LocalLauncher")


def test_paper_experiment_grid(compose):
    cfg = compose("evaluate", ["experiment=mnist_paper", "method=sld", "grid_index=3"], return_hydra_config=True)
    assert cfg.method.guidance_scale == cfg.grids.sld[3]
    assert cfg.hydra.sweeper.params.method == "np,sld,dng"


def test_fashion_experiment_composes_dataset_model_and_forbidden_shirt(compose):
    cfg = compose("evaluate", ["experiment=fashion_paper", "method=dng", "grid_index=2"], return_hydra_config=True)
    assert cfg.dataset.name == "fashion_mnist" and cfg.model.name == "fashion_mnist"
    assert list(cfg.forbidden) == [6] and cfg.dataset.class_names[6] == "Shirt"
    assert cfg.method.guidance_scale == cfg.grids.dng[2]
    assert cfg.hydra.sweeper.params.method == "np,sld,dng"


def _sweep(sweep_dir, *extra):
    return subprocess.run([sys.executable, "-m", "dng_cli.cli", "evaluate", "-m", "launcher=local", "model=tiny_random",
                           "n_samples=4", "sampler.steps=2", "sampler.batch_size=4", "sampler.progress=false",
                           f"hydra.sweep.dir={sweep_dir}", *extra], capture_output=True, text=True, timeout=600)


@pytest.mark.e2e
def test_submitit_local_sweep_resume_and_failure(tmp_path):
    sweep = tmp_path / "sweep"
    res = _sweep(sweep, "method=np,dng")
    assert res.returncode == 0, res.stderr[-3000:]
    runs = sorted(sweep.glob("*/metrics.json"))
    assert [p.parent.name.split(",")[0] for p in runs] == ["method=dng", "method=np"]
    stamps = [p.stat().st_mtime_ns for p in runs]
    res = _sweep(sweep, "method=np,dng")  # same sweep dir: finished runs are skipped
    assert res.returncode == 0
    assert [p.stat().st_mtime_ns for p in runs] == stamps
    # a bad value is refused up front, before any job runs
    sweep2 = tmp_path / "sweep2"
    res = _sweep(sweep2, "method=dng", "method.p_max=0.5,2.0")
    assert res.returncode == 2 and "p_max=2.0" in res.stderr and not sweep2.exists()
    # one job failing at run time (a classifier folder with corrupt weights) logs its error; the other finishes
    bad_clf = tmp_path / "clf"
    bad_clf.mkdir()
    (bad_clf / "config.json").write_text("{}")
    (bad_clf / "model.safetensors").write_bytes(b"garbage")
    res = _sweep(sweep2, "method=np", f"model.classifier=mnist,{bad_clf}")
    assert res.returncode == 1 and "1 job(s) of the sweep failed" in res.stderr
    ok = [p for p in sweep2.iterdir() if "model.classifier=mnist" in p.name]
    bad = [p.parent for p in sweep2.rglob("error.txt")]
    assert len(ok) == 1 and (ok[0] / "metrics.json").is_file()
    assert len(bad) == 1 and "could not be loaded" in (bad[0] / "error.txt").read_text()
    assert not (bad[0] / "metrics.json").exists()
    from dng_cli import cli

    cli.main(["report", str(sweep)])
    assert (sweep / "report.md").is_file()
    assert json.loads(runs[0].read_text())["method"] == "dng"
