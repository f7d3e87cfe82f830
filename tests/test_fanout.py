"""`dng compare` / `dng calibrate` with a launcher: their units (a calibration per method, an evaluation per grid
point) run as submitit jobs and the table equals a serial run's (launcher=local here; launcher=slurm against a
real slurmctld in test_slurm.py)."""

import json
import subprocess
import sys

import pytest

from dng_cli import UserError, cli

# the shipped MNIST model at 3 steps: real forbidden rates, so calibration and grid are not trivial
REAL = ["model=mnist", "sampler.steps=3", "sampler.batch_size=16", "sampler.progress=false", "methods=[np,dng]",
        "targets=[0.05]", "n_samples=16", "pilot_n=16", "bootstrap=50", "tolerance=0.5", "max_probes=3",
        "grid_rates=[1.0]", "grid_extend=1", "grid_max_ratio=1000"]
LOCAL = ["launcher=local", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=3"]


def compared(out):
    summary = json.loads((out / "compare.json").read_text())
    return {k: summary[k] for k in ("methods", "claims", "evaluations", "calibration", "not_reached")}


def fan_out(out, launcher, *extra):
    res = subprocess.run([sys.executable, "-m", "dng_cli.cli", "compare", *launcher, *REAL, *extra,
                          f"hydra.run.dir={out}"], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((out / "compare.json").read_text())


def job_folders(out):
    return sorted(p for p in (out / ".submitit").iterdir() if p.is_dir() and any(p.glob("*_result.pkl")))


def test_compare_through_the_local_launcher_equals_the_serial_run(tmp_path, capsys):
    cli.main(["compare", *REAL, f"hydra.run.dir={tmp_path / 'serial'}"])
    fan_out(tmp_path / "jobs", LOCAL)
    assert compared(tmp_path / "jobs") == compared(tmp_path / "serial")
    summary = json.loads((tmp_path / "jobs" / "compare.json").read_text())
    points = len(summary["evaluations"])
    assert points >= 2 and len(job_folders(tmp_path / "jobs")) == 2 + points  # 2 calibrations + a job per point
    log = (tmp_path / "jobs" / "compare.log").read_text()
    assert "compare calibration: 2 local job(s) submitted" in log and "compare np evaluation" in log
    # a re-run queues no job: the submitter finds every unit's result (nothing sampled), and the table is the same
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "jobs").rglob("metrics.json")}
    first = compared(tmp_path / "jobs")
    fan_out(tmp_path / "jobs", LOCAL)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "jobs").rglob("metrics.json")} == stamps
    assert len(job_folders(tmp_path / "jobs")) == 2 + points and compared(tmp_path / "jobs") == first
    log = (tmp_path / "jobs" / "compare.log").read_text()
    assert "compare calibration: all 2 unit(s) finished already: no job submitted" in log


def test_a_failing_unit_fails_the_command_after_the_others_finish(tmp_path):
    from dng_cli.fanout import Runner

    runner = Runner("local", {"timeout_min": 5, "cpus_per_task": 1}, tmp_path)
    assert runner.map(int, [("0",), ("20",)], "units") == [0, 20]
    with pytest.raises(UserError, match=r"units: 1 of 3 jobs failed \(logs under .*\.submitit\); first: job \d+: "
                                        r"ValueError: invalid literal for int\(\) with base 10: 'x'"):
        runner.map(int, [("0",), ("x",), ("2",)], "units")
    assert len(job_folders(tmp_path)) == 5  # every unit ran, the failing one too
    # a unit whose result is ready is not queued (what a resumed compare's submitter does with finished results)
    assert runner.map(int, [("7",), ("x",)], "units", ready=lambda a: -1 if a == "x" else None) == [7, -1]
    assert len(job_folders(tmp_path)) == 6


def test_calibrate_through_the_local_launcher_equals_the_serial_run(tmp_path, capsys):
    args = ["calibrate", "model=mnist", "sampler.steps=4", "sampler.batch_size=32", "sampler.progress=false",
            "method=np", "target_forbidden=0.05", "pilot_n=32", "tolerance=0.5", "max_probes=4"]
    cli.main([*args, f"hydra.run.dir={tmp_path / 'serial'}"])
    res = subprocess.run([sys.executable, "-m", "dng_cli.cli", *args, *LOCAL, f"hydra.run.dir={tmp_path / 'job'}"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(job_folders(tmp_path / "job")) == 1
    serial, job = (json.loads((tmp_path / f / "calibration.json").read_text()) for f in ("serial", "job"))
    assert job == serial and serial["probes"]


def test_a_job_gets_absolute_paths(tmp_path, monkeypatch):
    """A job may start in another working directory (another node): data, cache and local model paths are made
    absolute against the submitting directory; shipped names stay names."""
    from dng_cli.fanout import absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_unet").mkdir()
    config = {"dataset": {"root": "data", "name": "mnist"}, "metrics": {"fid": {"cache_dir": "fid", "split": "test"}},
              "model": {"path": "my_unet", "classifier": "mnist"}}
    out = absolute_paths(config)
    assert out["dataset"]["root"] == str(tmp_path / "data") and out["metrics"]["fid"]["cache_dir"] == str(tmp_path / "fid")
    assert out["model"] == {"path": str(tmp_path / "my_unet"), "classifier": "mnist"}
    assert config["dataset"]["root"] == "data"  # the run's own config is not changed
