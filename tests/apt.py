"""Debian packages the tests need (slurm-wlm and munge for the real SLURM, chromium for the report page), installed
with apt-get as root when missing — one install at a time on the machine: ``apt-get update`` and ``install`` run
under a machine-wide flock (``LOCK``), so pytest-xdist workers (or two test sessions) that both need a package
never race apt's list lock or dpkg's lock; a second one waits, then finds the package installed."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

LOCK = Path(tempfile.gettempdir()) / "dng-apt-tests.lock"


@contextmanager
def flock(path: Path, timeout: float, what: str):
    """Hold an exclusive flock on ``path`` (the kernel drops it when the holder dies, however it dies)."""
    path.touch(exist_ok=True)
    with open(path, "r+") as fh:
        deadline = time.time() + timeout
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.time() > deadline:
                    raise RuntimeError(f"another process has held {path} ({what}) for {timeout:.0f} s")
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def install(packages: list[str], binaries: list[str]) -> None:
    """``packages`` with apt-get unless every one of ``binaries`` is already on PATH (checked again under the lock:
    whoever waited finds the first installer's work done)."""
    if all(shutil.which(b) for b in binaries):
        return
    with flock(LOCK, 1800.0, "an apt-get install of the tests"):
        if all(shutil.which(b) for b in binaries):
            return
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True, timeout=600)
        # DPkg::Lock::Timeout: wait for a dpkg run of somebody else's (unattended upgrades) instead of failing at once
        subprocess.run(["apt-get", "install", "-y", "-qq", "-o", "DPkg::Lock::Timeout=600", *packages], check=True,
                       env=env, capture_output=True, timeout=900)
