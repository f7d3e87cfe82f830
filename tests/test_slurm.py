"""Sweeps through a real single-node SLURM cluster (the ``slurm`` fixture: slurmctld + slurmd + munged on this
machine), on the tiny model: jobs really go through sbatch, a failing job fails the sweep, a cancelled job is
finished by re-running the sweep, a requeued job resumes from its finished batches, a lock of another node is
judged by its SLURM job, and `dng compare launcher=slurm` fans out. (Submitit's own watcher cannot follow a
requeue without an accounting database, so the requeue test submits with sbatch directly.)"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path


import pytest

from dng_cli import cli

pytestmark = pytest.mark.xdist_group("slurm")  # under pytest-xdist: one worker runs them all, so one cluster starts

TINY = ["model=tiny_random", "n_samples=6", "sampler.steps=2", "sampler.batch_size=2", "sampler.progress=false"]
SLURM = ["launcher=slurm", "hydra.launcher.partition=debug", "hydra.launcher.gpus_per_node=0",
         "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=3", "hydra.launcher.timeout_min=10"]


def _sweep(sweep: Path, *extra, env=None, background=False):
    args = [sys.executable, "-m", "dng_cli.cli", "evaluate", "-m", *SLURM, *TINY, f"hydra.sweep.dir={sweep}", *extra]
    env = {**os.environ, **(env or {})}
    if background:
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)


def _job_ids(sweep: Path) -> list[str]:
    """The SLURM job ids submitit recorded: one folder per job (array tasks as <array id>_<task>)."""
    folder = sweep / ".submitit"
    names = [p.name for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
    tasks = sorted(n for n in names if re.fullmatch(r"\d+_\d+", n))
    return tasks or sorted(n for n in names if n.isdigit() and any((folder / n).glob("*_log.out")))


def _wait(predicate, timeout=240, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def _job_state(job: str) -> str:
    res = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True)
    return next((w.split("=", 1)[1] for w in res.stdout.split() if w.startswith("JobState=")), "")


def test_a_sweep_goes_through_sbatch_and_report_tabulates_it(slurm, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    res = _sweep(sweep, "method=np", "method.guidance_scale=1,2")
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = _job_ids(sweep)
    assert len(jobs) == 2, jobs
    # the sweep has each result once the job wrote it; SLURM marks the job COMPLETED when its process has exited
    _wait(lambda: all(_job_state(j) not in ("RUNNING", "COMPLETING") for j in jobs), 60, "the jobs to end")
    assert [_job_state(j) for j in jobs] == ["COMPLETED", "COMPLETED"]
    assert len(list(sweep.glob("*/metrics.json"))) == 2
    cli.main(["report", str(sweep)])
    assert (sweep / "report.md").read_text().count("| np |") >= 2


def test_a_failing_job_fails_the_sweep_and_is_reported(slurm, tmp_path, capsys):
    bad = tmp_path / "clf"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    (bad / "model.safetensors").write_bytes(b"garbage")
    sweep = tmp_path / "sweep"
    res = _sweep(sweep, "method=np", f"model.classifier=mnist,{bad}")
    assert res.returncode == 1 and "1 job(s) of the sweep failed" in res.stderr.strip().splitlines()[-1], res.stderr[-2000:]
    cli.main(["report", str(sweep)])
    assert "Failed or unfinished jobs (1)" in (sweep / "report.md").read_text()


def test_a_cancelled_job_is_finished_by_rerunning_the_sweep(slurm, tmp_path):
    """scancel one of two jobs while both wait at their first batch, then stop the submitting sweep (without an
    accounting database submitit cannot tell a cancelled job from a lost one and would wait): re-running the sweep
    finishes the cancelled job (its lock, left by a killed process, does not block; its finished batch is reused)
    and reuses the finished one."""
    sweep, go = tmp_path / "sweep", tmp_path / "go"
    proc = _sweep(sweep, "method=np", "method.guidance_scale=1,2", background=True,
                  env={"DNG_TEST_PAUSE": "evaluate_batch", "DNG_TEST_RESUME": str(go)})
    try:
        jobs = _wait(lambda: len(_job_ids(sweep)) == 2 and _job_ids(sweep), what="two SLURM jobs")
        _wait(lambda: all(_job_state(j) == "RUNNING" for j in jobs), what="both jobs running")
        _wait(lambda: len(list(sweep.glob("*/.partial-*/batch-*.npz"))) == 2, what="a finished batch in each job")
        subprocess.run(["scancel", jobs[0]], check=True)
        _wait(lambda: _job_state(jobs[0]) == "CANCELLED", what="the job cancelled")
        go.touch()
        _wait(lambda: len(list(sweep.glob("*/metrics.json"))) == 1 and _job_state(jobs[1]) == "COMPLETED", 120,
              "the other job to finish")
    finally:  # stop the waiting submitter as a user would (Ctrl-C; a kill if it does not react)
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=20)
    finished = sorted(sweep.glob("*/metrics.json"))
    assert len(finished) == 1
    stamp = finished[0].stat().st_mtime_ns
    res = _sweep(sweep, "method=np", "method.guidance_scale=1,2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(list(sweep.glob("*/metrics.json"))) == 2 and finished[0].stat().st_mtime_ns == stamp


def test_a_lock_of_another_node_is_judged_by_its_slurm_job(slurm, tmp_path):
    """A lock recorded on another node with a live SLURM job is respected (heartbeat fresh or not); once the job is
    no longer running (scancel), the lock is stale and taken over — what lets a sweep re-run after a node died."""
    import json

    from dng_cli import RunRefused, runs

    res = subprocess.run(["sbatch", "--parsable", "--mem=100M", f"--output={tmp_path}/slurm-%j.out", "--wrap", "sleep 300"],
                         capture_output=True, text=True, cwd=tmp_path,
                         check=True)
    job = res.stdout.strip().split(";")[0]
    _wait(lambda: _job_state(job) == "RUNNING", 180, "the job to run")
    folder = tmp_path / "run"
    folder.mkdir()
    lock = folder / ".dng.lock"
    lock.write_text(json.dumps({"pid": 4242, "host": "node-b", "flock": True, "slurm_job_id": job, "started": "x"}))
    old = time.time() - 10_000
    os.utime(lock, (old, old))  # even with a stale heartbeat: the job says it runs
    try:
        runs.RunLock(folder).__enter__()
        raise AssertionError("a lock whose SLURM job runs was taken over")
    except RunRefused as err:
        assert f"SLURM job {job} is still queued or running" in str(err)
    subprocess.run(["scancel", job], check=True)
    _wait(lambda: _job_state(job) not in ("RUNNING", "COMPLETING", "PENDING"), 60, "the job to end")
    with runs.RunLock(folder) as held:
        assert held.held and json.loads(lock.read_text())["host"] != "node-b"


def test_compare_fans_out_through_sbatch_and_equals_the_serial_run(slurm, tmp_path, capsys):
    """`dng compare launcher=slurm` (no -m): a calibration job per method, then a job per grid point, all through
    sbatch; the submitter writes the table, equal to a serial run's. Submitted from another working directory
    than the repository (the jobs find the shipped assets and configs through the package, paths absolute)."""
    import json

    args = ["compare", "model=tiny_random", "sampler.steps=1", "sampler.batch_size=8", "sampler.progress=false",
            "methods=[np,dng]", "targets=[0.5]", "n_samples=6", "pilot_n=4", "bootstrap=20"]
    cli.main([*args, f"hydra.run.dir={tmp_path / 'serial'}"])
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    res = subprocess.run([sys.executable, "-m", "dng_cli.cli", *args, *SLURM, "hydra.run.dir=../jobs"],
                         capture_output=True, text=True, timeout=600, cwd=elsewhere)
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "jobs"
    jobs = sorted(p.name for p in (out / ".submitit").iterdir() if p.is_dir() and any(p.glob("*_result.pkl")))
    summary = json.loads((out / "compare.json").read_text())
    assert len(jobs) == 2 + len(summary["evaluations"]), jobs  # a job per unit: 2 calibrations + a grid point each
    # one submission per wave: the calibrations, then each method's grid waves (an array, or a plain job for one unit)
    assert all(re.fullmatch(r"\d+(_\d+)?", j) for j in jobs) and any("_" in j for j in jobs), jobs
    _wait(lambda: all(_job_state(j) not in ("RUNNING", "COMPLETING") for j in jobs), 60, "the jobs to end")
    assert {_job_state(j) for j in jobs} == {"COMPLETED"}  # SLURM's own record of each job
    serial = json.loads((tmp_path / "serial" / "compare.json").read_text())
    for key in ("methods", "claims", "evaluations", "calibration"):
        assert summary[key] == serial[key], key
    # resumed: the submitter finds every unit's result and queues nothing (no job would wait in the queue for it)
    queued = sorted(p.name for p in (out / ".submitit").iterdir())
    res = subprocess.run([sys.executable, "-m", "dng_cli.cli", *args, *SLURM, "hydra.run.dir=../jobs"],
                         capture_output=True, text=True, timeout=600, cwd=elsewhere)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in (out / ".submitit").iterdir()) == queued
    assert json.loads((out / "compare.json").read_text())["claims"] == serial["claims"]


def test_a_requeued_job_resumes_from_its_finished_batches(slurm, tmp_path, compose):
    """`scontrol requeue` of a running `dng evaluate` job (what preemption does): SLURM kills it and starts it again;
    the new run takes over the lock of the job's earlier run (same SLURM job, higher restart count), draws only the
    seeds the killed run had not finished, and ends with the metrics of an uninterrupted run. (Submitted with
    sbatch directly: submitit's own watcher needs an accounting database to follow a requeue.)"""
    import json

    from dng_cli.commands import evaluate

    out, go = tmp_path / "run", tmp_path / "go"
    args = [*TINY, "method=np", "method.guidance_scale=2"]
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\n" + " ".join([sys.executable, "-m", "dng_cli.cli", "evaluate", *args,
                                                   f"hydra.run.dir={out}"]) + "\n")
    env = {**os.environ, "DNG_TEST_PAUSE": "evaluate_batch", "DNG_TEST_RESUME": str(go)}
    res = subprocess.run(["sbatch", "--parsable", "--requeue", "--mem=3G", "--cpus-per-task=1",
                          f"--output={tmp_path}/slurm-%j-%s.out", "--open-mode=append", str(script)],
                         capture_output=True, text=True, check=True, env=env, cwd=tmp_path)
    job = res.stdout.strip().split(";")[0]
    _wait(lambda: len(list(out.glob(".partial-*/batch-*.npz"))) >= 1, 240, "a finished batch")
    first = {p.name for p in out.glob(".partial-*/batch-*.npz")}
    subprocess.run(["scontrol", "requeue", job], check=True)

    def running_again() -> bool:  # SLURM delays a requeued job's start (BeginTime): move it to now while pending
        show = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout.split()
        fields = dict(w.split("=", 1) for w in show if "=" in w)
        if fields.get("JobState") == "PENDING":
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
        return fields.get("Restarts") == "1" and fields.get("JobState") == "RUNNING"

    try:
        _wait(running_again, 300, "the requeued job to run again")
    except AssertionError:
        show = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
        raise AssertionError(f"the requeued job did not run again: {show}") from None
    go.touch()
    _wait(lambda: _job_state(job) == "COMPLETED", 240, "the requeued job to finish")
    log = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out")) + (out / "evaluate.log").read_text()
    assert "resuming: 2 of 6 samples were drawn before, drawing the other 4" in log, log[-3000:]
    assert first and not list(out.glob(".partial-*"))  # the batches were used, then cleared
    m = json.loads((out / "metrics.json").read_text())
    ref = evaluate.run(compose("evaluate", args), tmp_path / "uninterrupted")
    assert m["fingerprint"] == ref["fingerprint"] and m["histogram_counts"] == ref["histogram_counts"]
    assert m["fid"] == pytest.approx(ref["fid"], rel=1e-9)
