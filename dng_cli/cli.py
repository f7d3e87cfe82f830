"""The ``dng`` command: a thin front that dispatches to one ``@hydra.main`` per command.

``--key=value`` is sugar for the Hydra override ``key=value``. Config choices and values are
checked here, before Hydra creates any output folder, so bad input costs one line and no files.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from dataclasses import dataclass

from dng_cli import UserError

HYDRA_FLAGS = {"-m", "--multirun", "--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i",
               "--resolve", "--package", "-p", "--run", "-r", "--shell-completion", "-sc",
               "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--version"}


@dataclass(frozen=True)
class Command:
    config: str
    module: str
    main: str
    help: str
    check: str = "check_cfg"  # the module's validator: (composed cfg) -> None, raises UserError


COMMANDS: dict[str, Command] = {
    "sample": Command("sample", "dng_cli.commands.sample", "main",
                      "draw guided samples: image grid, samples.npz, posterior/scale trajectories + plot"),
    "evaluate": Command("evaluate", "dng_cli.commands.evaluate", "main",
                        "sample N, classify and score: forbidden rate, class balance (KL), FID -> metrics.json"),
    "calibrate": Command("calibrate", "dng_cli.commands.calibrate", "main",
                         "the smallest guidance scale meeting a target forbidden rate (pilot set, cached probes)"),
    "compare": Command("compare", "dng_cli.commands.compare", "main",
                       "methods at matched safety: calibrate each, evaluate at its scale, differences with CIs"),
    "plan": Command("plan", "dng_cli.commands.plan", "main",
                    "the power of a finished compare: N for 80 % power, the MDE at N, and its cost in hours"),
    "report": Command("report", "dng_cli.commands.report", "main",
                      "collect every metrics.json below a folder: report.csv/.md and Pareto plots"),
    "train": Command("", "dng_cli.commands.train", "", "train a model: `dng train ddpm` or `dng train classifier`"),
    "data": Command("data", "dng_cli.commands.data", "main",
                    "fetch a dataset (mnist, fashion_mnist, cifar10) with offline fallbacks"),
    "sd": Command("sd", "dng_cli.commands.sd", "main",
                  "Stable Diffusion with a negative prompt removed by np, sld or dng"),
}
TRAIN = {"ddpm": Command("train_ddpm", "dng_cli.commands.train", "main_ddpm", "train a DDPM", "check_ddpm"),
         "classifier": Command("train_classifier", "dng_cli.commands.train", "main_classifier", "train the classifier",
                               "check_classifier")}

USAGE = """usage: dng <command> [key=value | --key=value ...] [-m] [--help]

Dynamic Negative Guidance of diffusion models (Koulischer et al., ICLR 2025).

commands:
{commands}

examples:
  dng sample method=dng "forbidden=[0]"
  dng evaluate --method=dng
  dng evaluate -m method=np,sld,dng method.guidance_scale=1,3,10
  dng evaluate -m experiment=mnist_paper
  dng evaluate dataset=fashion_mnist model=fashion_mnist "forbidden=[6]"
  dng calibrate method=np target_forbidden=0.01
  dng compare "methods=[np,sld,dng]" "targets=[0.01,0.003]" n_samples=2000
  dng report outputs/multirun/evaluate/<sweep>
  dng plan docs/results/matched_safety/fashion "effects={{kl_kept:0.05}}"
  dng train ddpm steps=6000   # an MNIST model; the shipped one's commands: its card.json
  dng data mnist
"""


def usage() -> str:
    from dng_cli.backends import describe

    lines = "\n".join(f"  {name:<10} {cmd.help}" for name, cmd in COMMANDS.items())
    return USAGE.format(commands=lines) + "\n" + describe() + "\n"


def rewrite(args: list[str]) -> list[str]:
    """``--key=value`` -> ``key=value``; Hydra's own flags pass through unchanged."""
    out = []
    for arg in args:
        if arg.startswith("--") and "=" in arg and arg.split("=", 1)[0] not in HYDRA_FLAGS:
            arg = arg[2:]
        out.append(arg)
    return out


def command_line(argv: list[str]) -> tuple[Command, list[str]]:
    """``dng <command> [target] args`` -> (the command, its Hydra overrides)."""
    name, args = argv[0], list(argv[1:])
    if name not in COMMANDS:
        raise UserError(f"unknown command {name!r}: allowed are {', '.join(COMMANDS)}")
    cmd = COMMANDS[name]
    if name == "train":
        if not args or args[0] not in TRAIN:
            raise UserError(f"train needs a target: allowed are {', '.join(TRAIN)} (got {args[0] if args else 'nothing'!r})")
        cmd, args = TRAIN[args[0]], args[1:]
    elif name == "data":
        if args and "=" not in args[0] and not args[0].startswith("-"):
            args = [f"dataset={args[0]}"] + args[1:]
    elif name in ("report", "plan"):
        if args and "=" not in args[0] and not args[0].startswith("-"):
            args = [f"dir={args[0]}"] + args[1:]
    return cmd, rewrite(args)


def _error(message: str) -> None:
    print(f"dng: error: {message}", file=sys.stderr)
    sys.exit(2)


def _absl_spares_our_streams() -> None:
    """absl (imported by OpenVINO, ONNX Runtime, TensorBoard, MLflow, W&B) makes a logging handler on the
    ``sys.stderr`` of that moment. Hydra's logging setup closes every handler, and absl's ``close`` closes its
    stream unless it is still ``sys.stderr`` — so a process whose stderr was swapped in between (pytest's capture,
    a caller's redirect) lost that stream at the next command. Point it at the process's own stderr, which absl
    never closes."""
    absl = sys.modules.get("absl.logging")
    if absl is not None:
        absl.get_absl_handler().python_handler.stream = sys.__stderr__


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        os.getcwd()
    except OSError:  # before torch is imported: its libraries abort on a deleted working directory
        _error("the current working directory no longer exists: cd into an existing folder and re-run")
    if not argv:
        print(usage(), file=sys.stderr)
        sys.exit(2)
    if argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    name = argv[0]
    try:
        cmd, args = command_line(argv)
    except UserError as err:
        _error(str(err))
    module = importlib.import_module(cmd.module)
    try:
        from dng_cli.validate import check
        check(cmd.config, args, getattr(module, cmd.check, None))
    except UserError as err:
        _error(str(err))
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # errors reach this front, which prints them as one line
    _absl_spares_our_streams()
    sys.argv = [f"dng {name}"] + args
    previous = signal.signal(signal.SIGTERM, _terminated)  # kill/scancel: clean up as for Ctrl-C, then exit
    try:
        getattr(module, cmd.main)()
    except OSError as err:  # Hydra's own writes (its config, the run folder): disk full, a bad path
        from dng_cli import one_line, runs

        for folder in runs.created_folders():
            runs.remove_if_ours(folder)
        _error(one_line(err))
    except UserError as err:  # raised in a Hydra callback (e.g. an impossible run folder name)
        _error(str(err).strip().splitlines()[0])
    except Exception as err:
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        if isinstance(err, (HydraException, OmegaConfBaseException)):
            _error(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
        raise
    except Terminated:
        print("dng: terminated; re-run the same command to resume (finished runs are kept)", file=sys.stderr)
        sys.exit(143)
    except KeyboardInterrupt:
        print("dng: interrupted; re-run the same command to resume (finished runs are kept)", file=sys.stderr)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, previous)


class Terminated(BaseException):
    """SIGTERM (kill, scancel, a job's time limit): unwinds like Ctrl-C, so locks and temporaries go."""


def _terminated(signum, frame) -> None:
    raise Terminated()


if __name__ == "__main__":
    main()
