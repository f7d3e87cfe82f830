"""A real single-node SLURM cluster for the tests (and the recipe to try ``launcher=slurm`` on a laptop).

Debian's ``slurm-wlm`` (22.05) with ``munge``: installed with apt-get when missing (root only), a minimal
``slurm.conf`` for this one machine (``proctrack/linuxproc``, ``task/none``, no accounting database) in a
scratch folder that ``SLURM_CONF`` points at for the daemons and the clients, ``munged``, ``slurmctld`` and
``slurmd`` started in the background, and ``sinfo`` polled until the node is idle. ``stop()`` ends what
``start()`` started. Without an accounting database ``sacct`` fails; submitit then reads job states from
squeue/scontrol (it logs a "Bypassing sacct error" warning at each poll)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ["slurm-wlm", "munge"]


def installed() -> bool:
    return all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "sinfo", "munged"))


def install() -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-qq", *PACKAGES], check=True, env=env, capture_output=True,
                   timeout=900)


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
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([f"/usr/sbin/{daemon}", "-f", str(self.conf)], check=True, capture_output=True, timeout=60)
            self.started.append(self.dir / f"{daemon}.pid")
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
        time.sleep(1)
        if self.munged:
            subprocess.run(["pkill", "-x", "munged"], capture_output=True)
        os.environ.pop("SLURM_CONF", None)
