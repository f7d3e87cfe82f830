"""Config checks run by the CLI front before Hydra starts: one clear line per bad value."""

from __future__ import annotations

import math
import os
from pathlib import Path
from importlib import resources
from typing import Callable

from omegaconf import DictConfig

from dng_cli import UserError, one_line

INFO_FLAGS = {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc"}
MULTIRUN_FLAGS = {"-m", "--multirun"}
Validator = Callable[[DictConfig], None]


def config_groups() -> dict[str, list[str]]:
    """Each config group of the package and its options (yaml file stems)."""
    root = resources.files("dng_cli.configs")
    groups = {}
    for entry in root.iterdir():
        if entry.is_dir() and not entry.name.startswith(("_", ".")):
            groups[entry.name] = sorted(e.name[:-5] for e in entry.iterdir() if e.name.endswith(".yaml"))
    return groups


def check_choices(args: list[str]) -> None:
    """``group=option`` (also comma lists of a sweep) must name existing options."""
    groups = config_groups()
    for arg in args:
        if "=" not in arg or arg.startswith("-"):
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if key in groups:
            for option in value.split(","):
                option = option.strip()
                if option and option not in groups[key]:
                    raise UserError(f"{key}={option!r} is unknown: allowed are {', '.join(groups[key])}")


def compose(config_name: str, overrides: list[str], return_hydra_config: bool = False) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("dng_cli.configs", version_base="1.3"):
            return hydra_compose(config_name, overrides=overrides, return_hydra_config=return_hydra_config)
    except UserError:
        raise
    except Exception as err:
        raise UserError(override_error(err, overrides)) from None
    finally:
        GlobalHydra.instance().clear()


def override_error(err: Exception, overrides: list[str]) -> str:
    """One line for a Hydra error; for an override its grammar cannot read (spaces, non-ASCII, brackets in an
    unquoted value: Hydra says only "LexerNoViableAltException"), which override and how to quote it."""
    text = one_line(err)
    if not any(w in text for w in ("LexerNoViableAlt", "mismatched input", "no viable alternative", "token recognition")):
        return text
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for line in overrides:
        try:
            parser.parse_overrides([line])
        except Exception:
            key, _, value = line.partition("=")
            return (f"override {line!r} cannot be read: an unquoted value may hold letters, digits and _-+./:\\ only "
                    f"(no spaces, non-ASCII letters or brackets outside a list); quote the value inside the override, "
                    f"e.g. '{key}=\"{value}\"' (with the outer single quotes for the shell)")
    return text


def check(config_name: str, args: list[str], validator: Validator | None = None) -> None:
    """Validate the command line of one command (skipped for Hydra's info flags)."""
    if any(a in INFO_FLAGS for a in args):
        return
    for a in args:
        if a.lstrip("+~").startswith("method.forbidden"):
            raise UserError(f"{a} is invalid: the classes to remove are the top-level key forbidden "
                            f"(e.g. forbidden=[0,6])")
    check_choices(args)
    overrides = [a for a in args if not a.startswith("hydra.") and not a.startswith("-")]
    multirun = any(a in MULTIRUN_FLAGS for a in args)
    hydra_args = [a for a in args if a.startswith("hydra.")]
    if multirun:
        jobs = sweep_jobs(config_name, overrides)
        if config_name not in ("report", "data") and jobs:
            check_output_location(config_name, hydra_args + jobs[0], multirun)
        for job in jobs[:MAX_CHECKED_JOBS]:
            try:
                check_one(config_name, job, validator)
            except UserError as err:
                sweep_part = [o for o in job if o not in overrides]
                raise UserError(f"sweep job {','.join(sweep_part) or '(every job)'}: {err}") from None
        return
    if config_name not in ("report", "data"):
        check_output_location(config_name, hydra_args + overrides, multirun)
    check_one(config_name, overrides, validator)


MAX_CHECKED_JOBS = 512


def sweep_jobs(config_name: str, overrides: list[str]) -> list[list[str]]:
    """The override list of every job of a sweep (command-line sweeps and the config's
    ``hydra.sweeper.params``, as Hydra's basic sweeper combines them), so that each job's config
    is checked before anything runs."""
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(overrides)
    except Exception as err:
        raise UserError(override_error(err, overrides)) from None
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    axes: dict[str, list[str]] = {}
    base = compose(config_name, fixed, return_hydra_config=True)
    params = base.hydra.sweeper.get("params") or {}
    for key, value in params.items():
        if not any(o.get_key_element() == key for o in parsed):
            axes[key] = _values(parser, f"{key}={value}")
    for o in parsed:
        if o.is_sweep_override():
            axes[o.get_key_element()] = _values(parser, o.input_line)
    names = list(axes)
    return [fixed + [f"{k}={v}" for k, v in zip(names, combo)] for combo in itertools.product(*axes.values())]


def _values(parser, line: str) -> list[str]:
    (override,) = parser.parse_overrides([line])
    key = override.get_key_element()
    if not override.is_sweep_override():
        return [override.get_value_element_as_str()]
    try:
        return list(override.sweep_string_iterator())
    except Exception as err:  # range/glob/interval sweeps: enumerated by Hydra's sweeper only
        raise UserError(f"{key}: {one_line(err)}") from None


# ------------------------------------------------------------------------------- declared types
# Every scalar option with its type and range, checked for every command whose config has the key
# (one mechanism instead of a check per call site). (type, low, high, low inclusive?); None = open.
INT, FLOAT, BOOL, BOOL_AUTO = "an integer", "a number", "true or false", "true, false or auto"
SEED_LIMIT = 2 ** 63  # seeds are int64 (torch.Generator.manual_seed, the seeds arrays in samples.npz)
SPEC: dict[str, tuple] = {
    "n_samples": (INT, 1), "seed": (INT, 0, SEED_LIMIT), "sampler.seed": (INT, 0, SEED_LIMIT), "pilot_seed": (INT, 0, SEED_LIMIT), "batch_size": (INT, 1), "steps": (INT, 1), "epochs": (INT, 1),
    "checkpoint_every": (INT, 1), "log_every": (INT, 1), "warmup_steps": (INT, 0), "width": (INT, 1),
    "feature_dim": (INT, 1), "shift": (INT, 0), "max_train": (INT, 1), "num_threads": (INT, 1),
    "lr": (FLOAT, 0.0, None, False), "weight_decay": (FLOAT, 0.0), "grad_clip": (FLOAT, 0.0),
    "ema_decay": (FLOAT, 0.0, 1.0), "label_dropout": (FLOAT, 0.0, 1.0), "cfg_scale": (FLOAT, 0.0),
    "resume": (BOOL,), "conditional": (BOOL,), "progress": (BOOL,), "skip_existing": (BOOL,), "overwrite": (BOOL,), "save_samples": (BOOL,),
    "sampler.steps": (INT, 1), "sampler.batch_size": (INT, 1), "sampler.seed": (INT, 0),
    "sampler.max_batch": (INT, 1), "sampler.num_threads": (INT, 1),
    "sampler.channels_last": (BOOL_AUTO,), "sampler.compile": (BOOL,), "sampler.progress": (BOOL,),
    "method.guidance_scale": (FLOAT, 0.0), "method.prior": (FLOAT,), "method.temperature": (FLOAT, 0.0),
    "method.offset": (FLOAT,), "method.p_min": (FLOAT,), "method.p_max": (FLOAT,), "method.threshold": (FLOAT,),
    "method.scale": (FLOAT, 0.0), "method.momentum_scale": (FLOAT, 0.0), "method.momentum_beta": (FLOAT,),
    "method.warmup_steps": (INT, 0), "method.tau": (FLOAT, 0.0), "metrics.kl_smoothing": (FLOAT, 0.0, None, False),
    "dataset.channels": (INT, 1), "dataset.image_size": (INT, 1), "dataset.num_classes": (INT, 2),
    "pilot_n": (INT, 1), "pilot_seed": (INT, 0), "max_probes": (INT, 2), "tolerance": (FLOAT, 0.0, None, False),
    "bootstrap": (INT, 0), "bootstrap_seed": (INT, 0), "grid_extend": (INT, 0), "band_factor": (FLOAT, 1.0, None, False),
    "grid_max_ratio": (FLOAT, 1.0, None, False),
    "scale_min": (FLOAT, 0.0, None, False), "scale_max": (FLOAT, 0.0, None, False),
}
DEVICES = "cpu, cuda, cuda:<index>, auto"


def check_types(cfg: DictConfig) -> None:
    """Each declared option present in ``cfg`` has its type and lies in its range (null allowed
    where the shipped config's default is null)."""
    from omegaconf import OmegaConf

    for key, (kind, *bounds) in SPEC.items():
        if OmegaConf.select(cfg, key, default="<absent>", throw_on_missing=False) == "<absent>":
            continue
        if OmegaConf.is_missing(cfg, key):
            continue
        value = OmegaConf.select(cfg, key)
        if value is None and key.split(".")[-1] in ("max_batch", "num_threads", "max_train", "grad_clip"):
            continue
        _check_value(key, value, kind, *bounds)
    _check_fits(cfg)
    for key in ("sampler.device", "device"):
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and not _device_ok(value):
            raise UserError(f"{key}={value!r} is invalid: allowed are {DEVICES}")
        if isinstance(value, str) and value.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise UserError(f"{key}={value!r} is unavailable: no CUDA device here (use cpu or auto)")


def available_memory() -> int | None:
    """Bytes this machine can still give (MemAvailable, Linux), None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_fits(cfg: DictConfig) -> None:
    """Seeds stay int64 (seed + n_samples ≤ 2^63), and a run's samples fit in memory before anything is allocated:
    the images (uint8 and float), per-step posteriors and scales and the classifier's features of every sample are
    held until the result is written — on a shared node an unbounded n_samples would take a neighbour's memory."""
    from omegaconf import OmegaConf

    for n_key, seed_key in (("n_samples", "seed"), ("pilot_n", "pilot_seed")):
        n, seed = OmegaConf.select(cfg, n_key, default=None), OmegaConf.select(cfg, seed_key, default=0) or 0
        if not isinstance(n, int) or isinstance(n, bool) or not isinstance(seed, int):
            continue
        if seed + n > SEED_LIMIT:
            raise UserError(f"{seed_key}={seed} with {n_key}={n} runs past 2^63 (seeds are int64): use "
                            f"{seed_key} <= {SEED_LIMIT - n}")
        channels = OmegaConf.select(cfg, "dataset.channels", default=1) or 1
        size = OmegaConf.select(cfg, "dataset.image_size", default=28) or 28
        steps = OmegaConf.select(cfg, "sampler.steps", default=50) or 50
        if not all(isinstance(v, int) for v in (channels, size, steps)):
            continue
        per_sample = channels * size * size * 5 + steps * 12 + 4096
        avail = available_memory()
        if avail is not None and n * per_sample > avail // 2:
            raise UserError(f"{n_key}={n} needs ≈ {n * per_sample / 1e9:.1f} GB to hold its samples and this machine "
                            f"has {avail / 1e9:.1f} GB available: at most {avail // 2 // per_sample} fit in one run (split it into "
                            f"runs of that many: {seed_key}=0, then {seed_key}=<that many>, ...)")


def _check_value(key: str, value, kind: str, low=None, high=None, low_inclusive: bool = True) -> None:
    ok = {INT: isinstance(value, int) and not isinstance(value, bool),
          FLOAT: isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
          BOOL: isinstance(value, bool), BOOL_AUTO: isinstance(value, bool) or value == "auto"}[kind]
    if not ok:
        raise UserError(f"{key}={value!r} is invalid: it must be {kind}")
    if low is not None and (value < low or value == low and not low_inclusive):
        raise UserError(f"{key}={value!r} is invalid: it must be {'>=' if low_inclusive else '>'} {low}")
    if high is not None and value >= high:
        raise UserError(f"{key}={value!r} is invalid: it must be < {high}")


def _device_ok(value) -> bool:
    if not isinstance(value, str):
        return False
    if value in ("cpu", "cuda", "auto", "mps"):
        return True
    return value.startswith("cuda:") and value[5:].isdigit()


def check_output_location(config_name: str, overrides: list[str], multirun: bool) -> None:
    """The run (or sweep) folder must be creatable: every existing ancestor a writable folder."""
    try:
        cfg = compose(config_name, overrides, return_hydra_config=True)
        key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
        from omegaconf import OmegaConf

        target = Path(str(OmegaConf.select(cfg, key))).expanduser()
    except UserError:
        raise
    except Exception:  # a resolver Hydra only has at run time: nothing to check here
        return
    p = target if target.is_absolute() else Path.cwd() / target
    for part in p.parts:
        if len(part.encode()) > 255:
            raise UserError(f"{key}={str(target)[:60]!r}… is invalid: the folder name {part[:24]!r}… is "
                            f"{len(part.encode())} bytes, file systems allow 255")
    try:
        p.resolve(strict=False)
    except (RuntimeError, OSError) as err:  # RuntimeError: Python < 3.13 on a symlink loop
        raise UserError(f"{key}={str(target)!r} is invalid: {str(err).strip().splitlines()[0]}") from None
    while True:
        try:
            if p.exists():
                break
        except OSError as err:
            raise UserError(f"{key}={str(target)!r} is invalid: {err.strerror or type(err).__name__}") from None
        if p.parent == p:
            return
        p = p.parent
    if not p.is_dir():
        raise UserError(f"{key}={str(target)!r} is invalid: {str(p)!r} is a file, not a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"{key}={str(target)!r} is invalid: {str(p)!r} is not writable")


def check_one(config_name: str, overrides: list[str], validator: Validator | None = None) -> None:
    """Compose one run's config and check declared types, then the command's validator."""
    cfg = compose(config_name, overrides)
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise UserError(f"{key} has no value: set it with {key}=..." if key and "Missing" in type(err).__name__
                        else str(err).strip().splitlines()[0]) from None
    check_types(cfg)
    if validator is not None:
        validator(cfg)
