"""Files: atomic writes, JSON, fingerprints (the lock and everything else about a run folder: ``runs``).

The bottom layer: it imports nothing from ``dng_cli``. Every result file is
written to a temporary name in its own folder and renamed into place, so a crash at any moment
leaves either the old file or the new one, plus at worst a ``.<name>.*`` temporary that the next
run of that folder removes (``clean_temporaries``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

log = logging.getLogger("dng")
TEMP_MARK = ".tmp-"  # every temporary this module creates is named .<target name>.tmp-<random>
OLD_MARK = ".old-"  # a replaced folder waits under .<name>.old-<random> until the new one is in place
LOCK_NAME = ".dng.lock"
# temporaries of earlier versions (mkstemp/mkdtemp with prefix ".<name>."): .metrics.json.k3j_x9q2
LEGACY_TEMP = re.compile(r"^\.(metrics\.json|samples\.png|samples\.npz|histogram\.png|trajectory\.csv|guidance\.png|"
                         r"checkpoint|ema|classifier|card\.json|report\.(csv|md)|pareto_(kl|fid)\.png)\.[a-z0-9_]{8}$")


def _temp_prefix(path: Path) -> str:
    return f".{path.name}{TEMP_MARK}"


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and rename: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        _default_mode(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(path: Path, save: Callable[[str], None]) -> None:
    """Run ``save(tmp_path)`` and move the result onto ``path`` (a file or a folder).

    A folder is replaced rename-then-delete: the old one is first renamed aside (``.<name>.old-*``),
    the new one renamed into place, and only then is the old one deleted. A kill between the two
    renames leaves the old folder aside, and ``recover_folder`` puts it back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), dir=path.parent)) / path.name
    try:
        save(str(tmp))
        _default_mode(tmp)
        if path.is_dir():
            aside = Path(tempfile.mkdtemp(prefix=f".{path.name}{OLD_MARK}", dir=path.parent))
            os.replace(path, aside / path.name)
            pause_for_tests("atomic_save")
            os.replace(tmp, path)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def atomic_savez(path: Path, compressed: bool = False, **arrays) -> None:
    """An .npz written as ``atomic_save`` does; its file is closed even when the write fails (a full disk),
    so the space of the removed temporary is freed at once."""
    import numpy as np

    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:
            (np.savez_compressed if compressed else np.savez)(f, **arrays)

    atomic_save(path, save)


def recover_folder(path: Path) -> bool:
    """If ``path`` is missing but a replaced copy of it was left aside by a killed ``atomic_save``,
    move that copy back. Returns whether anything was recovered."""
    path = Path(path)
    if path.exists() or not path.parent.is_dir():
        return False
    asides = sorted(path.parent.glob(f".{path.name}{OLD_MARK}*/{path.name}"), key=lambda p: p.stat().st_mtime)
    if not asides:
        return False
    os.replace(asides[-1], path)
    shutil.rmtree(asides[-1].parent, ignore_errors=True)
    log.warning("recovered %s from an interrupted save (%s)", path, asides[-1].parent.name)
    return True


def clean_temporaries(folder: Path) -> list[Path]:
    """Remove the temporaries that interrupted atomic writes left in ``folder`` (not recursive).
    A replaced folder left aside is only removed once its target exists again."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if not entry.name.startswith("."):
            continue
        if TEMP_MARK in entry.name or LEGACY_TEMP.match(entry.name):
            pass
        elif OLD_MARK in entry.name:
            target = folder / entry.name[1:entry.name.index(OLD_MARK)]
            if not target.exists():
                continue  # still the only copy: recover_folder's to restore
        else:
            continue
        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        removed.append(entry)
    if removed:
        log.info("removed %d leftover temporary file(s) in %s", len(removed), folder)
    return removed


def _default_mode(path: Path) -> None:
    """mkdtemp/mkstemp create private (0700/0600) entries; give results the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def pause_for_tests(point: str) -> None:
    """Fault injection for the kill tests: ``DNG_TEST_PAUSE=<point>`` waits here after printing a mark —
    until the file named by ``DNG_TEST_RESUME`` exists (then it goes on), else for an hour."""
    if os.environ.get("DNG_TEST_PAUSE") == point:
        print(f"DNG_TEST_PAUSED {point}", flush=True)
        resume = os.environ.get("DNG_TEST_RESUME")
        if not resume:
            time.sleep(3600)
            return
        deadline = time.time() + 3600
        while not os.path.exists(resume) and time.time() < deadline:
            time.sleep(0.05)


def write_json(path: Path, obj: Any) -> None:
    """Strict JSON (no bare NaN/Infinity, which other readers reject), written atomically; a non-finite number is
    an error naming where it sits, and nothing is written."""
    try:
        text = json.dumps(obj, indent=2, default=_json_default, allow_nan=False)
    except ValueError:
        raise ValueError(f"{path.name}: {_first_non_finite(obj) or 'a value'} is not a finite number; "
                         f"nothing was written") from None
    atomic_write_text(path, text + "\n")


def _first_non_finite(obj: Any, where: str = "") -> str | None:
    """The key path of the first NaN/inf in a JSON-like object."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return where or "the value"
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for k, v in items:
        found = _first_non_finite(v, f"{where}.{k}" if where else str(k))
        if found:
            return found
    return None


def _json_default(obj: Any):
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj)}")


def read_json_object(path: Path) -> dict | None:
    """A JSON object from ``path``, or None (with one warning line) when it is not one."""
    try:
        value = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        log.warning("skipping unreadable %s (%s)", path, type(err).__name__)
        return None
    if not isinstance(value, dict):
        log.warning("skipping %s: not a JSON object", path)
        return None
    return value


def sha256_file(path: Path, length: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


# ------------------------------------------------------------------------------------ fingerprints
def fingerprint(identity: dict) -> str:
    """A short hash of everything that determines a result (a JSON-able dict)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def flatten(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """("a.b.c", leaf) pairs of nested dicts, in key order."""
    if isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from flatten(obj[k], f"{prefix}.{k}" if prefix else str(k))
    else:
        yield prefix, obj


def differences(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """Every dotted key whose value differs between two nested dicts, as (key, old value, new value):
    keys both have first, sorted (a changed value names the change better than a key only one side has)."""
    a, b = dict(flatten(old)), dict(flatten(new))
    return [(key, a.get(key, "<absent>"), b.get(key, "<absent>")) for key in [*sorted(set(a) & set(b)), *sorted(set(a) ^ set(b))]
            if a.get(key, "<absent>") != b.get(key, "<absent>")]


def first_difference(old: dict, new: dict) -> tuple[str, Any, Any] | None:
    """The first of ``differences``, or None."""
    return next(iter(differences(old, new)), None)


class LazyFileHandler(logging.FileHandler):
    """Hydra's job log file (``hydra.job_logging.handlers.file``), created with its first line, so a run
    refused before it logs anything leaves no log in a folder it does not own; when the file cannot be
    opened (its folder removed, a full disk) file logging stops and the console keeps every line."""

    def __init__(self, filename, mode: str = "a", encoding=None, delay: bool = True, errors=None):
        super().__init__(filename, mode, encoding, delay=True, errors=errors)

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is None:
            try:
                self.stream = self._open()
            except OSError:
                return
        super().emit(record)
