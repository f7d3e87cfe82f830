"""Results a researcher can trust: no stale or mixed results, locked run folders, no leftover temporaries."""

import json
import os
import subprocess
import sys

import pytest

from dng_cli import UserError, cli, io, runs, short_dirname, spec
from dng_cli.commands import evaluate

TINY = ["model=tiny_random", "n_samples=3", "sampler.steps=1", "sampler.batch_size=4", "sampler.progress=false"]


def _metrics(path):
    return json.loads((path / "metrics.json").read_text())


def test_a_finished_run_of_another_config_is_refused_not_reused(compose, tmp_path):
    out = tmp_path / "run"
    evaluate.run(compose("evaluate", TINY + ["method=np"]), out)
    first = _metrics(out)
    assert len(first["fingerprint"]) == 16 and set(first["weights"]) == {"classifier"}
    # the same config (other speed settings) is skipped ...
    same = evaluate.run(compose("evaluate", TINY + ["method=np", "sampler.batch_size=2", "sampler.max_batch=8"]), out)
    assert same["fingerprint"] == first["fingerprint"] and same["wall_time_s"] == first["wall_time_s"]
    # ... another one is refused with the first differing key, and nothing changes on disk
    with pytest.raises(UserError, match=r"method\.guidance_scale=1\.0 there, 2\.0 here.*overwrite=true"):
        evaluate.run(compose("evaluate", TINY + ["method=np", "method.guidance_scale=2"]), out)
    with pytest.raises(UserError, match=r"method\.name='np' there, 'sld' here"):
        evaluate.run(compose("evaluate", TINY + ["method=sld"]), out)
    assert _metrics(out) == first
    # overwrite=true recomputes
    evaluate.run(compose("evaluate", TINY + ["method=sld", "overwrite=true"]), out)
    assert _metrics(out)["method"] == "sld"


def test_metrics_without_fingerprint_are_reused_only_for_the_same_config(compose, tmp_path):
    out = tmp_path / "run"
    evaluate.run(compose("evaluate", TINY + ["method=np"]), out)
    legacy = _metrics(out)
    del legacy["fingerprint"], legacy["weights"]  # as written before fingerprints existed
    (out / "metrics.json").write_text(json.dumps(legacy))
    assert evaluate.run(compose("evaluate", TINY + ["method=np"]), out) == legacy
    with pytest.raises(UserError, match="method.guidance_scale"):
        evaluate.run(compose("evaluate", TINY + ["method=np", "method.guidance_scale=3"]), out)


@pytest.mark.e2e
def test_cli_refusal_keeps_the_folder_consistent(tmp_path):
    """`dng evaluate … method=sld` into a folder with an np result: one line, exit 2, and .hydra still says np."""
    run_dir = tmp_path / "run"
    base = [sys.executable, "-m", "dng_cli.cli", "evaluate", *TINY, f"hydra.run.dir={run_dir}"]
    assert subprocess.run(base + ["method=np"], capture_output=True, timeout=300).returncode == 0
    (run_dir / "error.txt").write_text("old failure\n")  # an earlier failure of this folder
    res = subprocess.run(base + ["method=sld"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "another config" in res.stderr and "Traceback" not in res.stderr
    assert "name: np" in (run_dir / ".hydra" / "config.yaml").read_text()
    assert not (run_dir / ".hydra_pending").exists()
    res = subprocess.run(base + ["method=np"], capture_output=True, text=True, timeout=300)  # succeeds: skipped
    assert res.returncode == 0 and not (run_dir / "error.txt").exists()


def test_lock_refuses_a_live_owner_and_takes_over_a_dead_one(tmp_path, caplog):
    folder = tmp_path / "run"
    with runs.RunLock(folder):
        with pytest.raises(UserError, match="in use by pid"):
            with runs.RunLock(folder):
                pass
    assert not (folder / io.LOCK_NAME).exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (folder / io.LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "started": "x"}))
    with runs.RunLock(folder) as lock:
        assert lock.held and json.loads((folder / io.LOCK_NAME).read_text())["pid"] == os.getpid()
    assert "stale lock" in caplog.text


@pytest.mark.e2e
def test_two_runs_into_one_folder_at_once(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (run_dir / io.LOCK_NAME).write_text(json.dumps({"pid": owner.pid, "host": os.uname().nodename,
                                                        "started": "now"}))
        res = subprocess.run([sys.executable, "-m", "dng_cli.cli", "evaluate", *TINY, f"hydra.run.dir={run_dir}"],
                             capture_output=True, text=True, timeout=300)
    finally:
        owner.kill()
    assert res.returncode == 2 and "in use by pid" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (run_dir / "metrics.json").exists() and not (run_dir / ".hydra").exists()


def test_temporaries_of_interrupted_writes_are_cleaned(compose, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    leftovers = [run_dir / ".metrics.json.tmp-abc", run_dir / ".metrics.json.k3j_x9q2", run_dir / ".samples.png.tmp-x"]
    leftovers[0].write_text("{")
    leftovers[1].write_text("{")
    leftovers[2].mkdir()
    keep = run_dir / ".keep-me"
    keep.write_text("user file")
    cli.main(["evaluate", *TINY, f"hydra.run.dir={run_dir}"])
    assert not any(p.exists() for p in leftovers) and keep.exists()
    assert (run_dir / "metrics.json").is_file() and not (run_dir / io.LOCK_NAME).exists()


def test_long_override_names_are_shortened_deterministically():
    long = ",".join(f"method.key{i}=value{i}" for i in range(30))
    short = short_dirname(long)
    assert len(short.encode()) <= 200 and short == short_dirname(long) and short.startswith("method.key0=value0")
    assert short_dirname(long + "x") != short
    assert short_dirname("method=np") == "method=np"


@pytest.mark.e2e
def test_sweep_with_a_failed_job_exits_nonzero_and_reports_it(tmp_path):
    bad = tmp_path / "bad_classifier"  # passes the up-front checks, fails when the job loads it
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    (bad / "model.safetensors").write_bytes(b"garbage")
    sweep = tmp_path / "sweep"
    res = subprocess.run([sys.executable, "-m", "dng_cli.cli", "evaluate", "-m", *TINY, "method=np",
                          f"model.classifier=mnist,{bad}", f"hydra.sweep.dir={sweep}"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 1, res.stderr[-2000:]
    assert "1 job(s) of the sweep failed" in res.stderr.strip().splitlines()[-1]
    cli.main(["report", str(sweep)])
    report = (sweep / "report.md").read_text()
    assert "Failed or unfinished jobs" in report and "bad_classifier" in report


def test_sweeps_are_validated_up_front(capsys, tmp_path):
    sweep = tmp_path / "sweep"
    for args, match in ((["n_samples=-3"], "n_samples=-3"), (["foo=1,2"], "foo"),
                        (["method=np", "method.guidance_scale=1,abc"], "'abc'"),
                        (["experiment=mnist_paper", "n_samples=0"], "n_samples=0")):
        with pytest.raises(SystemExit) as exc:
            cli.main(["evaluate", "-m", "model=tiny_random", f"hydra.sweep.dir={sweep}", *args])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and match in err, err
    assert not sweep.exists()


def test_result_identity_is_stable_across_the_config_layout_change(compose):
    """`forbidden` moved to the top level and the schedule into the model folder: a result written with
    the old layout (method.forbidden, sampler.num_train_timesteps/beta_start/beta_end) has the same identity."""
    from dng_cli.spec import resolve_run

    new = resolve_run(compose("evaluate", TINY + ["method=np", "forbidden=[0,6]"])).plain_config()  # as recorded
    legacy = {**new, "method": {**new["method"], "forbidden": new["forbidden"]},
              "sampler": {**new["sampler"], "num_train_timesteps": 1000, "beta_start": 1.0e-4, "beta_end": 0.02}}
    del legacy["forbidden"]
    del legacy["sampler"]["precision"]  # a key added later (fp32: what every earlier result ran in)
    del legacy["sampler"]["backend"]  # in the identity since the paired table (torch: every earlier result)
    assert runs.identity_config(new, spec.schedule_of) == runs.result_config(legacy)
    other = resolve_run(compose("evaluate", TINY + ["method=np", "forbidden=[0]"])).plain_config()
    assert runs.identity_config(other, spec.schedule_of) != runs.identity_config(new, spec.schedule_of)


def test_json_results_are_strict_json_and_a_nan_is_refused_before_writing(tmp_path):
    """metrics.json/compare.json are read by other tools: a bare NaN (what Python's json writes by default) is not
    JSON. A non-finite number is an error naming its key, and the file is not written."""
    import math

    import pytest

    from dng_cli import io

    path = tmp_path / "metrics.json"
    with pytest.raises(ValueError, match=r"metrics.json: histogram.3 is not a finite number"):
        io.write_json(path, {"fid": 1.0, "histogram": [0.1, 0.2, 0.3, math.nan]})
    assert not path.exists()
    io.write_json(path, {"fid": 1.0})
    assert path.read_text().strip().startswith("{")


def test_a_failed_commit_leaves_the_earlier_result_whole(compose, tmp_path, monkeypatch):
    """The commit moved the new samples/records in before it failed on `.hydra` (EACCES on a folder another user
    wrote), leaving them beside the old metrics.json, whose config a later run then took as finished. Now a failure
    anywhere in the commit puts every old file back and takes every new one out: the folder never mixes runs."""
    from dng_cli import runs

    out = tmp_path / "run"
    evaluate.run(compose("evaluate", TINY + ["method=np"]), out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert {"metrics.json", "samples.npz", "records.npz"} <= set(before)

    def denied(folder):
        raise PermissionError(13, "Permission denied", str(folder / ".hydra"))

    monkeypatch.setattr(runs, "promote_config", denied)
    with pytest.raises(PermissionError):
        evaluate.run(compose("evaluate", TINY + ["method=sld", "overwrite=true"]), out)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not [p for p in out.iterdir() if p.name.startswith(".result")]


def test_another_users_stale_lock_says_whose_it_is_and_what_to_do(tmp_path, monkeypatch):
    """A lock file this user may not open (another user's, mode 0644) used to end in a bare "Permission denied".
    (As root permissions do not bite: the open is made to fail as it does for a normal user.)"""
    from dng_cli import RunRefused, runs

    folder = tmp_path / "run"
    folder.mkdir()
    lock = folder / ".dng.lock"
    lock.write_text(json.dumps({"pid": 999_999_999, "host": os.uname().nodename, "flock": True,
                                "started": "2026-12-01 10:00:00"}))
    real_open = os.open

    def denied(path, flags, *args):
        if str(path) == str(lock) and flags & os.O_RDWR and not flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(RunRefused) as err:
        runs.RunLock(folder).__enter__()
    text = str(err.value)
    assert "stale lock of user" in text and "that run is gone" in text and f"delete '{lock}'" in text, text
    assert "pid 999999999" in text and "2026-12-01 10:00:00" in text


def test_partial_batches_of_another_run_or_shape_are_skipped_not_used(tmp_path, caplog):
    """A batch file of another run that lands in this run's partial folder (same image shape) used to be taken
    silently, and one of another shape ended in an np.stack traceback: each batch now records its samples
    fingerprint, and foreign or ill-fitting batches are skipped with a warning (their seeds are drawn again)."""
    import shutil

    import numpy as np

    from dng_cli import runs

    def batch(n, first, shape=(1, 4, 4)):
        return ([first + i for i in range(n)], np.full((n, *shape), first, np.uint8), np.zeros((3, n), np.float32),
                np.zeros((3, n), np.float32), 1.0)

    mine, other = runs.PartialBatches(tmp_path, "aaaa", (1, 4, 4)), runs.PartialBatches(tmp_path, "bbbb", (1, 4, 4))
    mine.save(*batch(2, 0))
    other.save(*batch(2, 2))
    shutil.copy(other.dir / "batch-2-2.npz", mine.dir / "batch-2-2.npz")  # same shape, another run's samples
    odd = runs.PartialBatches(tmp_path / "x", "aaaa", (1, 8, 8))
    odd.save(*batch(2, 4, shape=(1, 8, 8)))
    shutil.copy(odd.dir / "batch-4-2.npz", mine.dir / "batch-4-2.npz")  # this run's fingerprint, wrong shape
    with caplog.at_level("WARNING"):
        found = mine.load(list(range(6)))
    assert sorted(found) == [0, 1]
    assert "drawn by another config" in caplog.text and "do not fit" in caplog.text
