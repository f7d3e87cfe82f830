"""A run folder's owner: result identity, the exclusive lock, finished results, the identity of saved
samples, what a rescore may use, and the replacement of a result only once its successor is complete.

Every command reaches its folder through this module:
- ``RunLock``: one process per folder (flock on ``.dng.lock``, see its docstring for why and for clusters);
- ``result_config`` / ``identity_config`` / ``fingerprint``: what identifies a result, so a finished run is
  skipped only for the very config that made it and refused for any other;
- ``finished_result``: the decision for a folder that already holds ``metrics.json``;
- ``ResultStage``: a result's files are written aside and renamed in, ``metrics.json`` last, and the
  folder's ``.hydra`` is replaced only together with it;
- ``saved_samples``: a rescore reads ``samples.npz`` only when it carries the samples fingerprint of the
  result it would rescore;
- ``claim``: a folder holding another command's result is refused;
- ``note_run_folder`` / ``remove_if_ours``: a refused run removes only a folder it created itself.

Layer: below the domain modules; it imports ``io`` and nothing else of ``dng_cli`` but the errors.
What depends on models (weight hashes, the model's noise schedule) is handed in by the caller.
"""

from __future__ import annotations

import contextvars
import errno
import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from dng_cli import RunRefused, UserError, io, one_line
from dng_cli.io import LOCK_NAME, TEMP_MARK

log = logging.getLogger("dng")

# ------------------------------------------------------------------------------------------ identity
# Keys that change how fast a result is made or where files live, never the numbers in it.
NOT_RESULT_KEYS = ("skip_existing", "overwrite", "save_samples", "label", "grids", "grid_index", "sampler.batch_size",
                   "sampler.max_batch", "sampler.channels_last", "sampler.compile", "sampler.progress",
                   "sampler.num_threads", "sampler.device", "dataset.root", "metrics.fid.cache_dir", "model.path",
                   "model.classifier", "model.unconditional", "model.forbidden_models",
                   "metrics.fid.inception_weights", "logger")
# Inference backends whose samples are torch's up to float error that never flipped a class in the paired table
# (docs/results/backends): they share torch's identity; any other backend is part of a result's identity.
TORCH_IDENTICAL_BACKENDS = ("torch",)
RESCORE_PREFIX = "metrics."  # settings that change how saved samples are scored, never the samples
NOT_SAMPLING_KEYS = ("weights.classifier", "weights.dataset")  # identity keys that score samples but do not draw them


def result_config(config: dict) -> dict:
    """The resolved config minus speed/progress/path keys (see NOT_RESULT_KEYS)."""
    return {k: _canonical(v) for k, v in io.flatten(config)
            if not any(k == n or k.startswith(n + ".") for n in NOT_RESULT_KEYS)}


def _canonical(value):
    """Numbers compare by value (a scale given as 2 on the command line is the yaml's 2.0)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


def identity_config(config: dict, schedule_of: Callable[[dict], dict]) -> dict:
    """``result_config`` with the keys results were identified by before ``forbidden`` moved to the top
    level and the schedule into the model folder (``schedule_of(model config) -> keys``), so results
    written before either stay reusable."""
    config = dict(config)
    if "forbidden" in config:
        config["method"] = {**config.get("method", {}), "forbidden": config.pop("forbidden")}
    identity = result_config(config)
    if identity.get("model.null_label") == "last":  # the convention every result before the key had
        del identity["model.null_label"]
    if identity.get("sampler.precision") == "fp32":  # likewise: every result before the key ran in fp32
        del identity["sampler.precision"]
    if identity.get("sampler.backend", "torch") in TORCH_IDENTICAL_BACKENDS:  # as every result before the key
        identity.pop("sampler.backend", None)
    if isinstance(config.get("model"), dict):
        identity.update(schedule_of(config["model"]))
    return identity


def identity(config: dict, weights: dict, schedule_of: Callable[[dict], dict]) -> dict:
    """Everything that determines a result: its identity config and the hashes of the weights it used."""
    return {**identity_config(config, schedule_of), **{f"weights.{k}": v for k, v in weights.items()}}


def identity_weights(identity: dict) -> dict:
    return {k[len("weights."):]: v for k, v in identity.items() if k.startswith("weights.")}


def samples_fingerprint(identity: dict) -> str:
    """The fingerprint of what drew the samples: the identity without the metric settings and the
    classifier, which only score them. Stored in samples.npz and metrics.json."""
    return io.fingerprint({k: v for k, v in identity.items()
                           if not k.startswith(RESCORE_PREFIX) and k not in NOT_SAMPLING_KEYS})


# ------------------------------------------------------------------------------------ finished results
RESULT_NAME = "metrics.json"
NOISE = "cpu-generators"  # every noise tensor from per-seed CPU generators, moved to the device


def device_noise(old: dict) -> str | None:
    """The device of a result whose noise came from generators on that device (dng before CPU-drawn noise,
    run on a GPU): its samples are not the ones a run now draws for the same seeds. None otherwise."""
    if old.get("noise") == NOISE:
        return None
    device = (old.get("rescored") or {}).get("sampled_on") or old.get("sampled_on") or (
        (old.get("config") or {}).get("sampler") or {}).get("device")
    return None if device is None or str(device).startswith("cpu") else str(device)


def finished_result(metrics_path: Path, identity: dict, fingerprint: str, recompute: bool,
                    schedule_of: Callable[[dict], dict]) -> dict | None:
    """The finished result in ``metrics_path`` when it was made by this very config, else None (recompute:
    the old file stays until the new result replaces it). A result of another config is refused, never
    reused, with one exception: when only metric settings differ (``metrics.*``, e.g. Inception FID turned
    on) and the run saved its samples, the old result comes back with ``"rescore": [the changed keys]``."""
    old = io.read_json_object(metrics_path)
    if recompute or old is None:
        log.info("%s: recomputing (%s); the old file stays until the new result replaces it", metrics_path,
                 "overwrite=true" if recompute else "unreadable")
        return None
    for key, kind in (("fingerprint", str), ("config", dict), ("weights", dict)):
        if old.get(key) is not None and not isinstance(old[key], kind):
            raise RunRefused(f"{metrics_path} is not a dng result (its {key} is a {type(old[key]).__name__}, not "
                             f"{'a string' if kind is str else 'an object'}): use another output folder, or "
                             f"overwrite=true to recompute it")
    elsewhere = device_noise(old)
    if elsewhere is not None:
        raise RunRefused(f"{metrics_path.parent} holds a run sampled on {elsewhere} with noise drawn there (dng before "
                         f"all noise came from CPU generators): this config now draws other samples for the same seeds; "
                         f"use another output folder, or overwrite=true to resample it")
    if old.get("fingerprint") == fingerprint:
        log.info("%s was made by this config: skipping finished run", metrics_path)
        return old
    old_weights = old.get("weights") if old.get("fingerprint") is not None else identity_weights(identity)
    old_identity = {**identity_config(old.get("config") or {}, schedule_of),
                    **{f"weights.{k}": v for k, v in (old_weights or {}).items()}}
    if old.get("fingerprint") is None and old_identity == identity:  # written before fingerprints
        log.warning("%s predates result fingerprints: its config matches, its weights were not recorded; "
                    "skipping finished run", metrics_path)
        return old
    changed = io.differences(old_identity, identity)
    if changed and all(k.startswith(RESCORE_PREFIX) for k, _, _ in changed) and (metrics_path.parent / "samples.npz").is_file():
        return {**old, "rescore": sorted(k for k, _, _ in changed)}
    key, there, here = changed[0] if changed else ("fingerprint", old.get("fingerprint"), fingerprint)
    raise RunRefused(f"{metrics_path.parent} holds a finished run of another config ({key}={there!r} there, "
                     f"{here!r} here): use another output folder, or overwrite=true to recompute it")


class ResultFolder:
    """A run folder as one result config sees it (``identity``/``fingerprint`` of ``spec.RunSpec``): its finished
    result (``finished``: skipped, or marked ``"rescore"`` when only metric settings differ), the batches drawn so
    far (``partial``), the saved samples of a result to rescore (``saved``) and a stage for the next commit."""

    def __init__(self, folder: Path, identity: dict, fingerprint: str, recompute: bool,
                 schedule_of: Callable[[dict], dict], shape: tuple[int, ...]):
        self.folder, self.identity, self.fingerprint = Path(folder), dict(identity), fingerprint
        self.recompute, self.schedule_of, self.shape = recompute, schedule_of, tuple(shape)
        self.samples_fp = samples_fingerprint(self.identity)

    def finished(self) -> dict | None:
        """This config's finished result (``finished_result``), else None; another config's is refused."""
        path = self.folder / RESULT_NAME
        return finished_result(path, self.identity, self.fingerprint, self.recompute,
                               self.schedule_of) if path.exists() else None

    def finished_only(self) -> dict:
        """Under ``only_finished``: the finished result (read only, no lock), else ``Unfinished`` (also when it
        would be rescored: that computes)."""
        found = self.finished()
        if found is None or "rescore" in found:
            raise Unfinished(str(self.folder))
        return found

    def partial(self) -> "PartialBatches":
        """The batches drawn so far for these samples (they survive a kill)."""
        return PartialBatches(self.folder, self.samples_fp, self.shape)

    def saved(self, old: dict, seeds: list[int]):
        """The uint8 images of ``old``'s samples.npz for ``seeds`` (``saved_samples``)."""
        images, _ = saved_samples(self.folder, old, seeds, self.shape, self.samples_fp)
        return images

    def stage(self) -> "ResultStage":
        return ResultStage(self.folder)


class Unfinished(Exception):
    """A result that would have to be computed, asked for under ``only_finished``."""


_ONLY_FINISHED = contextvars.ContextVar("dng_only_finished", default=False)


@contextmanager
def only_finished() -> Iterator[None]:
    """Within this block an evaluation returns its finished result, read without taking the folder's lock, or
    raises ``Unfinished``: nothing is sampled or scored (a calibration replayed from finished probes still writes
    its calibration.json, under the command's lock). What a launcher's submitter asks before it queues a
    unit, so that a resumed compare does not queue jobs that would only find their results."""
    token = _ONLY_FINISHED.set(True)
    try:
        yield
    finally:
        _ONLY_FINISHED.reset(token)


def only_finished_asked() -> bool:
    return _ONLY_FINISHED.get()


# ---------------------------------------------------------------------------------------- samples
SAMPLES_NAME = "samples.npz"


def save_samples(path: Path, images, seeds: list[int], samples_fp: str, sampled_on: str, command: str,
                 **extra) -> None:
    """samples.npz: uint8 images, their seeds, and what drew them (fingerprint, device, command)."""
    import numpy as np

    io.atomic_savez(path, compressed=True, images=images, seeds=np.asarray(seeds), fingerprint=np.asarray(samples_fp),
                    sampled_on=np.asarray(sampled_on), command=np.asarray(command), **extra)


def saved_samples(folder: Path, result: dict, seeds: list[int], shape: tuple[int, ...],
                  expected_fp: str | None) -> tuple[Any, list[int]]:
    """The images of ``folder/samples.npz`` for a rescore of ``result`` — only when the file is readable,
    holds ``seeds`` in ``shape`` and was drawn by that result (its samples fingerprint; a file from before
    fingerprints is taken only when it is not newer than the result). Anything else: one-line RunRefused."""
    import numpy as np

    path = Path(folder) / SAMPLES_NAME
    redo = "use another output folder, or overwrite=true to sample it again"
    try:
        with np.load(path, allow_pickle=False) as f:
            images, got = f["images"], f["seeds"].tolist()
            fp = str(f["fingerprint"]) if "fingerprint" in f.files else None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise RunRefused(f"{path} is unreadable ({type(err).__name__}: {one_line(err)}): {redo}") from None
    if images.dtype != np.uint8 or tuple(images.shape[1:]) != tuple(shape) or len(images) != len(got):
        raise RunRefused(f"{path} holds {images.dtype} images of shape {tuple(images.shape)} for {len(got)} seeds, "
                         f"not uint8 images of shape {tuple(shape)}: {redo}")
    if got != seeds:
        raise RunRefused(f"{path} holds {len(got)} samples from seed {got[0] if got else None}, not the {len(seeds)} "
                         f"from seed {seeds[0] if seeds else None} this config draws: {redo}")
    recorded = (result.get("samples") or {}).get("fingerprint") or expected_fp
    if fp is not None and fp != recorded:
        raise RunRefused(f"{path} was drawn by another config (samples fingerprint {fp}, the result's is "
                         f"{recorded}): {redo}")
    if fp is None:
        result_path = Path(folder) / RESULT_NAME
        if result_path.is_file() and path.stat().st_mtime > result_path.stat().st_mtime + 1.0:
            raise RunRefused(f"{path} has no samples fingerprint and is newer than {RESULT_NAME}, so it was not "
                             f"written by that run: {redo}")
    return images, got


# ------------------------------------------------------------------------------ partial progress
PARTIAL_PREFIX = ".partial-"


class PartialBatches:
    """Finished batches of a run not yet complete: ``<folder>/.partial-<samples fingerprint>/batch-*.npz``,
    each written atomically as it finishes (uint8 images, posterior, scale, seeds, seconds). A restarted run of
    the same samples fingerprint draws only the missing seeds — samples depend on their seeds alone, so the
    batch size may differ between attempts — and the result equals an uninterrupted run's."""

    def __init__(self, folder: Path, samples_fp: str, shape: tuple[int, ...] | None = None):
        self.dir = Path(folder) / f"{PARTIAL_PREFIX}{samples_fp}"
        self.fingerprint, self.shape = samples_fp, tuple(shape) if shape is not None else None

    def save(self, seeds: list[int], images, posterior, scale, seconds: float) -> None:
        import numpy as np

        self.dir.mkdir(parents=True, exist_ok=True)
        io.atomic_savez(self.dir / f"batch-{seeds[0]}-{len(seeds)}.npz", seeds=np.asarray(seeds), images=images,
                        posterior=posterior, scale=scale, seconds=np.asarray(float(seconds)),
                        fingerprint=np.asarray(self.fingerprint))
        io.pause_for_tests("evaluate_batch")

    def load(self, seeds: list[int]) -> dict[int, tuple]:
        """seed -> (image, posterior [steps, ...], scale [steps], seconds share) for every saved seed wanted."""
        import numpy as np

        wanted, found = set(seeds), {}
        for path in sorted(self.dir.glob("batch-*.npz")) if self.dir.is_dir() else []:
            try:
                with np.load(path, allow_pickle=False) as f:
                    b_seeds, images, post, scale, secs = (f["seeds"].tolist(), f["images"], f["posterior"], f["scale"],
                                                          float(f["seconds"]))
                    fp = str(f["fingerprint"]) if "fingerprint" in f.files else None
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error):
                log.warning("ignoring unreadable partial batch %s", path)
                continue
            if fp != self.fingerprint:  # a batch of another run (or of a version that did not record it)
                log.warning("ignoring partial batch %s: drawn by another config (samples fingerprint %s, this run's "
                            "is %s); its seeds are drawn again", path, fp, self.fingerprint)
                continue
            n = len(b_seeds)
            if (images.ndim < 2 or len(images) != n or post.shape[1:2] != (n,) or scale.shape[1:2] != (n,)
                    or (self.shape is not None and tuple(images.shape[1:]) != self.shape)):
                log.warning("ignoring partial batch %s: its arrays do not fit (images %s for %d seeds, expected %s)",
                            path, tuple(images.shape), n, self.shape)
                continue
            for j, seed in enumerate(b_seeds):
                if seed in wanted and seed not in found:
                    found[seed] = (images[j], post[:, j], scale[:, j], secs / len(b_seeds))
        return found

    def clear(self) -> None:
        for entry in Path(self.dir.parent).glob(f"{PARTIAL_PREFIX}*"):
            shutil.rmtree(entry, ignore_errors=True)


# ------------------------------------------------------------------------------ writing a result
class ResultStage:
    """A result's files are written into a private stage folder (``path(name)``) and ``commit`` moves them
    into the run folder, then the folder's pending Hydra config, then ``metrics.json`` last: until the
    commit an earlier result stays whole, and a kill leaves a ``.result.tmp-*`` folder that the next run
    of the folder removes."""

    def __init__(self, folder: Path, result_name: str = RESULT_NAME):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.result_name = result_name
        self.stage = Path(tempfile.mkdtemp(prefix=f".result{TEMP_MARK}", dir=self.folder))
        self.removed: list[str] = []

    def path(self, name: str) -> Path:
        return self.stage / name

    def remove(self, name: str) -> None:
        """Delete ``name`` from the run folder at the commit (a file the new result must not sit beside)."""
        self.removed.append(name)

    def commit(self, result: dict) -> None:
        """All or nothing: every old file the new ones replace or ``remove`` names goes aside into the stage, the new
        ones move in, then the config, then the new marker (``metrics.json``, atomically over the old one: until then
        the old result stays the folder's finished result). If any step fails, the new files are taken out and the
        old ones put back, so a failed commit never leaves files of two runs. (A SIGKILL inside these few
        milliseconds can: the old marker then sits beside new samples, whose samples fingerprint every reader
        checks — a rescore or compare refuses them — and a re-run recomputes.)"""
        backup = self.stage / ".replaced"
        backup.mkdir()
        entries = sorted(p for p in self.stage.iterdir() if p != backup)
        saved, moved = [], []

        def aside(name: str) -> None:
            if os.path.lexists(self.folder / name):
                os.replace(self.folder / name, backup / name)
                saved.append(name)

        try:
            for entry in entries:
                aside(entry.name)
                os.replace(entry, self.folder / entry.name)
                moved.append(entry.name)
            for name in self.removed:
                if name not in moved:
                    aside(name)
            io.pause_for_tests("commit")
            promote_config(self.folder)
            io.write_json(self.folder / self.result_name, result)  # last: its presence marks the run finished
        except BaseException:
            for name in moved:
                target = self.folder / name
                shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink(missing_ok=True)
            for name in saved:
                os.replace(backup / name, self.folder / name)
            self.discard()  # only once every old file is back: a failed roll-back leaves them in the stage
            raise
        self.discard()

    def discard(self) -> None:
        shutil.rmtree(self.stage, ignore_errors=True)


# ---------------------------------------------------------------- which command's folder, Hydra's config
RESULT_MARKERS = {"metrics.json": ("evaluate",), "calibration.json": ("calibrate",), "compare.json": ("compare",),
                  "trajectory.csv": ("sample", "sd"), "ema": ("train_ddpm",), "checkpoint": ("train_ddpm",),
                  "classifier": ("train_classifier",)}
PENDING_PREFIX = ".hydra_pending"  # Hydra writes a job's config to .hydra_pending-<host>-<pid>


def claim(folder: Path, command: str) -> None:
    """Refuse a folder that holds another command's result (e.g. ``dng sample`` into an evaluate folder,
    whose samples.npz a later rescore would take for the evaluated ones)."""
    for name, owners in RESULT_MARKERS.items():
        if command not in owners and (Path(folder) / name).exists():
            raise RunRefused(f"{folder} holds a result of dng {owners[0].replace('_', ' ')} ({name}), not of dng "
                             f"{command.replace('_', ' ')}: use another output folder (hydra.run.dir=...)")


_PENDING: dict[Path, Path] = {}  # run folder -> this process's pending Hydra config (set by the entry point)


def set_pending(folder: Path, pending: Path | None) -> None:
    key = Path(folder).absolute()
    if pending is None:
        _PENDING.pop(key, None)
    else:
        _PENDING[key] = Path(pending)


def pending_of(folder: Path) -> Path | None:
    return _PENDING.get(Path(folder).absolute())


def promote_config(folder: Path) -> None:
    """This process's pending Hydra config of ``folder`` becomes its ``.hydra`` (``io.atomic_save``'s folder
    swap: the old one aside, the new one in, then the old one removed): called with the result it describes."""
    pending = pending_of(folder)
    if pending is None or not pending.is_dir():
        return
    io.atomic_save(Path(folder) / ".hydra", lambda tmp: os.replace(pending, tmp))
    set_pending(folder, None)


def drop_config(folder: Path) -> None:
    pending = pending_of(folder)
    if pending is not None:
        shutil.rmtree(pending, ignore_errors=True)
        set_pending(folder, None)


def has_result(folder: Path) -> bool:
    return any((Path(folder) / name).exists() for name in RESULT_MARKERS)


def clean_folder(folder: Path) -> None:
    """Under the folder's lock: remove interrupted writes' temporaries and the pending configs that
    processes of this host left when they were killed."""
    io.clean_temporaries(folder)
    host = socket.gethostname()
    for entry in Path(folder).glob(f"{PENDING_PREFIX}*"):
        owner = entry.name[len(PENDING_PREFIX):].lstrip("-")
        ehost, _, pid = owner.rpartition("-")
        if entry.name == PENDING_PREFIX or (ehost == host and pid.isdigit() and not _pid_alive(int(pid))):
            shutil.rmtree(entry, ignore_errors=True)


_CREATED: set[Path] = set()  # run folders that did not exist before this process's Hydra made them


def note_run_folder(folder: Path) -> None:
    """Called before Hydra creates a single run's folder (``commands.common.RunFolder``): notes whether it
    exists — a refused run may remove only a folder it created. (The path itself is checked earlier, by
    ``validate.check_output_location``: a Hydra callback's exceptions become warnings.)"""
    folder = Path(folder).absolute()
    try:
        if not folder.exists():
            _CREATED.add(folder)
    except OSError:
        pass


def created_folders() -> list[Path]:
    return sorted(_CREATED)


def created_here(folder: Path) -> bool:
    return Path(folder).absolute() in _CREATED


def remove_if_ours(folder: Path) -> None:
    """Delete ``folder`` when this process created it and all it holds is this process's own bookkeeping
    (its pending Hydra config, Hydra's log); then its parents up to ``outputs/`` if they were left empty.
    Never another process's folder, lock, config or result."""
    folder = Path(folder)
    if not created_here(folder) or not folder.is_dir():
        return
    pending = pending_of(folder)
    ours = {f"{PENDING_PREFIX}-{socket.gethostname()}-{os.getpid()}"} | ({pending.name} if pending is not None else set())
    if not all(e.name in ours or (e.suffix == ".log" and e.is_file()) for e in folder.iterdir()):
        return
    shutil.rmtree(folder, ignore_errors=True)
    _CREATED.discard(folder.absolute())
    parent = folder.resolve().parent
    if "outputs" not in parent.parts:
        return
    while parent.name != "outputs":  # e.g. outputs/evaluate/ left empty by this run
        try:
            parent.rmdir()  # only if empty
        except OSError:
            break
        parent = parent.parent


# ------------------------------------------------------------------------------------------ the lock
LEASE_ENV = "DNG_LOCK_LEASE_S"
DEFAULT_LEASE_S = 300.0
ALIVE_SLURM_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
                      "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "PREEMPTED"}
_HELD: dict[Path, "RunLock"] = {}  # folders this process holds (re-entrant acquisition)


def lease_s() -> float:
    raw = os.environ.get(LEASE_ENV)
    try:
        value = float(raw) if raw else DEFAULT_LEASE_S
    except ValueError:
        raise UserError(f"{LEASE_ENV}={raw!r} is invalid: give the lock lease in seconds") from None
    if not value > 0:
        raise UserError(f"{LEASE_ENV}={raw!r} is invalid: the lock lease must be > 0 seconds")
    return value


def _pid_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc), which tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int, start: str | None = None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return start is None or _pid_start(pid) in (None, start)


def _restarts(value) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _slurm_job_running(job: str) -> bool | None:
    """Whether SLURM job ``job`` is still pending/running (None: squeue cannot tell)."""
    try:
        res = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0:
        return False if "Invalid job id" in res.stderr else None
    states = {s.strip() for s in res.stdout.split()}
    return bool(states & ALIVE_SLURM_STATES)


class RunLock:
    """An exclusive lock on a run folder: ``<folder>/.dng.lock``, held with ``flock`` for the run's life and
    recording its owner (host, pid and its start time, SLURM job id) and a heartbeat (its mtime).

    Why flock on an open file rather than O_CREAT|O_EXCL alone: the kernel releases a flock when its holder
    dies (kill -9, OOM, SLURM's SIGKILL), and acquiring it is atomic, so exactly one of several processes
    taking over a stale lock wins, and a dead owner on this host is told without guessing from pids.
    Across nodes flock reaches the server on NFSv4 (and Lustre mounted with ``flock``); where a file system
    keeps flocks node-local, a lock recorded by another host is judged by its record instead: stale once its
    SLURM job is no longer pending or running (``squeue``), or once its heartbeat, refreshed every lease/4 by
    the owner, is older than the lease (``DNG_LOCK_LEASE_S``, default 300 s). A lock of this project's older
    versions (no flock) is respected while its pid lives. A refusal names the lock file and what to do."""

    def __init__(self, folder: Path, reentrant: bool = False):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.reentrant = reentrant
        self.held = False
        self._fd: int | None = None
        self._nested = False
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> "RunLock":
        key = self.folder.absolute()
        if self.reentrant and key in _HELD:
            self._nested = self.held = True
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            if self._try_acquire():
                _HELD[key] = self
                self._start_heartbeat()
                try:
                    io.pause_for_tests("lock")
                except BaseException:
                    self.__exit__()
                    raise
                return self
        raise UserError(f"could not take the lock {str(self.path)!r}: other processes keep replacing it")

    def _try_acquire(self) -> bool:
        """One attempt: True when held, False to try again (the file changed under us); RunRefused when
        a live owner holds it."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            created = True
        except FileExistsError:
            try:
                fd = os.open(self.path, os.O_RDWR)
            except FileNotFoundError:
                return False
            except PermissionError:  # another user's lock: say whose, whether it is stale, what to do
                raise RunRefused(self._foreign()) from None
            created = False
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            flocked = True
        except BlockingIOError:
            owner = self._read(fd)
            os.close(fd)
            self._refuse(owner or {}, "holds it")
        except OSError as err:  # a file system without flock (ENOLCK, EOPNOTSUPP): the record alone decides
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise
            flocked = False
        try:
            same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # its owner released (removed) it between our open and our flock
            os.close(fd)
            return False
        try:
            return self._take(fd, created, flocked)
        except BaseException:
            if self._fd is None:  # not ours after all (refused, or the record could not be written)
                if created:
                    self.path.unlink(missing_ok=True)
                os.close(fd)
            raise

    def _take(self, fd: int, created: bool, flocked: bool) -> bool:
        owner = None if created else self._read(fd)
        if not created and owner is None and not flocked:
            time.sleep(0.2)  # a writer without flock may be between creating and writing it
            owner = self._read(fd)
        if owner is not None:
            verdict = self._judge(owner, flocked)
            if verdict is not None:
                self._refuse(owner, verdict)
            log.warning("taking over the stale lock %s (%s)", self.path, self._describe(owner))
        me = {"pid": os.getpid(), "pid_start": _pid_start(os.getpid()), "host": socket.gethostname(),
              "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
              "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT"), "flock": flocked,
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self._fd, self.held = fd, True
        return True

    @staticmethod
    def _read(fd: int) -> dict | None:
        try:
            data = os.pread(fd, 1 << 16, 0)
            owner = json.loads(data.decode()) if data.strip() else None
        except (OSError, ValueError, UnicodeDecodeError):
            return {}  # garbage: a crash mid-write; judged like an owner that recorded nothing
        return owner if isinstance(owner, dict) or owner is None else {}

    def _judge(self, owner: dict, flocked: bool) -> str | None:
        """None when ``owner`` is gone (take over), else why it still holds the folder."""
        if not owner:
            return None  # unreadable record of a crashed owner (we hold its flock, or it never used one)
        host = owner.get("host")
        job = owner.get("slurm_job_id")
        if job and job == os.environ.get("SLURM_JOB_ID") and _restarts(owner.get("slurm_restart_count")) < _restarts(
                os.environ.get("SLURM_RESTART_COUNT")):
            return None  # our own SLURM job's earlier run, requeued since: it is not running any more
        if host == socket.gethostname():
            if flocked and owner.get("flock"):
                return None  # its flock was free: the owner died
            pid = owner.get("pid")
            if isinstance(pid, int) and pid > 0 and _pid_alive(pid, owner.get("pid_start")):
                return "is alive"
            return None
        if "flock" not in owner:  # an older dng's lock: no heartbeat to judge it by
            return "written by an older dng without a heartbeat"
        if job:
            running = _slurm_job_running(str(job))
            if running is False:
                return None
            if running:
                return f"SLURM job {job} is still queued or running"
        age = self._age()
        if age is not None and age > lease_s():
            return None
        return f"its heartbeat is {age:.0f} s old (lease {lease_s():.0f} s, {LEASE_ENV})" if age is not None else "is alive"

    def _age(self) -> float | None:
        try:
            return time.time() - self.path.stat().st_mtime
        except OSError:
            return None

    @staticmethod
    def _describe(owner: dict) -> str:
        job = f", SLURM job {owner['slurm_job_id']}" if owner.get("slurm_job_id") else ""
        return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}{job} is gone" if owner else "unreadable"

    def _foreign(self) -> str:
        """Why a lock this user may not open blocks the folder: its owner, whether its run is alive."""
        import pwd

        try:
            uid = os.stat(self.path).st_uid
            user = pwd.getpwuid(uid).pw_name
        except KeyError:
            user = f"uid {uid}"
        except OSError:
            user = "another user"
        try:
            owner = json.loads(self.path.read_text())
            owner = owner if isinstance(owner, dict) else {}
        except (OSError, ValueError, UnicodeDecodeError):
            owner = {}
        where = f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}, since {owner.get('started', '?')}"
        if owner and self._judge(owner, flocked=False) is not None:
            return (f"run folder {str(self.folder)!r} is in use by user {user} ({where}): wait for that run, or use "
                    f"another hydra.run.dir")
        return (f"run folder {str(self.folder)!r} holds a stale lock of user {user} ({where}; that run is gone), which "
                f"this user may not replace: ask {user} to delete {str(self.path)!r}, or use another hydra.run.dir")

    def _refuse(self, owner: dict, why: str) -> None:
        job = f" (SLURM job {owner['slurm_job_id']})" if owner.get("slurm_job_id") else ""
        raise RunRefused(f"run folder {str(self.folder)!r} is in use by pid {owner.get('pid', '?')} on "
                         f"{owner.get('host', '?')}{job} since {owner.get('started', 'just now')} ({why}): wait for "
                         f"it, or use another hydra.run.dir; if that process is not running, delete {str(self.path)!r}")

    def _start_heartbeat(self) -> None:
        period = min(60.0, lease_s() / 4)

        def beat() -> None:
            while not self._stop.wait(period):
                try:
                    os.utime(self._fd)
                except (OSError, TypeError):
                    return

        self._beat = threading.Thread(target=beat, name="dng-lock-heartbeat", daemon=True)
        self._beat.start()

    def __exit__(self, *exc) -> None:
        if not self.held:
            return
        self.held = False
        if self._nested:
            return
        _HELD.pop(self.folder.absolute(), None)
        self._stop.set()
        fd, self._fd = self._fd, None
        try:  # remove the lock only while it is still ours (same file), then release the flock
            if fd is not None and os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                self.path.unlink()
        except OSError:
            pass
        finally:
            if fd is not None:
                os.close(fd)
