"""Shared plumbing of the command modules: the Hydra entry wrapper, devices, atomic writes."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from dng_cli import RunRefused, UserError, one_line
from dng_cli.pipeline import hardware, plain, setup_torch  # noqa: F401  (re-exported for commands)
from dng_cli.io import LOCK_NAME, RunLock, atomic_save, atomic_write_text, clean_temporaries, write_json  # noqa: F401

CONFIG_PATH = "pkg://dng_cli.configs"
log = logging.getLogger("dng")


PENDING_SUBDIR = ".hydra_pending"  # Hydra writes a job's config here; it becomes .hydra once the run is admitted


def entry(config_name: str, run: Callable[[DictConfig, Path], Any], cleanup: bool = True, lock: bool = True):
    """A ``@hydra.main`` function for ``run``.

    - one-line errors for bad input (``UserError``); a run dir that then holds nothing but Hydra's
      own files is removed (no half-written outputs, no empty folders);
    - with ``lock``, the run folder is locked for the run (a second process is refused), and the
      temporaries of interrupted writes in it are removed first;
    - Hydra writes the job's config to ``.hydra_pending/``, which replaces ``.hydra/`` only once the
      run is admitted: a refused run never leaves a config next to results it did not make;
    - a failing multirun job writes ``error.txt`` and the other jobs go on; a job that succeeds
      removes an earlier ``error.txt``."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    @hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=config_name)
    def main(cfg: DictConfig) -> Any:
        hc = HydraConfig.get()
        output_dir = Path(hc.runtime.output_dir)
        multirun = hc.mode == RunMode.MULTIRUN
        try:
            with RunLock(output_dir) if lock else contextlib.nullcontext():
                if lock:
                    clean_temporaries(output_dir)
                admitted = False
                try:
                    result = run(cfg, output_dir)
                    admitted = True
                except BaseException as err:
                    # a refused run or a single run's bad input leaves the folder's config as it was;
                    # a job that failed keeps its config next to its error.txt
                    admitted = not isinstance(err, RunRefused) and (multirun or not isinstance(err, UserError))
                    raise
                finally:
                    _settle_config(output_dir, admitted)
            (output_dir / "error.txt").unlink(missing_ok=True)
            return result
        except Exception as err:
            if multirun:
                log.exception("job %s failed", output_dir)
                atomic_write_text(output_dir / "error.txt", f"{type(err).__name__}: {one_line(err)}\n")
                return None
            if isinstance(err, (UserError, OSError)):
                if cleanup:
                    remove_if_only_hydra(output_dir)
                fail(one_line(err))
            raise

    return main


class SweepStatus(Callback):
    """Hydra callback (``hydra.callbacks.sweep_status``): after a multirun, one line naming the jobs
    that failed (their ``error.txt``) and a non-zero exit when any did."""

    start = 0.0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.start = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(str(config.hydra.sweep.dir))
        failed = sorted(p.parent for p in sweep.glob("**/error.txt") if p.stat().st_mtime >= self.start - 1)
        if failed:
            first = (failed[0] / "error.txt").read_text().strip().splitlines()[0]
            print(f"dng: error: {len(failed)} job(s) of the sweep failed (their error.txt), first "
                  f"{failed[0].name}: {first}", file=sys.stderr)
            sys.exit(1)


def _settle_config(output_dir: Path, admitted: bool) -> None:
    """Promote the job's pending Hydra config to ``.hydra`` (admitted runs) or drop it (refused ones)."""
    pending = output_dir / PENDING_SUBDIR
    if not pending.is_dir():
        return
    if admitted:
        target = output_dir / ".hydra"
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(pending, target)
    else:
        shutil.rmtree(pending, ignore_errors=True)


def remove_if_only_hydra(path: Path) -> None:
    """Delete ``path`` when all it holds is Hydra's bookkeeping (.hydra/, .hydra_pending/, *.log):
    never user results; then its parents up to ``outputs/`` if they were left empty."""
    bookkeeping = (".hydra", PENDING_SUBDIR, LOCK_NAME)
    if not (path.is_dir() and all(e.name in bookkeeping or e.suffix == ".log" for e in path.iterdir())):
        return
    shutil.rmtree(path, ignore_errors=True)
    parent = path.resolve().parent
    if "outputs" not in parent.parts:
        return
    while parent.name != "outputs":  # e.g. outputs/evaluate/ left empty by this run
        try:
            parent.rmdir()  # only if empty
        except OSError:
            break
        parent = parent.parent


def fail(message: str, code: int = 2) -> None:
    """Print one line to stderr and exit non-zero (no traceback)."""
    print(f"dng: error: {message}", file=sys.stderr)
    sys.exit(code)


