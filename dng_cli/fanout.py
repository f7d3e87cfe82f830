"""Independent units of `dng compare` / `dng calibrate` as jobs of the configured launcher.

``dng compare launcher=slurm`` (or ``launcher=local``) without ``-m``: the submitting process builds a submitit
executor from the same ``hydra.launcher`` settings a ``-m`` sweep uses (partition, time limit, GPUs, setup lines,
…), runs each method's calibration as one job, each evaluation point as one job, waits for them, and writes
the tables itself. Every job re-uses the run folders' fingerprints, so a re-run resumes from whatever finished
(the submitter reads the finished units itself and queues only the others: ``finished``), and a job that fails
makes the command fail with a count line after the others have finished. In a ``-m`` sweep the command is itself
a launcher job and runs its units inline.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

from dng_cli import UserError, one_line

log = logging.getLogger(__name__)
EXECUTORS = {"SlurmLauncher": "slurm", "LocalLauncher": "local"}  # hydra-submitit-launcher's classes
SPECIFIC_INIT_KEYS = {"max_num_timeout"}
ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)(: .*)?$")  # a traceback's last line


class Runner:
    """Maps a function over argument tuples as submitit jobs (one job each) and waits for all of them."""

    def __init__(self, cluster: str, params: dict, folder: Path):
        import submitit

        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
        from omegaconf import OmegaConf

        self.cluster, self.folder = cluster, folder
        self._submitting = threading.Lock()  # methods submit from their own threads; a batch is one sbatch call
        init = {"folder": str(folder / ".submitit" / "%j")}
        init.update({f"{cluster}_{k}": v for k, v in params.items() if k in SPECIFIC_INIT_KEYS})
        self.executor = submitit.AutoExecutor(cluster=cluster, **init)
        base = set(OmegaConf.structured(BaseQueueConf).keys())  # as the launcher maps them
        self.executor.update_parameters(**{k if k in base else f"{cluster}_{k}": v for k, v in params.items()
                                           if k not in SPECIFIC_INIT_KEYS | {"submitit_folder", "_target_"}})

    def map(self, fn: Callable, calls: Sequence[tuple], what: str,
            ready: Callable[..., Any] | None = None) -> list[Any]:
        """``fn(*args)`` for each args as one job; the results in order. ``ready(*args)``: the result when it is
        already on disk, else None; such a call is not queued. Raises one UserError naming how many failed once
        every job has ended."""
        if not calls:
            return []
        results: list[Any] = [ready(*args) if ready is not None else None for args in calls]
        todo = [i for i, r in enumerate(results) if r is None]
        finished = f" ({len(calls) - len(todo)} finished already)" if len(todo) < len(calls) else ""
        if not todo:
            log.info("%s: all %d unit(s) finished already: no job submitted", what, len(calls))
            return results
        with self._submitting, self.executor.batch():
            jobs = [self.executor.submit(fn, *calls[i]) for i in todo]
        log.info("%s: %d %s job(s) submitted%s: %s", what, len(jobs), self.cluster, finished,
                 ", ".join(j.job_id for j in jobs))
        failed = []
        for i, job in zip(todo, jobs):
            try:
                results[i] = job.result()
            except Exception as err:  # submitit's FailedJobError carries the job's traceback: keep its error line
                errors = [line for line in str(err).splitlines() if ERROR_LINE.match(line)]
                failed.append(f"job {job.job_id}: {errors[-1] if errors else one_line(err)}")
        if failed:
            raise UserError(f"{what}: {len(failed)} of {len(jobs)} jobs failed (logs under {self.folder / '.submitit'}); "
                            f"first: {failed[0]}")
        return results


def runner(output_dir: Path) -> Runner | None:
    """A Runner for the launcher of this ``dng`` run, or None (no launcher, a ``-m`` job, or outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    target = str(hc.launcher.get("_target_", ""))
    cluster = EXECUTORS.get(target.rsplit(".", 1)[-1])
    if cluster is None or hc.mode == RunMode.MULTIRUN:
        return None
    whole = OmegaConf.create({"hydra": OmegaConf.to_container(hc, resolve=False)})  # its ${hydra.job.name} etc.
    whole.hydra.launcher.pop("submitit_folder", None)  # the units' logs go under this run's folder instead
    params = OmegaConf.to_container(whole.hydra.launcher, resolve=True)
    return Runner(cluster, params, Path(output_dir).resolve())


PATH_KEYS = ("dataset.root", "metrics.fid.cache_dir", "model.path", "model.classifier", "model.unconditional",
             "metrics.fid.inception_weights")


def absolute_paths(config: dict) -> dict:
    """The plain config a job gets, with its relative paths made absolute against the submitting directory: a job
    may start elsewhere (another node's working directory). Data and cache folders always; model and classifier
    values only when they name an existing path here (else they are shipped names such as "mnist")."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(config)
    for key in PATH_KEYS:
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, str) or os.path.isabs(value):
            continue
        if key in ("dataset.root", "metrics.fid.cache_dir") or os.path.exists(value):
            OmegaConf.update(cfg, key, os.path.abspath(value))
    return OmegaConf.to_container(cfg)


def finished(fn: Callable, config: dict, *args):
    """What ``unit(fn, config, *args)`` would return when every result it needs is already on disk (read, nothing
    computed), else None: a Runner's ``ready`` for the units of compare and calibrate."""
    from omegaconf import OmegaConf

    from dng_cli import runs

    with runs.only_finished():
        try:
            return fn(OmegaConf.create(config), *args)
        except runs.Unfinished:
            return None


def unit(fn: Callable, config: dict, *args):
    """What a launcher job runs: ``fn(cfg, *args)`` on the plain config, with its log lines in the job's .out file."""
    from omegaconf import OmegaConf

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    return fn(OmegaConf.create(config), *args)
