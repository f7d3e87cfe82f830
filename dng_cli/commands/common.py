"""Shared plumbing of the command modules: the Hydra entry wrapper, devices, atomic writes."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from dng_cli import UserError

CONFIG_PATH = "pkg://dng_cli.configs"
log = logging.getLogger("dng")


def entry(config_name: str, run: Callable[[DictConfig, Path], Any], cleanup: bool = True):
    """A ``@hydra.main`` function for ``run``: one-line errors for bad input, failures of a multirun
    job logged (``error.txt``) without stopping the other jobs. With ``cleanup``, a run dir that holds
    nothing but Hydra's own files is removed after a bad-input error (no half-written outputs)."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    @hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=config_name)
    def main(cfg: DictConfig) -> Any:
        hc = HydraConfig.get()
        output_dir = Path(hc.runtime.output_dir)
        multirun = hc.mode == RunMode.MULTIRUN
        try:
            return run(cfg, output_dir)
        except Exception as err:
            if multirun:
                log.exception("job %s failed", output_dir)
                (output_dir / "error.txt").write_text(f"{type(err).__name__}: {err}\n")
                return None
            if isinstance(err, UserError):
                if cleanup:
                    remove_if_only_hydra(output_dir)
                fail(str(err))
            raise

    return main


def remove_if_only_hydra(path: Path) -> None:
    """Delete ``path`` when all it holds is Hydra's bookkeeping (.hydra/, *.log): never user results."""
    if path.is_dir() and all(e.name == ".hydra" or e.suffix == ".log" for e in path.iterdir()):
        shutil.rmtree(path, ignore_errors=True)


def fail(message: str, code: int = 2) -> None:
    """Print one line to stderr and exit non-zero (no traceback)."""
    print(f"dng: error: {message}", file=sys.stderr)
    sys.exit(code)


def setup_torch(device: str = "cpu", num_threads: int | None = None) -> torch.device:
    if num_threads:
        torch.set_num_threads(int(num_threads))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={device!r} is unavailable: no CUDA device here (use device=cpu)")
    return torch.device(device)


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and rename: never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        _default_mode(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(path: Path, save: Callable[[str], None]) -> None:
    """Run ``save(tmp_path)`` and rename the result onto ``path`` (files or folders)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)) / path.name
    try:
        save(str(tmp))
        _default_mode(tmp)
        if path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def _default_mode(path: Path) -> None:
    """mkdtemp/mkstemp create private (0700/0600) entries; give results the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(obj: Any):
    if isinstance(obj, (torch.Tensor,)):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj)}")


def plain(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def hardware() -> str:
    import platform

    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}"
    return f"cpu:{platform.processor() or platform.machine()} x{os.cpu_count()} threads={torch.get_num_threads()}"
