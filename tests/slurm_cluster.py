"""A real single-node SLURM cluster for the tests (and the recipe to try ``launcher=slurm`` on a laptop).

Debian's ``slurm-wlm`` (22.05) with ``munge``: installed with apt-get when missing (root only), a minimal
``slurm.conf`` for this one machine (``proctrack/linuxproc``, ``task/none``, no accounting database) in a
scratch folder that ``SLURM_CONF`` points at for the daemons and the clients, ``munged``, ``slurmctld`` and
``slurmd`` started in the background, and ``sinfo`` polled until the node is idle. ``stop()`` ends what
``start()`` started; a watcher process ends it too when the process that started it dies without stopping it
(``kill -9`` of a test session). ``machine_lock()`` serialises install and cluster across processes: pytest-xdist
workers that both need a cluster take turns instead of racing apt-get's dpkg lock or the daemons' ports. Without an accounting database ``sacct`` fails; submitit then reads job states from
squeue/scontrol (it logs a "Bypassing sacct error" warning at each poll)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

PACKAGES = ["slurm-wlm", "munge"]
LOCK = Path(tempfile.gettempdir()) / "dng-slurm-tests.lock"
DAEMONS = ("slurmctld", "slurmd")


@contextmanager
def machine_lock(timeout: float = 3600.0):
    """Hold this machine's test-cluster lock (an flock: the kernel drops it when the holder dies, however it dies).
    Install, start, use and stop happen under it, so at most one process at a time installs packages or runs a
    cluster; a second one waits for the first to stop its cluster."""
    from apt import flock

    with flock(LOCK, timeout, "the test SLURM cluster"):
        yield


def installed() -> bool:
    return all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "sinfo", "munged"))


def install() -> None:
    """slurm-wlm and munge, under the tests' apt lock (tests/apt.py: never beside another apt-get of the tests)."""
    import apt

    apt.install(PACKAGES, ["slurmctld", "slurmd", "sbatch", "sinfo", "munged"])


def _leftover_daemons() -> list[int]:
    """pids of slurmctld/slurmd processes of a test cluster (their command line names a ``dng-slurm-`` config)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        name = Path(cmd[0].decode(errors="replace")).name if cmd and cmd[0] else ""
        if name in DAEMONS and any(b"dng-slurm-" in part for part in cmd):
            pids.append(int(proc.name))
    return pids


# Run detached from the test session (own session, so a kill of pytest's process group spares it): waits until the
# pid that started the cluster is gone, then ends the daemons it started; exits quietly once `stopped` exists.
WATCHER = """
import os, signal, sys, time
owner, stopped, pidfiles, munged = int(sys.argv[1]), sys.argv[2], sys.argv[3].split(","), sys.argv[4] == "1"
while not os.path.exists(stopped):
    try:
        os.kill(owner, 0)
    except ProcessLookupError:
        for p in pidfiles:
            try:
                os.kill(int(open(p).read().strip()), signal.SIGTERM)
            except (OSError, ValueError):
                pass
        if munged:
            os.system("pkill -x munged")
        break
    time.sleep(0.5)
"""


def watch(owner: int, stopped: Path, pidfiles: list[Path], munged: bool) -> subprocess.Popen:
    """Start the watcher: when ``owner`` dies before ``stopped`` exists, SIGTERM the pids in ``pidfiles``."""
    return subprocess.Popen([sys.executable, "-c", WATCHER, str(owner), str(stopped), ",".join(map(str, pidfiles)),
                             "1" if munged else "0"], start_new_session=True, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class Cluster:
    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="dng-slurm-"))
        self.conf = self.dir / "slurm.conf"
        self.started: list[Path] = []  # pid files of the daemons this object started
        self.munged = False

    def _munge(self) -> None:
        ok = subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0
        if ok:
            return
        for d in ("/run/munge", "/var/log/munge", "/var/lib/munge", "/etc/munge"):
            Path(d).mkdir(parents=True, exist_ok=True)
            shutil.chown(d, "munge", "munge")
        if not Path("/etc/munge/munge.key").is_file():
            subprocess.run(["mungekey", "-c"], check=True, capture_output=True)
            shutil.chown("/etc/munge/munge.key", "munge", "munge")
        # --force: start even over a stale socket that a killed munged left behind
        subprocess.run(["su", "-s", "/bin/sh", "munge", "-c", "/usr/sbin/munged --force"], check=True, capture_output=True)
        self.munged = True
        deadline = time.time() + 30
        while subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode != 0:
            if time.time() > deadline:
                raise RuntimeError("munged did not start: see /var/log/munge/munged.log")
            time.sleep(0.5)

    def start(self, timeout: float = 90.0) -> "Cluster":
        self._munge()
        host = socket.gethostname().split(".")[0]
        for sub in ("state", "spool", "log"):
            (self.dir / sub).mkdir()
        cpus = os.cpu_count() or 2
        self.conf.write_text(f"""ClusterName=dngtest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={self.dir}/state
SlurmdSpoolDir={self.dir}/spool
SlurmctldPidFile={self.dir}/slurmctld.pid
SlurmdPidFile={self.dir}/slurmd.pid
SlurmctldLogFile={self.dir}/log/slurmctld.log
SlurmdLogFile={self.dir}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
MinJobAge=600
KillWait=5
NodeName={host} CPUs={cpus} RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        os.environ["SLURM_CONF"] = str(self.conf)
        for pid in _leftover_daemons():  # a cluster of a killed session would hold the ports
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for daemon in DAEMONS:
            subprocess.run([f"/usr/sbin/{daemon}", "-f", str(self.conf)], check=True, capture_output=True, timeout=60)
            self.started.append(self.dir / f"{daemon}.pid")
        watch(os.getpid(), self.dir / "stopped", self.started, self.munged)
        deadline = time.time() + timeout
        while time.time() < deadline:
            res = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
            if res.returncode == 0 and "idle" in res.stdout:
                return self
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"the SLURM node did not become idle in {timeout:.0f} s (logs in {self.dir / 'log'})")

    def stop(self) -> None:
        subprocess.run(["scancel", "--user", "root"], capture_output=True)
        for pidfile in reversed(self.started):
            try:
                os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
            except (OSError, ValueError):
                pass
        deadline = time.time() + 20
        while _leftover_daemons() and time.time() < deadline:
            time.sleep(0.5)
        (self.dir / "stopped").touch()  # the watcher's sign that the cluster was stopped on purpose
        if self.munged:
            subprocess.run(["pkill", "-x", "munged"], capture_output=True)
        os.environ.pop("SLURM_CONF", None)
