"""Faults and concurrency, as a researcher running several jobs at once meets them: kills at each write
site, a full disk, concurrent runs into one folder and into default folders, concurrent takeovers of a
stale lock, and rescoring only what was sampled. Each case asserts: no mixed or lost result, one line,
and a re-run recovers."""

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dng_cli import RunRefused, cli, io, runs, scoring

T = ["model=tiny_random", "n_samples=4", "sampler.steps=2", "sampler.batch_size=4", "sampler.progress=false"]
DNG = [sys.executable, "-m", "dng_cli.cli"]


def _start(args, pause=None, resume=None, cwd=None):
    env = dict(os.environ)
    if pause:
        env["DNG_TEST_PAUSE"] = pause
    if resume:
        env["DNG_TEST_RESUME"] = str(resume)
    proc = subprocess.Popen(DNG + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    if pause:
        for line in proc.stdout:
            if f"DNG_TEST_PAUSED {pause}" in line:
                break
        else:
            proc.wait(timeout=60)
            raise AssertionError(f"never paused at {pause}: {proc.stderr.read()[-3000:]}")
    return proc


def _refused(capsys, argv) -> str:
    """An in-process CLI run that must fail with one line."""
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code not in (0, None)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _snapshot(folder: Path, logs: bool = True) -> dict:
    """Every file below folder (hidden ones too) with its bytes (``logs=False``: but Hydra's *.log journals)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and (logs or p.suffix != ".log")}


def _hydra_cfg(folder: Path) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(folder / ".hydra" / "config.yaml"))


def _consistent(folder: Path) -> dict:
    """The folder holds one whole result: .hydra describes metrics.json, samples.npz was drawn by it, and no
    lock, pending config or stage of an interrupted write is left."""
    m = json.loads((folder / "metrics.json").read_text())
    cfg = _hydra_cfg(folder)
    for key in ("method", "n_samples", "forbidden"):
        assert cfg[key] == m["config"][key], key
    if (folder / "samples.npz").exists():
        with np.load(folder / "samples.npz") as f:
            assert str(f["fingerprint"]) == m["samples"]["fingerprint"]
    left = [p.name for p in folder.iterdir() if p.name == io.LOCK_NAME or p.name.startswith(".hydra_pending")
            or io.TEMP_MARK in p.name or io.OLD_MARK in p.name]
    assert not left, left
    return m


# ------------------------------------------------------------------------------ concurrent runs
@pytest.mark.e2e
def test_a_refused_run_leaves_the_running_runs_folder_lock_and_config_alone(tmp_path, capsys):
    run_dir, go = tmp_path / "D", tmp_path / "go"
    a = _start(["evaluate", *T, f"hydra.run.dir={run_dir}"], pause="evaluate", resume=go)  # A: running (dng, λ 10)
    try:
        lock = json.loads((run_dir / io.LOCK_NAME).read_text())
        assert lock["pid"] == a.pid and lock["flock"] is True
        err = _refused(capsys, ["evaluate", *T, f"hydra.run.dir={run_dir}"])  # B: same config
        assert f"in use by pid {a.pid}" in err and str(run_dir / io.LOCK_NAME) in err and "delete" in err
        assert (run_dir / io.LOCK_NAME).is_file() and json.loads((run_dir / io.LOCK_NAME).read_text()) == lock
        assert [p.name for p in run_dir.glob(".hydra_pending*")] == [f".hydra_pending-{socket.gethostname()}-{a.pid}"]
        err = _refused(capsys, ["evaluate", *T, "method.guidance_scale=3", f"hydra.run.dir={run_dir}"])  # C
        assert f"in use by pid {a.pid}" in err
        go.touch()
        _, a_err = a.communicate(timeout=300)
    finally:
        a.kill()
    assert a.returncode == 0, a_err[-3000:]
    m = _consistent(run_dir)
    assert m["guidance_scale"] == 10.0 and _hydra_cfg(run_dir)["method"]["guidance_scale"] == 10.0


@pytest.mark.e2e
def test_three_runs_started_together_get_three_default_folders(tmp_path):
    procs = [_start(["evaluate", *T, f"method={m}"], cwd=tmp_path) for m in ("np", "sld", "dng")]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    folders = sorted((tmp_path / "outputs" / "evaluate").iterdir())
    assert len(folders) == 3
    assert sorted(_consistent(f)["method"] for f in folders) == ["dng", "np", "sld"]
    assert all((f / "evaluate.log").is_file() for f in folders)


@pytest.mark.e2e
@pytest.mark.parametrize("n", [2, 3])
def test_runs_started_together_into_one_folder_leave_one_whole_result(tmp_path, n):
    run_dir = tmp_path / "D"
    procs = [_start(["evaluate", *T, f"method={m}", f"hydra.run.dir={run_dir}"]) for m in ("np", "sld", "dng")[:n]]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    winners = [i for i, (rc, _) in enumerate(results) if rc == 0]
    assert len(winners) == 1, results  # the others: refused (the lock, or the finished run of another config)
    for rc, err in results:
        if rc != 0:
            assert rc == 2 and len(err.strip().splitlines()) == 1, err[-3000:]
    assert _consistent(run_dir)["method"] == ("np", "sld", "dng")[winners[0]]


# ---------------------------------------------------------------------------------------- locks
def _contend(folder, start, done, holders, most, wins, trials):
    for _ in range(trials):
        start.wait()
        try:
            with runs.RunLock(folder):
                with holders.get_lock():
                    holders.value += 1
                    most.value = max(most.value, holders.value)
                    wins.value += 1
                time.sleep(0.02)
                with holders.get_lock():
                    holders.value -= 1
        except RunRefused:
            pass
        done.wait()


def _stale_record(dead_pid: int, style: str) -> dict:
    if style == "legacy":  # an earlier version's lock: no flock, judged by its pid
        return {"pid": dead_pid, "host": socket.gethostname(), "started": "x"}
    return {"pid": dead_pid, "host": socket.gethostname(), "flock": True, "started": "x"}  # its flock is free: dead


@pytest.mark.parametrize("contenders", [2, 3])
def test_concurrent_takeover_of_a_stale_lock_has_exactly_one_holder(tmp_path, contenders):
    """≥ 100 trials of processes taking over one stale lock at the same instant: never two holders."""
    ctx = multiprocessing.get_context("fork")
    folder, trials = tmp_path / "run", 100
    folder.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    start, done = ctx.Barrier(contenders + 1), ctx.Barrier(contenders + 1)
    holders, most, wins = ctx.Value("i", 0), ctx.Value("i", 0), ctx.Value("i", 0)
    workers = [ctx.Process(target=_contend, args=(folder, start, done, holders, most, wins, trials))
               for _ in range(contenders)]
    for w in workers:
        w.start()
    try:
        before = 0
        for i in range(trials):
            (folder / io.LOCK_NAME).write_text(json.dumps(_stale_record(dead.pid, ("legacy", "flock")[i % 2])))
            start.wait(timeout=60)
            done.wait(timeout=60)
            assert wins.value > before, f"trial {i}: nobody took over the stale lock"
            before = wins.value
    finally:
        for w in workers:
            w.join(timeout=60)
            w.kill()
    assert most.value == 1, f"{most.value} processes held the lock at once"
    assert not (folder / io.LOCK_NAME).exists()


def test_a_lock_of_another_host_is_stale_after_its_lease_or_its_slurm_job(tmp_path, monkeypatch, caplog):
    folder = tmp_path / "run"
    folder.mkdir()
    lock = folder / io.LOCK_NAME
    record = {"pid": 4242, "host": "node-b", "flock": True, "started": "2026-01-01 00:00:00"}
    lock.write_text(json.dumps(record))  # heartbeat fresh: respected, and the refusal says what to do
    monkeypatch.setenv(runs.LEASE_ENV, "60")
    with pytest.raises(RunRefused, match=r"node-b.*heartbeat is \d+ s old \(lease 60 s.*delete '.*\.dng\.lock'"):
        runs.RunLock(folder).__enter__()
    os.utime(lock, (time.time() - 120, time.time() - 120))  # no heartbeat for two leases: its owner is gone
    with runs.RunLock(folder) as held:
        assert held.held and json.loads(lock.read_text())["pid"] == os.getpid()
    assert "taking over the stale lock" in caplog.text and "node-b" in caplog.text
    # an older dng's lock on another host has no heartbeat: respected, with the file named
    lock.write_text(json.dumps({"pid": 4242, "host": "node-b", "started": "x"}))
    os.utime(lock, (time.time() - 1e5, time.time() - 1e5))
    with pytest.raises(RunRefused, match="older dng.*delete"):
        runs.RunLock(folder).__enter__()
    # our own SLURM job, requeued onto another node: its earlier run is gone whatever the heartbeat says
    lock.write_text(json.dumps({**record, "slurm_job_id": "77", "slurm_restart_count": None}))
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with runs.RunLock(folder) as held:
        mine = json.loads(lock.read_text())
        assert mine["slurm_job_id"] == "77" and mine["slurm_restart_count"] == "1"


def test_the_owner_refreshes_its_heartbeat(tmp_path, monkeypatch):
    monkeypatch.setenv(runs.LEASE_ENV, "0.4")  # a beat every 0.1 s
    with runs.RunLock(tmp_path / "run") as held:
        first = held.path.stat().st_mtime
        time.sleep(0.5)
        assert held.path.stat().st_mtime > first


def test_a_lock_is_released_by_the_kernel_when_its_owner_is_killed(tmp_path):
    folder = tmp_path / "run"
    owner = subprocess.Popen([sys.executable, "-c", "import sys, time; from dng_cli import runs; "
                              f"l = runs.RunLock({str(folder)!r}).__enter__(); print('held', flush=True); time.sleep(600)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "held"
        with pytest.raises(RunRefused, match=f"in use by pid {owner.pid}"):
            runs.RunLock(folder).__enter__()
        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=30)
        with runs.RunLock(folder) as held:  # the pid may even be reused: the free flock is what counts
            assert held.held
    finally:
        owner.kill()
        owner.stdout.close()


# ------------------------------------------------------------------------- kills at write sites
def _finished(tmp_path, capsys, *extra) -> Path:
    run_dir = tmp_path / "D"
    cli.main(["evaluate", *T, "method=np", f"hydra.run.dir={run_dir}", *extra])
    capsys.readouterr()
    return run_dir


@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
@pytest.mark.parametrize("point", ["lock", "evaluate", "evaluate_write", "commit"])
def test_a_killed_overwrite_keeps_the_old_result_and_a_rerun_recovers(tmp_path, capsys, point, sig):
    """overwrite=true of a finished np run by sld, killed at each write site: the np result (metrics.json,
    .hydra, samples.npz, histogram) stays whole until the sld result replaces it."""
    run_dir = _finished(tmp_path, capsys)
    before = _snapshot(run_dir)
    proc = _start(["evaluate", *T, "method=sld", "overwrite=true", f"hydra.run.dir={run_dir}"], pause=point)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if sig == signal.SIGTERM:
        assert proc.returncode == 143 and err.strip().splitlines()[-1].startswith("dng: terminated; re-run"), err
    after = _snapshot(run_dir)
    for name in ("metrics.json", ".hydra/config.yaml"):
        assert after[name] == before[name], name
    m = json.loads(after["metrics.json"])
    with np.load(run_dir / "samples.npz") as f:  # at "commit" the new samples are in, the old result not yet
        drawn_by_old = str(f["fingerprint"]) == m["samples"]["fingerprint"]
    assert drawn_by_old or point == "commit"
    if not drawn_by_old:  # a rescore must not take them for the old run's
        err = _refused(capsys, ["evaluate", *T, "method=np", "metrics.kl_smoothing=2", f"hydra.run.dir={run_dir}"])
        assert "drawn by another config" in err and _snapshot(run_dir)["metrics.json"] == before["metrics.json"]
    cli.main(["evaluate", *T, "method=sld", "overwrite=true", f"hydra.run.dir={run_dir}"])  # the re-run recovers
    assert _consistent(run_dir)["method"] == "sld"


@pytest.mark.e2e
def test_train_killed_by_sigterm_while_replacing_its_checkpoint_resumes(tiny_mnist, tmp_path):
    run_dir = tmp_path / "run"
    args = ["train", "ddpm", f"dataset.root={tiny_mnist}", "model=tiny_random", "batch_size=8", "checkpoint_every=2",
            "progress=false", "warmup_steps=2", "steps=4", f"hydra.run.dir={run_dir}"]
    proc = _start(args, pause="atomic_save")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Traceback" not in err, err[-3000:]
    assert not (run_dir / io.LOCK_NAME).exists()  # unwound: the lock went with it
    res = subprocess.run(DNG + args + ["resume=true"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4 and (run_dir / "ema" / "card.json").is_file() and not list(run_dir.glob(".checkpoint.*"))


# ---------------------------------------------------------------------------------- a full disk
@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs: real ENOSPC at whatever write comes first."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()[:80]}): run as root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(disk: Path, leave: int) -> Path:
    """Fill the disk, then free ``leave`` bytes."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:  # unbuffered: nothing left to flush (and fail) at close
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    with open(filler, "r+b") as f:
        f.truncate(max(0, filler.stat().st_size - leave))
    return filler


def test_a_full_disk_is_one_line_and_keeps_the_old_result(small_disk, capsys):
    run_dir = small_disk / "D"
    cli.main(["evaluate", *T, "method=np", f"hydra.run.dir={run_dir}"])
    capsys.readouterr()
    before = _snapshot(run_dir)
    outcomes = []
    for leave in (0, 4096, 12288, 24576, 40960, 65536, 131072):
        filler = _fill(small_disk, leave)
        try:
            cli.main(["evaluate", *T, "method=sld", "overwrite=true", f"hydra.run.dir={run_dir}"])
            outcomes.append("done")
            break  # it fit: the new result is whole
        except SystemExit as exc:
            assert exc.code not in (0, None)
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and "No space left on device" in err, err
            after = _snapshot(run_dir)
            for name in ("metrics.json", ".hydra/config.yaml", "samples.npz", "histogram.png"):
                assert after[name] == before[name], (leave, name)
            outcomes.append("refused")
        finally:
            filler.unlink()
    assert outcomes[0] == "refused" and "refused" in outcomes
    cli.main(["evaluate", *T, "method=sld", "overwrite=true", f"hydra.run.dir={run_dir}"])  # space again: recovers
    assert _consistent(run_dir)["method"] == "sld"


def test_a_full_disk_during_a_sweep_is_one_line(small_disk, capsys):
    filler = _fill(small_disk, 0)
    err = _refused(capsys, ["evaluate", "-m", *T, "method=np", "method.guidance_scale=1,2",
                            f"hydra.sweep.dir={small_disk / 'S'}"])
    assert "No space left on device" in err
    filler.unlink()
    cli.main(["evaluate", "-m", *T, "method=np", "method.guidance_scale=1,2", f"hydra.sweep.dir={small_disk / 'S'}"])
    assert len(list((small_disk / "S").glob("*/metrics.json"))) == 2


# ----------------------------------------------------------------------------- rescoring samples
def test_dng_sample_into_a_finished_evaluate_folder_is_refused(tmp_path, capsys):
    run_dir = _finished(tmp_path, capsys)
    before = _snapshot(run_dir)
    err = _refused(capsys, ["sample", *T, "method=np", "method.guidance_scale=50", f"hydra.run.dir={run_dir}"])
    assert "holds a result of dng evaluate" in err and _snapshot(run_dir) == before


def test_a_rescore_takes_only_the_samples_its_result_drew(tmp_path, capsys):
    run_dir = _finished(tmp_path, capsys)
    other = tmp_path / "other"
    cli.main(["sample", *T, "method=np", "method.guidance_scale=50", f"hydra.run.dir={other}"])
    capsys.readouterr()
    (run_dir / "samples.npz").write_bytes((other / "samples.npz").read_bytes())  # swapped by hand
    before = _snapshot(run_dir)
    err = _refused(capsys, ["evaluate", *T, "method=np", "metrics.kl_smoothing=2", f"hydra.run.dir={run_dir}"])
    assert "drawn by another config" in err and _snapshot(run_dir) == before


def test_a_legacy_samples_file_is_rescored_only_when_not_newer_than_its_result(tmp_path, capsys):
    run_dir = _finished(tmp_path, capsys)
    with np.load(run_dir / "samples.npz") as f:
        images, seeds = f["images"], f["seeds"]
    np.savez_compressed(run_dir / "samples.npz", images=images, seeds=seeds)  # as written before fingerprints
    m_time = (run_dir / "metrics.json").stat().st_mtime
    os.utime(run_dir / "samples.npz", (m_time + 60, m_time + 60))
    err = _refused(capsys, ["evaluate", *T, "method=np", "metrics.kl_smoothing=2", f"hydra.run.dir={run_dir}"])
    assert "newer than metrics.json" in err
    os.utime(run_dir / "samples.npz", (m_time - 60, m_time - 60))
    cli.main(["evaluate", *T, "method=np", "metrics.kl_smoothing=2", f"hydra.run.dir={run_dir}"])
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["rescored"]["changed"] == ["metrics.kl_smoothing"] and m["config"]["metrics"]["kl_smoothing"] == 2


def test_a_crashed_rescore_leaves_the_folder_as_it_was(tmp_path, capsys, monkeypatch):
    run_dir = _finished(tmp_path, capsys)
    before = _snapshot(run_dir, logs=False)

    def broken(*args, **kwargs):
        raise RuntimeError("scoring crashed")

    monkeypatch.setattr(scoring.Scorer, "__call__", broken)
    with pytest.raises(RuntimeError):
        cli.main(["evaluate", *T, "method=np", "metrics.kl_smoothing=2", f"hydra.run.dir={run_dir}"])
    capsys.readouterr()
    assert _snapshot(run_dir, logs=False) == before  # .hydra still says kl_smoothing 1, as metrics.json does


def test_runs_sits_below_the_domain_modules():
    import ast

    tree = ast.parse(Path(runs.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("dng_cli")}
    assert imported <= {"dng_cli", "dng_cli.io"}, imported


# ---------------------------------------------------------------------------- partial progress
@pytest.mark.e2e
def test_a_run_killed_after_some_batches_resumes_with_only_the_missing_seeds(tmp_path, capsys, monkeypatch):
    """SIGKILL after the first batch of 2: the re-run (another batch size) draws only the 4 missing seeds,
    and its metrics equal an uninterrupted run's exactly."""
    from dng_cli import sampler

    args = ["model=tiny_random", "n_samples=6", "sampler.steps=2", "sampler.progress=false", "method=dng"]
    run_dir = tmp_path / "killed"
    proc = _start(["evaluate", *args, "sampler.batch_size=2", f"hydra.run.dir={run_dir}"], pause="evaluate_batch")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not (run_dir / "metrics.json").exists() and len(list(run_dir.glob(".partial-*/batch-*.npz"))) == 1
    drawn = []
    real = sampler.generate

    def counting(gen, seeds, progress=False, **kwargs):
        drawn.extend(seeds)
        return real(gen, seeds, progress, **kwargs)

    monkeypatch.setattr(sampler, "generate", counting)
    cli.main(["evaluate", *args, "sampler.batch_size=3", f"hydra.run.dir={run_dir}"])
    assert sorted(drawn) == [2, 3, 4, 5]
    monkeypatch.undo()
    cli.main(["evaluate", *args, "sampler.batch_size=6", f"hydra.run.dir={tmp_path / 'straight'}"])
    capsys.readouterr()
    resumed, straight = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, tmp_path / "straight"))
    skip = {"wall_time_s", "images_per_s", "config"}
    assert {k: v for k, v in resumed.items() if k not in skip} == {k: v for k, v in straight.items() if k not in skip}
    with np.load(run_dir / "samples.npz") as a, np.load(tmp_path / "straight" / "samples.npz") as b:
        assert np.array_equal(a["images"], b["images"])
    assert not list(run_dir.glob(".partial-*"))
