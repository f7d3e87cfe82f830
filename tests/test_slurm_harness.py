"""The real-SLURM fixture's own guarantees, checked without SLURM: one process at a time holds the machine's
cluster lock (pytest-xdist workers take turns instead of racing apt-get's dpkg lock), the lock goes with a killed
holder, and the watcher ends a cluster's daemons when the session that started it is killed."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import slurm_cluster

HOLD = """
import sys, time
sys.path.insert(0, {tests!r})
import slurm_cluster
from pathlib import Path
slurm_cluster.LOCK = Path({lock!r})
with slurm_cluster.machine_lock():
    print("held", flush=True)
    time.sleep(300)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}/stat").exists() else "X"
    return state != "Z"


def _wait_gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.2)
    return False


def test_a_second_process_waits_for_the_cluster_lock_and_gets_it_when_the_holder_dies(tmp_path, monkeypatch):
    lock = tmp_path / "slurm.lock"
    monkeypatch.setattr(slurm_cluster, "LOCK", lock)
    holder = subprocess.Popen([sys.executable, "-c", HOLD.format(tests=str(Path(__file__).parent), lock=str(lock))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeError, match="another process has held"):
            with slurm_cluster.machine_lock(timeout=1.5):
                pass
        holder.kill()  # kill -9: no clean-up runs, the kernel drops the flock
        holder.wait(timeout=10)
        start = time.time()
        with slurm_cluster.machine_lock(timeout=10):
            assert time.time() - start < 5
    finally:
        holder.kill()


@pytest.mark.parametrize("stopped_first", [False, True])
def test_the_watcher_ends_the_daemons_when_their_session_is_killed(tmp_path, stopped_first):
    """A stand-in daemon (its pid in a pid file, in its own session like slurmd) outlives a killed owner unless the
    watcher ends it; a cluster stopped on purpose (the marker file) is left to its own stop()."""
    daemon = subprocess.Popen(["sleep", "300"], start_new_session=True)
    owner = subprocess.Popen(["sleep", "300"])
    pidfile, stopped = tmp_path / "d.pid", tmp_path / "stopped"
    pidfile.write_text(f"{daemon.pid}\n")
    try:
        watcher = slurm_cluster.watch(owner.pid, stopped, [pidfile], munged=False)
        time.sleep(1.0)
        assert _alive(daemon.pid) and watcher.poll() is None
        if stopped_first:
            stopped.touch()
            watcher.wait(timeout=10)
        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=10)
        if stopped_first:
            time.sleep(1.5)
            assert _alive(daemon.pid)
        else:
            assert _wait_gone(daemon.pid), "the daemon outlived the killed session"
            watcher.wait(timeout=10)
    finally:
        for p in (daemon, owner):
            p.kill()
            p.wait(timeout=10)
