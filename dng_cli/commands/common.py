"""Shared plumbing of the command modules: the Hydra entry wrapper, devices, atomic writes."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from dng_cli import RunRefused, UserError, one_line, runs
from dng_cli.io import atomic_write_text
from dng_cli.runs import RunLock

CONFIG_PATH = "pkg://dng_cli.configs"
log = logging.getLogger("dng")


def entry(config_name: str, run: Callable[[DictConfig, Path], Any], cleanup: bool = True, lock: bool = True,
          commits: bool = False):
    """A ``@hydra.main`` function for ``run``.

    - one-line errors for bad input (``UserError``); a run dir that this process created and that then
      holds nothing but its own Hydra files is removed (no half-written outputs, no empty folders) —
      never a folder, lock or config of another process;
    - with ``lock``, the run folder is locked for the run (a second process is refused), a folder holding
      another command's result is refused, and the temporaries of interrupted writes in it are removed;
    - Hydra writes the job's config to this process's own ``.hydra_pending-<host>-<pid>/``, which replaces
      ``.hydra/`` only with the result it describes: ``commits`` commands (evaluate) promote it in their
      result's commit (a skipped finished run leaves ``.hydra`` as it was), the others once they succeed;
      a refused or failed run never leaves its config next to results it did not make;
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
        if hc.output_subdir is not None:
            runs.set_pending(output_dir, output_dir / str(hc.output_subdir))
        try:
            try:
                with RunLock(output_dir) if lock else contextlib.nullcontext():
                    if lock:
                        runs.claim(output_dir, config_name)
                        runs.clean_folder(output_dir)
                    result = run(cfg, output_dir)
                    if commits:
                        runs.drop_config(output_dir)  # still pending: the run was skipped, .hydra stays as it was
                    else:
                        runs.promote_config(output_dir)
            except BaseException as err:
                # a failed job keeps its config next to its error.txt, unless the folder holds a result
                if multirun and not isinstance(err, RunRefused) and not runs.has_result(output_dir):
                    runs.promote_config(output_dir)
                elif not (cleanup and not multirun and isinstance(err, (UserError, OSError))):
                    runs.drop_config(output_dir)
                raise
            (output_dir / "error.txt").unlink(missing_ok=True)
            return result
        except Exception as err:
            if multirun:
                log.exception("job %s failed", output_dir)
                atomic_write_text(output_dir / "error.txt", f"{type(err).__name__}: {one_line(err)}\n")
                return None
            if isinstance(err, (UserError, OSError)):
                if cleanup:
                    runs.remove_if_ours(output_dir)
                    runs.drop_config(output_dir)
                fail(one_line(err))
            raise
        finally:
            runs.set_pending(output_dir, None)

    return main


class RunFolder(Callback):
    """Hydra callback (``hydra.callbacks.run_folder``): before Hydra creates a single run's folder, check
    its path and note whether it existed (``runs.note_run_folder``)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        runs.note_run_folder(Path(str(config.hydra.run.dir)))


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


def fail(message: str, code: int = 2) -> None:
    """Print one line to stderr and exit non-zero (no traceback)."""
    print(f"dng: error: {message}", file=sys.stderr)
    sys.exit(code)


