"""The composed config, resolved once into a frozen, typed run spec.

The front of ``dng sample`` and ``dng evaluate`` (and of ``dng calibrate``/``compare``, which run evaluations)
calls ``resolve(cfg)`` once. It makes every check that needs nothing heavy and resolves, in one place:

- the model: its kind and checkpoint folders (shipped names -> the package), its noise schedule
  (``scheduler_config.json``), the null label, and the classifier (``classifier_source``);
- the dataset (shape, classes, format), the forbidden classes, the method config and its label;
- the sampler: steps, variance, device (``auto`` decided) and network precision (``auto`` decided);
- the metric settings, and the result identity (``runs.identity``) that names the result on disk.

The layers below — ``pipeline.build``, ``scoring.Scorer``, the FID reference, the result files — take a
``RunSpec`` and never look at the DictConfig again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from dng_cli import UserError, runs
from dng_cli.io import fingerprint, sha256_file
from dng_cli.guidance import METHODS, build_guidance
from dng_cli.schedule import VARIANCES, NoiseSchedule, check_prediction_type


def frozen(value):
    """A plain container made read-only all the way down (dict -> MappingProxyType, list -> tuple)."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: frozen(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(frozen(v) for v in value)
    return value


def thawed(value):
    """``frozen``'s inverse: plain dicts and lists again (for JSON, Hydra instantiate, the identity)."""
    if isinstance(value, Mapping):
        return {k: thawed(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thawed(v) for v in value]
    return value


def plain(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


# ----------------------------------------------------------------------------- what names point to
ASSETS = Path(__file__).resolve().parent / "assets"
SHIPPED = {p.name: p for p in sorted(ASSETS.iterdir()) if p.is_dir()}  # assets/<name>/{ddpm,classifier,fid}


def resolve(name_or_path: str | Path, kind: str) -> Path:
    """The folder of a shipped asset by name ("mnist") and kind ("ddpm", "classifier"), or the path itself."""
    name = str(name_or_path)
    if name in SHIPPED:
        return SHIPPED[name] / kind
    return Path(name).expanduser()


UNET_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")  # diffusers' names, in order


def unet_weights_file(path: Path) -> Path:
    """The weights file of a UNet folder: diffusers' safetensors, else its ``.bin``, else the folder's one
    ``*.pt``/``*.pth``/``*.bin`` state dict."""
    for name in UNET_WEIGHTS:
        if (path / name).is_file():
            return path / name
    others = sorted(p for p in path.glob("*") if p.suffix in (".pt", ".pth", ".bin") and p.is_file())
    if len(others) == 1:
        return others[0]
    found = f"found {', '.join(p.name for p in others)}" if others else "found none"
    raise UserError(f"model path {str(path)!r} has no single weights file: expected {UNET_WEIGHTS[0]}, "
                    f"{UNET_WEIGHTS[1]} or one *.pt/*.pth state dict next to config.json ({found})")


def null_label_index(num_embeds: int, null_label) -> int:
    """The class-embedding index of the null (unconditional) label: "last" (this project's and most
    class-conditional DDPMs' convention: classes 0..K-1, null K), "first" (null 0, classes 1..K), or an index."""
    if null_label in (None, "last"):
        return num_embeds - 1
    if null_label == "first":
        return 0
    if isinstance(null_label, bool) or not isinstance(null_label, int) or not 0 <= null_label < num_embeds:
        raise UserError(f"model.null_label={null_label!r} is invalid: allowed are last, first or an index in "
                        f"0..{num_embeds - 1}")
    return int(null_label)


SOURCE_KINDS = ("folder", "torchscript", "target")


def classifier_source(value) -> dict:
    """What ``model.classifier`` names: {"kind": "folder", "path"} (this project's classifier; a shipped name
    or a folder with config.json + model.safetensors), {"kind": "torchscript", "path", "transform"} (a file,
    or a mapping with ``path``), or {"kind": "target", "target", "kwargs", "weights", "transform"}."""
    from collections.abc import Mapping

    from omegaconf import DictConfig, OmegaConf

    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping) and value.get("kind") in SOURCE_KINDS and "_target_" not in value:
        return {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in value.items()}  # already resolved (a run spec's)
    if isinstance(value, dict):
        spec = dict(value)
        transform = spec.pop("transform", None) or {}
        if "_target_" in spec:
            target = spec.pop("_target_")
            weights = spec.pop("weights", None)
            return {"kind": "target", "target": str(target), "kwargs": spec, "weights": weights, "transform": transform}
        if "path" in spec and set(spec) <= {"path"}:
            src = classifier_source(spec["path"])
            return {**src, "transform": transform} if src["kind"] == "torchscript" else src
        raise UserError(f"model.classifier={value!r} is invalid: give a path, or a mapping with _target_ "
                        f"(plus its arguments, weights, transform) or path (a TorchScript file) and transform")
    if value is None:
        raise UserError("model.classifier is not set: give a shipped name, a classifier folder, a TorchScript file "
                        "or a _target_ mapping")
    path = resolve(value, "classifier")
    if path.is_file():
        return {"kind": "torchscript", "path": str(path), "transform": {}}
    return {"kind": "folder", "path": str(path)}


def classifier_weights_hash(value) -> str:
    """The classifier's identity in a result: sha256 of this project's model.safetensors (as always), of a
    TorchScript file, or of a target's description and weights file, with the input transform."""
    src = classifier_source(value)
    if src["kind"] == "folder":
        path = Path(src["path"]) / "model.safetensors"
        if not path.is_file():
            raise UserError(f"model.classifier: weights file {str(path)!r} not found")
        return sha256_file(path)
    if src["kind"] == "torchscript":
        return fingerprint({"torchscript": sha256_file(Path(src["path"])), "transform": src["transform"]})
    weights = src["weights"]
    if weights is not None and not Path(str(weights)).expanduser().is_file():
        raise UserError(f"model.classifier.weights={str(weights)!r} is not a file")
    return fingerprint({**{k: v for k, v in src.items() if k != "weights"},
                        "weights": sha256_file(Path(str(weights)).expanduser()) if weights else None})


# ------------------------------------------------------------------------------------- eps_fns
PRECISIONS = ("fp32", "bf16", "auto")


# Methods whose results the paired fp32-vs-bf16 table (README performance section) found unchanged under bf16;
# ``sampler.precision=auto`` uses bf16 only for these, on hardware with native bf16: every row of theirs in
# docs/results/precision (MNIST and Fashion-MNIST) unchanged; ccfg lacks its Fashion-MNIST row.
BF16_CLEARED: frozenset[str] = frozenset({"dng", "np", "sld"})


def native_bf16(device: torch.device) -> bool:
    """Does the device compute bf16 natively (CUDA: Ampere/Hopper; CPU: the AVX512_BF16 or AMX-BF16 flags)?
    ``DNG_NATIVE_BF16=0`` (or ``1``) overrides the check, e.g. to keep ``auto`` at fp32 on a bf16 machine so that
    its results equal those of CPUs without bf16 (the test suite sets it to 0 for machine-independent results)."""
    forced = os.environ.get("DNG_NATIVE_BF16")
    if forced is not None:
        if forced not in ("0", "1"):
            raise UserError(f"DNG_NATIVE_BF16={forced!r} is invalid: 0 or 1")
        return forced == "1"
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device, method: str | None = None) -> str:
    """The network precision a run uses: fp32, bf16 (autocast on the network only, everywhere), or for
    ``auto`` bf16 where the device has it natively and the method is in ``BF16_CLEARED``, else fp32."""
    if precision not in PRECISIONS:
        raise UserError(f"sampler.precision={precision!r} is invalid: allowed are {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if method in BF16_CLEARED and native_bf16(device) else "fp32"
    return precision


# ------------------------------------------------------------------------- datasets of your own
FORMATS = ("builtin", "image_folder", "tensors", "torchvision")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def dataset_format(value) -> str:
    """``dataset.format`` checked (unset: builtin)."""
    fmt = value or "builtin"
    if fmt not in FORMATS:
        raise UserError(f"dataset.format={fmt!r} is invalid: allowed are {', '.join(FORMATS)}")
    return fmt


def split_source(dataset: "DatasetSpec", split: str) -> Path:
    """The folder (image_folder: ``<root>/<split>/<class>/*.png``) or file (tensors: ``<root>/<split>.npz``
    or ``.pt``) that holds a split of a dataset of your own."""
    root = Path(str(dataset.root)).expanduser()
    if dataset.format == "image_folder":
        folder = root / split
        if not folder.is_dir():
            raise UserError(f"dataset {dataset.name}: split folder {str(folder)!r} not found (layout: "
                            f"<dataset.root>/{{train,test}}/<class name>/<image>)")
        return folder
    for suffix in (".npz", ".pt"):
        if (root / f"{split}{suffix}").is_file():
            return root / f"{split}{suffix}"
    raise UserError(f"dataset {dataset.name}: {str(root / split)!r}.npz or .pt not found (arrays images "
                    f"uint8 [N, C, H, W] and labels [N])")


def content_hash(dataset: "DatasetSpec", split: str) -> str | None:
    """What identifies a split's data in a result: the sha256 of its file (tensors) or of every image with its
    class folder (image_folder); None for the built-in and torchvision datasets, named by their config."""
    fmt = dataset.format
    if fmt == "tensors":
        return sha256_file(split_source(dataset, split), 64)
    if fmt != "image_folder":
        return None
    folder = split_source(dataset, split)
    h = hashlib.sha256()
    for path in images_under(folder):
        h.update(f"{path.relative_to(folder).as_posix()}\0{sha256_file(path, 64)}\0".encode())
    return h.hexdigest()


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
    "sampler.steps": (INT, 1), "sampler.batch_size": (INT, 1),
    "sampler.max_batch": (INT, 1), "sampler.num_threads": (INT, 1),
    "sampler.channels_last": (BOOL_AUTO,), "sampler.compile": (BOOL,), "sampler.progress": (BOOL,),
    "method.guidance_scale": (FLOAT, 0.0), "method.prior": (FLOAT,), "method.temperature": (FLOAT, 0.0),
    "method.offset": (FLOAT,), "method.p_min": (FLOAT,), "method.p_max": (FLOAT,), "method.threshold": (FLOAT,),
    "method.scale": (FLOAT, 0.0), "method.momentum_scale": (FLOAT, 0.0), "method.momentum_beta": (FLOAT,),
    "method.warmup_steps": (INT, 0), "method.tau": (FLOAT, 0.0), "metrics.kl_smoothing": (FLOAT, 0.0, None, False),
    "dataset.channels": (INT, 1), "dataset.image_size": (INT, 1), "dataset.num_classes": (INT, 2),
    "pilot_n": (INT, 1), "max_probes": (INT, 2), "tolerance": (FLOAT, 0.0, None, False),
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
    _check_seeds_and_memory(cfg)
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


def _check_seeds_and_memory(cfg: DictConfig) -> None:
    """Seeds stay int64 (seed + n_samples ≤ 2^63), and a run's samples fit in memory before anything is allocated:
    the images (uint8 and float), per-step posteriors and scales and the classifier's features of every sample are
    held until the result is written — on a shared node an unbounded n_samples would take a neighbour's memory."""
    from omegaconf import OmegaConf

    for n_key, seed_key in (("n_samples", "seed"), ("n_samples", "sampler.seed"), ("pilot_n", "pilot_seed")):
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


# ----------------------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class DatasetSpec:
    """The dataset: its images' shape, its classes and where its data are (``data.load_dataset`` reads it)."""

    name: str
    channels: int
    image_size: int
    num_classes: int
    class_names: tuple[str, ...]
    format: str                                   # builtin | image_folder | tensors | torchvision
    root: str | None
    extra: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))  # target, kwargs, splits, …

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def names_of(self, classes) -> str:
        """"[6 Shirt]" from the class names ("[0]" when the names are the indices themselves)."""
        names = self.class_names
        return "[" + ", ".join(f"{c}" if len(names) <= c or str(names[c]) == str(c) else f"{c} {names[c]}"
                               for c in classes) + "]"


@dataclass(frozen=True)
class ModelSpec:
    """The diffusion model: kind, resolved checkpoint folders, noise schedule, null label, classifier."""

    name: str | None
    kind: str                                     # conditional | pair | random
    folders: Mapping[str, Path]                   # config key -> checkpoint folder ("model.path", "model.unconditional", …)
    weights: Mapping[str, Path]                   # config key -> that folder's weights file (``unet_weights_file``)
    forbidden_models: Mapping[int, Path]          # pair: class -> its model's folder
    unet: Mapping[str, Any] | None                # random: the architecture
    seed: int | None                              # random: the weights' seed
    null_label: Any                               # last | first | an embedding index
    scheduler_config: Mapping[str, Any]           # the chain the model was trained with
    classifier: Mapping[str, Any] | None          # ``classifier_source`` of model.classifier (None: not set)

    @property
    def path(self) -> Path:
        return self.folders["model.path"]

    @property
    def unconditional(self) -> Path:
        return self.folders["model.unconditional"]

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler_config.get("prediction_type", "epsilon"))

    def base_schedule(self) -> NoiseSchedule:
        return NoiseSchedule.from_scheduler(thawed(self.scheduler_config))


@dataclass(frozen=True)
class SamplerSpec:
    steps: int
    variance: str                                 # small | large
    seed: int
    batch_size: int
    device: str                                   # cpu, cuda, cuda:1 (auto decided)
    num_threads: int | None
    progress: bool
    channels_last: bool
    compile: bool
    max_batch: int | None
    precision: str                                # fp32 | bf16 (auto decided)
    backend: str = "torch"                        # torch | onnxruntime | openvino (auto decided, backends.resolve)


@dataclass(frozen=True)
class MetricsSpec:
    features: str                                 # classifier | inception
    split: str                                    # train | test (the FID reference)
    cache_dir: str
    inception_weights: str | None
    kl_smoothing: float
    backend: str = "torch"                        # where the Inception network runs (sampler.backend's rule on fp32)


@dataclass(frozen=True)
class RunSpec:
    """One ``dng sample``/``dng evaluate`` run, resolved. ``config`` is the composed config as a result records it."""

    config: Mapping[str, Any]
    method: Mapping[str, Any]                     # the method config: name, guidance_scale, …
    label: str                                    # the method config chosen (e.g. dng_official_cli)
    forbidden: tuple[int, ...]
    dataset: DatasetSpec
    model: ModelSpec
    sampler: SamplerSpec
    schedule: NoiseSchedule                       # the model's chain respaced to sampler.steps
    metrics: MetricsSpec | None                   # None: a command that only samples
    n_samples: int
    skip_existing: bool
    overwrite: bool
    save_samples: bool

    @property
    def method_name(self) -> str:
        return str(self.method["name"])

    @property
    def seeds(self) -> list[int]:
        return [self.sampler.seed + i for i in range(self.n_samples)]

    def guidance(self):
        """A fresh guidance object (it keeps per-run state, e.g. SLD's momentum)."""
        return build_guidance(self.method)

    def plain_config(self) -> dict:
        """The config as run, with ``sampler.precision`` the precision actually used (``auto`` decided): what a
        result records and what its identity starts from."""
        config = thawed(self.config)
        if isinstance(config.get("sampler"), dict):
            config["sampler"]["precision"] = self.sampler.precision
            if "backend" in config["sampler"]:  # as decided; in the identity unless torch-identical (runs)
                config["sampler"]["backend"] = self.sampler.backend
        return config

    @cached_property
    def identity(self) -> Mapping[str, Any]:
        """Everything that determines the result (``runs.identity``): the result config and the hashes of the
        weights (and of a dataset of your own) it used; the classifier's only when the run scores."""
        model, weights = self.model, {}
        if self.metrics is not None:
            weights["classifier"] = classifier_weights_hash(thawed(model.classifier))
            data_hash = content_hash(self.dataset, self.metrics.split)
            if data_hash is not None:
                weights["dataset"] = data_hash
        for key, folder in model.folders.items():
            name = {"model.path": "ddpm", "model.unconditional": "unconditional"}.get(key)
            weights[name or f"class_{key.rsplit('.', 1)[1]}"] = sha256_file(model.weights[key])
        identity = runs.identity(self.plain_config(), weights, lambda _: schedule_keys(thawed(model.scheduler_config)))
        return MappingProxyType(identity)

    @property
    def fingerprint(self) -> str:
        return fingerprint(dict(self.identity))


# ------------------------------------------------------------------------------------ resolving
def resolve_run(cfg: DictConfig, scored: bool = True) -> RunSpec:
    """The spec of a ``dng sample`` (``scored=False``) or ``dng evaluate`` config, after every cheap check."""
    method = build_guidance(plain(cfg.method))
    if "prompt" in method.inputs:
        allowed = ", ".join(k for k, v in METHODS.items() if "prompt" not in v.inputs)
        raise UserError(f"method {cfg.method.name} is for dng sd only (it guides with a text prompt's branches): "
                        f"allowed here are {allowed}")
    dataset = dataset_spec(cfg.dataset)
    forbidden = forbidden_classes(cfg, dataset.num_classes)
    if hasattr(method, "check_classes"):
        method.check_classes(len(forbidden))
    check_types(cfg)  # n_samples, batch sizes, speed flags: the declared type/range table
    sampler = sampler_spec(cfg.sampler, str(cfg.method.get("name")))
    model = model_spec(cfg.model, dataset, classifier=scored)
    check_prediction_type(model.prediction_type)
    schedule = respaced(model.base_schedule(), cfg.sampler)
    metrics = metrics_spec(cfg.metrics, dataset, cfg.sampler.get("backend", "auto")) if scored else None
    return RunSpec(config=frozen(plain(cfg)), method=frozen(plain(cfg.method)), label=method_label(cfg),
                   forbidden=tuple(forbidden), dataset=dataset, model=model, sampler=sampler, schedule=schedule,
                   metrics=metrics, n_samples=int(cfg.get("n_samples", 0)), skip_existing=bool(cfg.get("skip_existing", True)),
                   overwrite=bool(cfg.get("overwrite", False)), save_samples=bool(cfg.get("save_samples", True)))


def method_label(cfg: DictConfig) -> str:
    """The method config chosen (e.g. "dng_official_cli"): ``label`` when set, Hydra's choice of the
    method group, else the method's name."""
    from hydra.core.hydra_config import HydraConfig

    if cfg.get("label"):
        return str(cfg.label)
    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get("method")
        if choice:
            return str(choice)
    return str(cfg.method.name)


def forbidden_classes(cfg: DictConfig, num_classes: int) -> list[int]:
    """The top-level ``forbidden`` list, checked against the dataset's classes."""
    raw = cfg.get("forbidden", [])
    raw = list(raw) if isinstance(raw, (list, tuple, ListConfig)) else [raw]
    if not raw:
        raise UserError("forbidden=[] is invalid: name at least one forbidden class")
    out = []
    for c in raw:
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < num_classes:
            raise UserError(f"forbidden class {c!r} is out of range: allowed are 0..{num_classes - 1}")
        if c in out:
            raise UserError(f"forbidden class {c} is given twice")
        out.append(c)
    if len(out) == num_classes:
        raise UserError(f"forbidden={out} forbids every class: at least one of 0..{num_classes - 1} must be kept")
    return out


def dataset_spec(dataset_cfg: DictConfig) -> DatasetSpec:
    d = dataset_cfg  # attribute access: a missing mandatory value (???) fails here, in one line
    core = ("name", "channels", "image_size", "num_classes", "class_names", "format", "root")
    return DatasetSpec(name=str(d.name), channels=int(d.channels), image_size=int(d.image_size),
                       num_classes=int(d.num_classes), class_names=tuple(str(c) for c in d.get("class_names") or ()),
                       format=dataset_format(d.get("format")), root=None if d.get("root") is None else str(d.root),
                       extra=frozen({k: v for k, v in plain(d).items() if k not in core}))


def sampler_spec(sampler_cfg: DictConfig, method: str) -> SamplerSpec:
    s = sampler_cfg
    device = auto_device(str(s.get("device", "cpu")))
    precision = precision_for(s, method, device)
    from dng_cli import backends

    compile = bool(s.get("compile", False))
    backend = backends.resolve(s.get("backend", "auto"), precision, device, compile)
    return SamplerSpec(steps=s.steps, variance=str(s.variance), seed=int(s.seed), batch_size=int(s.batch_size),
                       device=device, num_threads=s.get("num_threads"), progress=bool(s.get("progress", True)),
                       channels_last=channels_last_for(s.get("channels_last", False), precision, device),
                       compile=compile, max_batch=s.get("max_batch"), precision=precision, backend=backend)


def channels_last_for(value, precision: str, device: str | torch.device) -> bool:
    """``sampler.channels_last`` with ``auto`` decided: NHWC except for bf16 on a CPU, where oneDNN's bf16
    convolutions run faster in NCHW (scripts/bench_precision.py: 716 vs 479 evals/s; fp32 269 NHWC vs 263 NCHW).
    The memory format changes float rounding only, never which result a config names (runs.NOT_RESULT_KEYS)."""
    if value == "auto":
        return not (precision == "bf16" and torch.device(device_type(str(device))).type == "cpu")
    return bool(value)


def precision_for(sampler_cfg, method: str | None, device: str | torch.device | None = None) -> str:
    """The network precision a sampler config uses on ``device`` (default: its own, auto decided):
    ``sampler.precision`` with auto resolved (``resolve_precision``)."""
    device = device if device is not None else auto_device(str(sampler_cfg.get("device", "cpu")))
    return resolve_precision(str(sampler_cfg.get("precision", "fp32")), torch.device(device_type(str(device))), method)


def metrics_spec(metrics_cfg: DictConfig, dataset: DatasetSpec, backend: str = "torch") -> MetricsSpec:
    """``backend``: ``sampler.backend`` as configured; the Inception network runs fp32 on the CPU, so it resolves
    as there (auto: the machine's choice) — only when Inception features are asked for."""
    from dng_cli import backends, metrics

    fid = metrics_cfg.fid
    if fid.features not in metrics.FEATURES:
        raise UserError(f"metrics.fid.features={fid.features!r} is unknown: allowed are {', '.join(metrics.FEATURES)}")
    if fid.split not in ("train", "test"):
        raise UserError(f"metrics.fid.split={fid.split!r} is invalid: allowed are train, test")
    if dataset.format in ("image_folder", "tensors"):
        split_source(dataset, str(fid.split))  # the FID reference's data exists
    weights = fid.get("inception_weights")
    return MetricsSpec(features=str(fid.features), split=str(fid.split), cache_dir=str(fid.cache_dir),
                       inception_weights=None if weights is None else str(weights),
                       kl_smoothing=float(metrics_cfg.kl_smoothing),
                       backend=backends.resolve(backend, "fp32", "cpu", False) if fid.features == "inception" else "torch")


def auto_device(device: str) -> str:
    """``auto`` -> cuda when a CUDA device is available, else cpu; any other name as it is."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def device_type(device: str) -> str:
    return "cuda" if str(device).startswith("cuda") else str(device)


def respaced(base: NoiseSchedule, sampler_cfg) -> NoiseSchedule:
    """``base`` respaced to ``sampler.steps`` after checking the sampler's ``steps`` and ``variance``."""
    if sampler_cfg.variance not in VARIANCES:
        raise UserError(f"sampler.variance={sampler_cfg.variance!r} is invalid: allowed are {', '.join(VARIANCES)}")
    steps = sampler_cfg.steps
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise UserError(f"sampler.steps={steps!r} is invalid: it must be an integer in [1, {len(base)}]")
    return base.respace(steps)


# ---------------------------------------------------------------------------------------- model
def model_folders(model_cfg) -> dict[str, Path]:
    """Every checkpoint folder a model config names, by its config key (a shipped name -> the package's)."""
    return {key: resolve(str(value), "ddpm") for key, value in model_paths(model_cfg).items()}


def model_paths(model_cfg) -> dict[str, Any]:
    """The checkpoint paths a model config names, as given, by config key."""
    kind = model_cfg.get("kind")
    if kind == "conditional":
        return {"model.path": model_cfg.path}
    if kind == "pair":
        return {"model.unconditional": model_cfg.unconditional,
                **{f"model.forbidden_models.{c}": p for c, p in model_cfg.forbidden_models.items()}}
    if kind == "random":
        return {}
    raise UserError(f"model.kind={kind!r} is invalid: allowed are conditional, pair, random")


def scheduler_config(model_cfg, folders: Mapping[str, Path]) -> dict:
    """The diffusers scheduler config the model was trained with: ``scheduler_config.json`` in its folder
    (``dng train`` writes it; a pair's models must agree), ``model.scheduler`` for a random model. Without
    one: {} — diffusers' DDPMScheduler defaults, the linear 1e-4…0.02 chain over T = 1000 that every
    model trained here before the file existed used."""
    if model_cfg.get("kind") == "random":
        conf = model_cfg.get("scheduler") or {}
        return dict(plain(conf) if isinstance(conf, DictConfig) else conf)
    configs = {}
    for key, folder in folders.items():
        path = folder / "scheduler_config.json"
        try:
            configs[key] = json.loads(path.read_bytes().decode("utf-8")) if path.is_file() else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"{key}: {str(path)!r} is not readable JSON ({type(err).__name__})") from None
    return NoiseSchedule.shared(configs)[0]


def model_spec(model_cfg: DictConfig, dataset: DatasetSpec | None = None, classifier: bool = False) -> ModelSpec:
    """The model config resolved and checked: its folders exist and (with ``dataset``) fit the dataset's
    images and classes; with ``classifier``, model.classifier too."""
    kind = model_cfg.get("kind")
    folders = model_folders(model_cfg)
    configs = {}
    for key, path in folders.items():
        if not (path / "config.json").is_file():
            value = model_paths(model_cfg)[key]  # as given, for the message
            if key == "model.path":
                raise UserError(f"model.path={str(value)!r} is not a checkpoint folder (save_pretrained folder "
                                f"with config.json) nor a shipped name ({', '.join(SHIPPED)})")
            raise UserError(f"model path {str(value)!r} is not a checkpoint folder (save_pretrained folder with config.json)")
        configs[key] = json.loads((path / "config.json").read_text())
    weights = {key: weights_file(path, key) for key, path in folders.items()}
    if kind == "random":
        configs = {"model.unet": plain(model_cfg.unet)}
    null_label = model_cfg.get("null_label", "last")
    if dataset is not None:
        _check_fits(model_cfg, kind, configs, dataset, null_label)
    source = None
    if classifier:
        source = classifier_spec(model_cfg.get("classifier"), dataset)
    elif not OmegaConf.is_missing(model_cfg, "classifier") and model_cfg.get("classifier") is not None:
        source = classifier_source(model_cfg.classifier)
    forbidden_models = ({int(c): folders[f"model.forbidden_models.{c}"] for c in model_cfg.forbidden_models}
                        if kind == "pair" else {})
    return ModelSpec(name=model_cfg.get("name"), kind=str(kind), folders=MappingProxyType(folders),
                     weights=MappingProxyType(weights),
                     forbidden_models=MappingProxyType(forbidden_models),
                     unet=frozen(plain(model_cfg.unet)) if kind == "random" else None,
                     seed=int(model_cfg.seed) if kind == "random" else None, null_label=null_label,
                     scheduler_config=frozen(scheduler_config(model_cfg, folders)),
                     classifier=frozen(source) if source is not None else None)


def _check_fits(model_cfg, kind: str, configs: dict, dataset: DatasetSpec, null_label) -> None:
    want = {"in_channels": dataset.channels, "out_channels": dataset.channels, "sample_size": dataset.image_size}
    for key, conf in configs.items():
        for field_, value in want.items():
            if conf.get(field_) is not None and conf.get(field_) != value:
                raise UserError(f"{key} does not fit dataset={dataset.name}: its {field_} is {conf.get(field_)}, "
                                f"the dataset's is {value}")
    if kind == "conditional":
        check_trained_on("model.path", str(model_cfg.path), "ddpm", dataset)
    if kind in ("conditional", "random"):
        embeds = next(iter(configs.values())).get("num_class_embeds")
        if embeds is not None and embeds != dataset.num_classes + 1:
            raise UserError(f"model={model_cfg.get('name')} does not fit dataset={dataset.name}: it has "
                            f"{embeds - 1} classes (+ null label), the dataset {dataset.num_classes}")
        if embeds is not None:
            null_label_index(int(embeds), null_label)


def classifier_spec(value, dataset: DatasetSpec | None) -> dict:
    """``model.classifier`` resolved (``classifier_source``) and checked against the dataset."""
    src = classifier_source(value)
    if src["kind"] == "folder":
        clf = Path(src["path"]) / "config.json"
        if not clf.is_file():
            raise UserError(f"model.classifier={str(value)!r} is not a classifier folder (config.json "
                            f"and model.safetensors), a TorchScript file, nor a shipped name ({', '.join(SHIPPED)})")
        if dataset is not None:
            conf = json.loads(clf.read_text())
            for field_, want in (("in_channels", dataset.channels), ("num_classes", dataset.num_classes)):
                if conf.get(field_) is not None and conf[field_] != want:
                    raise UserError(f"model.classifier={str(value)!r} does not fit dataset={dataset.name}: "
                                    f"its {field_} is {conf[field_]}, the dataset's is {want}")
            check_trained_on("model.classifier", str(value), "classifier", dataset)
    elif src["kind"] == "target" and src["weights"] is not None and not Path(str(src["weights"])).expanduser().is_file():
        raise UserError(f"model.classifier.weights={str(src['weights'])!r} is not a file")  # hashed once, in the identity
    return src


def check_trained_on(key: str, value: str, kind: str, dataset) -> None:
    """Refuse a model or classifier whose card says it was trained on another dataset: same image size and
    class count (mnist vs fashion_mnist) would otherwise run with the wrong class names and FID reference."""
    card = resolve(value, kind) / "card.json"
    trained = (json.loads(card.read_text()).get("data") or {}).get("dataset") if card.is_file() else None
    if trained is not None and trained != dataset.name:
        raise UserError(f"{key}={value!r} was trained on {trained}, not on dataset={dataset.name}: "
                        f"add dataset={trained}")


# -------------------------------------------------------------------------------------- identity
def schedule_keys(conf: dict) -> dict:
    """The model's noise schedule as result keys. A linear ε-chain keeps the keys the sampler config
    carried before the schedule moved into the model folder, so earlier results stay reusable."""
    schedule = NoiseSchedule.from_scheduler(conf)
    pred = str(conf.get("prediction_type", "epsilon"))
    if conf.get("trained_betas") is None and conf.get("beta_schedule", "linear") == "linear" and pred == "epsilon":
        return {"sampler.num_train_timesteps": float(len(schedule)), "sampler.beta_start": float(conf.get("beta_start", 1e-4)),
                "sampler.beta_end": float(conf.get("beta_end", 0.02))}
    return {"schedule.betas": fingerprint(schedule.betas.tolist()), "schedule.prediction_type": pred}


def schedule_of(model: dict) -> dict:
    """``schedule_keys`` of a stored result's model config (``runs.identity_config`` of an earlier result)."""
    model_cfg = OmegaConf.create(model)
    return schedule_keys(scheduler_config(model_cfg, model_folders(model_cfg)))


def weights_file(folder: Path, key: str) -> Path:
    """A UNet folder's weights file (safetensors, .bin or .pt: ``unet_weights_file``); errors name the config key."""
    if not folder.is_dir():
        raise UserError(f"{key}: checkpoint folder {str(folder)!r} not found")
    try:
        return unet_weights_file(folder)
    except UserError as err:
        raise UserError(f"{key}: {err}") from None
