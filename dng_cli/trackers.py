"""Experiment trackers (``logger=`` config group): CSV, TensorBoard, MLflow, Weights & Biases (offline), several at once.

A finished run logs, to every tracker its ``logger`` config names: its resolved config (params, flattened), its
fingerprint and folder (tags), every number of metrics.json with its s.e. and interval, its images (sample grid,
histogram, guidance plot), and the guidance trajectory (mean λ_t and mean p over the sampling steps) as a step
series. A multirun sweep is one experiment (its sweep folder's name) with one run per point; a ``dng compare`` is a
parent run (its claims as metrics, compare.md/png as artifacts) whose grid points, evaluated in its process, are
its child runs. Everything is offline by default: MLflow's store is a folder under outputs/ (``mlflow ui
--backend-store-uri …`` is printed), TensorBoard's event files sit beside the run, W&B runs in offline mode.

Logging comes after the result is committed and never changes it: a tracker's failure (or a missing package) is one
warning line, and the run still succeeds. The ``logger`` keys are not part of a result's identity.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
from pathlib import Path
from typing import Any

from dng_cli import one_line

log = logging.getLogger(__name__)
TRACKERS = ("csv", "tensorboard", "mlflow", "wandb", "aim")
EXTRAS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb", "aim": "aim"}
_parent: contextvars.ContextVar[dict | None] = contextvars.ContextVar("dng_tracker_parent", default=None)


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = d
    return out


def numbers(result: dict) -> dict[str, float]:
    """Every number of a result (metrics.json) by its flattened name: metrics, their s.e. and intervals
    (``forbidden_rate_ci.0``/``.1``), histograms per class; not the config, weights or identity."""
    skip = {"config", "weights", "samples", "rescored", "fid_reference", "seed", "steps"}
    out = {}
    for key, value in flatten({k: v for k, v in result.items() if k not in skip}).items():
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, (int, float)):
            out[key] = float(value)
        elif isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            out.update({f"{key}.{i}": float(v) for i, v in enumerate(value)})
    return out


def experiment_name(command: str, output_dir: Path) -> str:
    """One experiment per sweep (its folder: a multirun's points are its subfolders), else per command."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized() and str(HydraConfig.get().mode) == "RunMode.MULTIRUN":
            return f"dng-{command}-{Path(HydraConfig.get().sweep.dir).name}"
    except Exception:  # noqa: BLE001 - outside Hydra (a compare's in-process points, tests)
        pass
    parent = _parent.get()
    return parent["experiment"] if parent else f"dng-{command}"


class Run:
    """One tracked run across the configured trackers; each call is guarded (a failure is one warning)."""

    def __init__(self, logger_cfg: dict, command: str, output_dir: Path, name: str, params: dict, tags: dict,
                 experiment: str | None = None):
        self.cfg, self.dir, self.name = {k: (v or {}) for k, v in (logger_cfg or {}).items()}, Path(output_dir), name
        self.experiment = experiment or experiment_name(command, self.dir)
        self.backends: dict[str, Any] = {}
        unknown = set(self.cfg) - set(TRACKERS)
        if unknown:
            log.warning("logger: unknown tracker(s) %s ignored (known: %s)", ", ".join(sorted(unknown)), ", ".join(TRACKERS))
        for kind in TRACKERS:
            if kind in self.cfg:
                self._guard(kind, "start", lambda k=kind: self.backends.__setitem__(k, getattr(self, f"_start_{k}")(
                    self.cfg[k], params, tags)))

    def _guard(self, kind: str, what: str, fn) -> None:
        try:
            fn()
        except ImportError:
            log.warning("logger %s: the %s package is not installed: pip install -e \".[%s]\" (the result is saved)",
                        kind, EXTRAS.get(kind, kind), EXTRAS.get(kind, kind))
            self.backends.pop(kind, None)
        except Exception as err:  # noqa: BLE001 - a tracker never fails a finished run
            log.warning("logger %s could not %s (%s: %s); the result is saved", kind, what, type(err).__name__,
                        one_line(err))
            self.backends.pop(kind, None)

    def _each(self, what: str, **kw) -> None:
        for kind in list(self.backends):
            self._guard(kind, what, lambda k=kind: getattr(self, f"_{what}_{k}")(self.backends[k], **kw))

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        self._each("metrics", values=values, step=step)

    def series(self, name: str, values: list[float]) -> None:
        self._each("series", name=name, values=values)

    def image(self, name: str, path: Path) -> None:
        if Path(path).is_file():
            self._each("image", name=name, path=Path(path))

    def artifact(self, path: Path) -> None:
        if Path(path).is_file():
            self._each("artifact", path=Path(path))

    def end(self) -> None:
        self._each("end")

    # --------------------------------------------------------------------------------------------- csv
    def _start_csv(self, cfg, params, tags):
        folder = Path(cfg.get("dir") or self.dir / "csv")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "params.json").write_text(json.dumps({"params": params, "tags": tags, "experiment": self.experiment,
                                                         "run": self.name}, indent=1, default=str))
        f = (folder / "metrics.csv").open("w")
        f.write("name,step,value\n")
        return {"dir": folder, "file": f}

    def _metrics_csv(self, b, values, step):
        b["file"].writelines(f"{k},{'' if step is None else step},{v!r}\n" for k, v in values.items())

    def _series_csv(self, b, name, values):
        b["file"].writelines(f"{name},{i},{v!r}\n" for i, v in enumerate(values))

    def _image_csv(self, b, name, path):
        pass  # the images are the run folder's own files

    def _artifact_csv(self, b, path):
        pass

    def _end_csv(self, b):
        b["file"].close()

    # ------------------------------------------------------------------------------------- tensorboard
    def _start_tensorboard(self, cfg, params, tags):
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(Path(cfg.get("dir") or self.dir / "tensorboard")))
        writer.add_text("params", "\n".join(f"    {k}: {v}" for k, v in sorted(params.items())))
        writer.add_text("tags", "\n".join(f"    {k}: {v}" for k, v in sorted(tags.items())))
        return writer

    def _metrics_tensorboard(self, w, values, step):
        for k, v in values.items():
            w.add_scalar(k, v, step or 0)

    def _series_tensorboard(self, w, name, values):
        for i, v in enumerate(values):
            w.add_scalar(name, v, i)

    def _image_tensorboard(self, w, name, path):
        import numpy as np
        from PIL import Image

        w.add_image(name, np.asarray(Image.open(path).convert("RGB")), 0, dataformats="HWC")

    def _artifact_tensorboard(self, w, path):
        if path.suffix == ".md":
            w.add_text(path.stem, path.read_text(errors="replace"))

    def _end_tensorboard(self, w):
        w.close()

    # ------------------------------------------------------------------------------------------- mlflow
    def _start_mlflow(self, cfg, params, tags):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # a folder store: no server, no database
        from mlflow.tracking import MlflowClient

        uri = cfg.get("tracking_uri") or (Path.cwd() / "outputs" / "mlruns").as_uri()
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(self.experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(self.experiment)
        parent = _parent.get()
        tags = {**{k: str(v) for k, v in tags.items()}, "mlflow.runName": self.name}
        if parent and parent.get("mlflow") and parent.get("experiment") == self.experiment:
            tags["mlflow.parentRunId"] = parent["mlflow"]
        run = client.create_run(exp_id, tags=tags, run_name=self.name)
        rid = run.info.run_id
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            client.log_batch(rid, params=items[i:i + 100])
        return {"client": client, "id": rid, "uri": uri}

    def _metrics_mlflow(self, b, values, step):
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step or 0) for k, v in values.items()]
        for i in range(0, len(items), 500):
            b["client"].log_batch(b["id"], metrics=items[i:i + 500])

    def _series_mlflow(self, b, name, values):
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        items = [Metric(name, float(v), now, i) for i, v in enumerate(values)]
        for i in range(0, len(items), 500):
            b["client"].log_batch(b["id"], metrics=items[i:i + 500])

    def _image_mlflow(self, b, name, path):
        b["client"].log_artifact(b["id"], str(path), "images")

    def _artifact_mlflow(self, b, path):
        b["client"].log_artifact(b["id"], str(path))

    def _end_mlflow(self, b):
        b["client"].set_terminated(b["id"])
        log.info("mlflow: run %s in experiment %s — mlflow ui --backend-store-uri %s", b["id"], self.experiment, b["uri"])

    # -------------------------------------------------------------------------------------------- wandb
    def _start_wandb(self, cfg, params, tags):
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        folder = Path(cfg.get("dir") or self.dir)
        folder.mkdir(parents=True, exist_ok=True)
        parent = _parent.get()
        # console="off": W&B leaves sys.stdout/stderr alone (no terminal capture into the run; our log is on disk)
        run = wandb.init(mode=str(cfg.get("mode") or "offline"), dir=str(folder), project=str(cfg.get("project") or "dng"),
                         group=self.experiment, name=self.name, config=params, tags=None,
                         job_type=parent["name"] if parent else None, reinit="create_new",
                         settings=wandb.Settings(console="off"))
        run.summary.update({f"tag.{k}": str(v) for k, v in tags.items()})
        return run

    def _metrics_wandb(self, run, values, step):
        run.log(dict(values))

    def _series_wandb(self, run, name, values):
        import wandb

        table = wandb.Table(columns=["step", name], data=[[i, float(v)] for i, v in enumerate(values)])
        run.log({f"{name}_series": table})

    def _image_wandb(self, run, name, path):
        import wandb

        run.log({name: wandb.Image(str(path))})

    def _artifact_wandb(self, run, path):
        run.save(str(path), base_path=str(path.parent), policy="now")

    def _end_wandb(self, run):
        run.finish()

    # ---------------------------------------------------------------------------------------------- aim
    def _start_aim(self, cfg, params, tags):
        from aim import Run as AimRun

        repo = Path(cfg.get("repo") or Path.cwd() / "outputs" / "aim")
        repo.mkdir(parents=True, exist_ok=True)
        run = AimRun(repo=str(repo), experiment=self.experiment, system_tracking_interval=None,
                     log_system_params=False, capture_terminal_logs=False)
        run.name = self.name
        run["hparams"] = {k: v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
                          for k, v in params.items()}
        run["tags"] = {k: str(v) for k, v in tags.items()}
        parent = _parent.get()
        if parent:
            run["parent"] = parent["name"]
        return {"run": run, "repo": repo}

    def _metrics_aim(self, b, values, step):
        for k, v in values.items():
            b["run"].track(float(v), name=k, step=step or 0)

    def _series_aim(self, b, name, values):
        for i, v in enumerate(values):
            b["run"].track(float(v), name=name, step=i)

    def _image_aim(self, b, name, path):
        from aim import Image

        b["run"].track(Image(str(path)), name=name)

    def _artifact_aim(self, b, path):
        b["run"][f"artifact.{path.stem}"] = path.read_text() if path.suffix in (".md", ".csv", ".json") else str(path)

    def _end_aim(self, b):
        b["run"].close()
        log.info("aim: run %s in experiment %s — aim up --repo %s", b["run"].hash, self.experiment, b["repo"])


def config_of(cfg) -> dict:
    """The ``logger`` block of a composed config (or a run spec's config mapping) as a plain dict ({} when none)."""
    from omegaconf import DictConfig, OmegaConf

    value = cfg.get("logger") if hasattr(cfg, "get") else None
    if isinstance(value, DictConfig):
        return OmegaConf.to_container(value, resolve=True)
    from dng_cli.spec import thawed

    return thawed(value) if value else {}


def log_result(logger_cfg: dict, command: str, output_dir: Path, result: dict, images: dict[str, Path] | None = None,
               series: dict[str, list[float]] | None = None, name: str | None = None) -> None:
    """A finished run's result to every configured tracker (nothing when ``logger_cfg`` is empty)."""
    if not logger_cfg:
        return
    try:
        params = flatten(result.get("config") or {})
        tags = {"fingerprint": result.get("fingerprint"), "folder": str(Path(output_dir).resolve()), "command": command,
                "method": result.get("label") or result.get("method")}
        run = Run(logger_cfg, command, output_dir, name or Path(output_dir).name, params, tags)
        run.metrics(numbers(result))
        for n, values in (series or {}).items():
            run.series(n, values)
        for n, path in (images or {}).items():
            run.image(n, path)
        run.end()
    except Exception as err:  # noqa: BLE001 - never fail a finished run
        log.warning("logger: could not log %s (%s: %s); the result is saved", output_dir, type(err).__name__, one_line(err))


class parent_run:
    """``with parent_run(logger_cfg, "compare", folder, params, tags) as run:`` — runs logged inside (a compare's
    grid points) become its children: the same experiment, MLflow's parentRunId, W&B's group."""

    def __init__(self, logger_cfg: dict, command: str, output_dir: Path, params: dict, tags: dict):
        self.cfg, self.command, self.dir, self.params, self.tags = logger_cfg, command, Path(output_dir), params, tags
        self.run, self.token = None, None

    def __enter__(self):
        if not self.cfg:
            return None
        experiment = f"dng-{self.command}-{self.dir.name}"
        self.run = Run(self.cfg, self.command, self.dir, self.dir.name, self.params, self.tags, experiment=experiment)
        mlflow = self.run.backends.get("mlflow")
        self.token = _parent.set({"experiment": experiment, "name": self.command,
                                  "mlflow": mlflow["id"] if mlflow else None})
        return self.run

    def __exit__(self, *exc):
        if self.token is not None:
            _parent.reset(self.token)
        if self.run is not None:
            self.run.end()
