"""Config checks run by the CLI front before Hydra starts: one clear line per bad value."""

from __future__ import annotations

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
    from dng_cli.spec import check_types  # here, not at import: the CLI front stays light (no torch)

    check_types(cfg)
    if validator is not None:
        validator(cfg)
