"""Config checks run by the CLI front before Hydra starts: one clear line per bad value."""

from __future__ import annotations

from importlib import resources
from typing import Callable

from omegaconf import DictConfig

from dng_cli import UserError

INFO_FLAGS = {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc"}
MULTIRUN_FLAGS = {"-m", "--multirun"}
VALIDATORS: dict[str, Callable[[DictConfig], None]] = {}


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
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(first) from None
    finally:
        GlobalHydra.instance().clear()


def check(config_name: str, args: list[str]) -> None:
    """Validate the command line of one command (skipped for Hydra's info flags)."""
    if any(a in INFO_FLAGS for a in args):
        return
    check_choices(args)
    if any(a in MULTIRUN_FLAGS for a in args):
        return  # sweeps: each job validates itself and a failing one is logged, not fatal
    overrides = [a for a in args if not a.startswith("hydra.") and not a.startswith("-")]
    cfg = compose(config_name, overrides)
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise UserError(f"{key} has no value: set it with {key}=..." if key and "Missing" in type(err).__name__
                        else str(err).strip().splitlines()[0]) from None
    validator = VALIDATORS.get(config_name)
    if validator is not None:
        validator(cfg)
