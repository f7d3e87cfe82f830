"""From a composed config to samples: guidance, schedule, model, eps_fn and batched generation.

Shared by ``dng sample`` and ``dng evaluate``. Sample i always starts from x_T drawn by its own
generator seeded ``seed + i`` and draws every later noise from it too, so a sample does not depend
on the batch size or on which other samples are drawn, and methods are compared on identical noise.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from dng_cli import UserError, runs
from dng_cli.io import sha256_file
from dng_cli.guidance import METHODS
from dng_cli.models import (SHIPPED, ClassConditionalEps, PairEps, build_unet, classifier_weights_hash, load_classifier,
                            load_ddpm, null_label_index, resolve, resolve_precision, unet_weights_file)
from dng_cli.sampler import SampleOutput, as_epsilon, check_prediction_type, randn, sample
from dng_cli.schedule import VARIANCES, NoiseSchedule
from dng_cli.validate import check_types


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


def forbidden_names(cfg: DictConfig, forbidden: list[int]) -> str:
    """"[6 Shirt]" from the dataset's class names ("[0]" when the names are the indices themselves)."""
    names = list(cfg.dataset.get("class_names") or [])
    return "[" + ", ".join(f"{c}" if len(names) <= c or str(names[c]) == str(c) else f"{c} {names[c]}"
                           for c in forbidden) + "]"


def build_guidance(method_cfg: DictConfig):
    name = method_cfg.get("name")
    if name not in METHODS:
        raise UserError(f"method={name!r} is unknown: allowed are {', '.join(METHODS)}")
    kwargs = {k: v for k, v in method_cfg.items() if k != "name"}
    try:
        return METHODS[name](**kwargs)
    except TypeError as err:
        raise UserError(f"method {name}: {err}") from None


def model_scheduler_config(model_cfg: DictConfig) -> dict:
    """The diffusers scheduler config the model was trained with: ``scheduler_config.json`` in its folder
    (``dng train`` writes it; a pair's models must agree), ``model.scheduler`` for a random model. Without
    one: {} — diffusers' DDPMScheduler defaults, the linear 1e-4…0.02 chain over T = 1000 that every
    model trained here before the file existed used."""
    from dng_cli.io import read_json_object

    kind = model_cfg.get("kind")
    if kind == "random":
        return dict(OmegaConf.to_container(model_cfg.get("scheduler") or OmegaConf.create({})))
    if kind == "conditional":
        folders = {"model.path": resolve(str(model_cfg.path), "ddpm")}
    else:
        folders = {"model.unconditional": Path(str(model_cfg.unconditional)),
                   **{f"model.forbidden_models.{c}": Path(str(p)) for c, p in model_cfg.forbidden_models.items()}}
    configs = {k: read_json_object(f / "scheduler_config.json") if (f / "scheduler_config.json").is_file() else {}
               for k, f in folders.items()}
    first_key, first = next(iter(configs.items()))
    for key, conf in configs.items():
        if not torch.allclose(NoiseSchedule.from_scheduler(conf).betas, NoiseSchedule.from_scheduler(first).betas):
            raise UserError(f"{key} was trained with another noise schedule than {first_key} "
                            f"(their scheduler_config.json differ): a pair must share one")
    return first


def build_schedule(sampler_cfg: DictConfig, model_cfg: DictConfig) -> NoiseSchedule:
    """The model's own chain (``model_scheduler_config``), respaced to ``sampler.steps``."""
    return respaced(NoiseSchedule.from_scheduler(model_scheduler_config(model_cfg)), sampler_cfg)


def respaced(base: NoiseSchedule, sampler_cfg: DictConfig) -> NoiseSchedule:
    """``base`` respaced to ``sampler.steps`` after checking the sampler's ``steps`` and ``variance``."""
    if sampler_cfg.variance not in VARIANCES:
        raise UserError(f"sampler.variance={sampler_cfg.variance!r} is invalid: allowed are {', '.join(VARIANCES)}")
    steps = sampler_cfg.steps
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise UserError(f"sampler.steps={steps!r} is invalid: it must be an integer in [1, {len(base)}]")
    return base.respace(steps)


def prediction_type(model_cfg: DictConfig) -> str:
    return str(model_scheduler_config(model_cfg).get("prediction_type", "epsilon"))


def check_model_cfg(model_cfg: DictConfig, dataset_cfg: DictConfig | None = None) -> None:
    """The model's checkpoint folders exist and (with ``dataset_cfg``) fit the dataset's images and classes."""
    import json

    kind = model_cfg.get("kind")
    if kind == "conditional":
        path = resolve(str(model_cfg.path), "ddpm")
        if not (path / "config.json").is_file():
            raise UserError(f"model.path={str(model_cfg.path)!r} is not a checkpoint folder (save_pretrained folder "
                            f"with config.json) nor a shipped name ({', '.join(SHIPPED)})")
        configs = {"model.path": json.loads((path / "config.json").read_text())}
    elif kind == "pair":
        configs = {}
        for key, p in [("model.unconditional", model_cfg.unconditional),
                       *((f"model.forbidden_models.{c}", v) for c, v in model_cfg.forbidden_models.items())]:
            if not (Path(str(p)) / "config.json").is_file():
                raise UserError(f"model path {str(p)!r} is not a checkpoint folder (save_pretrained folder with config.json)")
            configs[key] = json.loads((Path(str(p)) / "config.json").read_text())
    elif kind == "random":
        from omegaconf import OmegaConf

        configs = {"model.unet": OmegaConf.to_container(model_cfg.unet)}
    else:
        raise UserError(f"model.kind={kind!r} is invalid: allowed are conditional, pair, random")
    if dataset_cfg is None:
        return
    want = {"in_channels": int(dataset_cfg.channels), "sample_size": int(dataset_cfg.image_size)}
    for key, conf in configs.items():
        for field, value in want.items():
            if conf.get(field) is not None and conf.get(field) != value:
                raise UserError(f"{key} does not fit dataset={dataset_cfg.name}: its {field} is {conf.get(field)}, "
                                f"the dataset's is {value}")
    if kind == "conditional":
        check_trained_on("model.path", str(model_cfg.path), "ddpm", dataset_cfg)
    if kind in ("conditional", "random"):
        embeds = next(iter(configs.values())).get("num_class_embeds")
        if embeds is not None and embeds != int(dataset_cfg.num_classes) + 1:
            raise UserError(f"model={model_cfg.get('name')} does not fit dataset={dataset_cfg.name}: it has "
                            f"{embeds - 1} classes (+ null label), the dataset {int(dataset_cfg.num_classes)}")
        if embeds is not None:
            null_label_index(int(embeds), model_cfg.get("null_label", "last"))


def check_trained_on(key: str, value: str, kind: str, dataset_cfg: DictConfig) -> None:
    """Refuse a model or classifier whose card says it was trained on another dataset: same image size and
    class count (mnist vs fashion_mnist) would otherwise run with the wrong class names and FID reference."""
    import json

    card = resolve(value, kind) / "card.json"
    trained = (json.loads(card.read_text()).get("data") or {}).get("dataset") if card.is_file() else None
    if trained is not None and trained != dataset_cfg.name:
        raise UserError(f"{key}={value!r} was trained on {trained}, not on dataset={dataset_cfg.name}: "
                        f"add dataset={trained}")


def check_run_cfg(cfg: DictConfig) -> None:
    """Everything `dng sample` / `dng evaluate` can check before loading anything heavy."""
    guidance = build_guidance(cfg.method)
    if guidance.prompt_branches:
        allowed = ", ".join(k for k, v in METHODS.items() if not v.prompt_branches)
        raise UserError(f"method {cfg.method.name} is for dng sd only (it guides with a text prompt's branches): "
                        f"allowed here are {allowed}")
    forbidden = forbidden_classes(cfg, int(cfg.dataset.num_classes))
    if hasattr(guidance, "check_classes"):
        guidance.check_classes(len(forbidden))
    check_types(cfg)  # n_samples, batch sizes, speed flags: the declared type/range table
    resolve_precision(str(cfg.sampler.get("precision", "fp32")), torch.device("cpu"), cfg.method.get("name"))
    check_model_cfg(cfg.model, cfg.dataset)
    check_prediction_type(prediction_type(cfg.model))
    build_schedule(cfg.sampler, cfg.model)


@dataclass
class SamplingSetup:
    """A loaded model with its eps_fn for one method, ready to draw samples."""

    eps_fn: object
    schedule: NoiseSchedule
    guidance: object
    shape: tuple[int, ...]
    device: torch.device
    variance: str


def load_model(model_cfg: DictConfig, device: torch.device):
    """The network(s) of a model config: one UNet, or (unconditional, {class: UNet}) in pair mode."""
    if model_cfg.kind == "conditional":
        return load_ddpm(str(model_cfg.path)).to(device)
    if model_cfg.kind == "random":
        from omegaconf import OmegaConf

        return build_unet(OmegaConf.to_container(model_cfg.unet), seed=int(model_cfg.seed)).eval().requires_grad_(False).to(device)
    uncond = load_ddpm(str(model_cfg.unconditional)).to(device)
    return uncond, {int(c): load_ddpm(str(p)).to(device) for c, p in model_cfg.forbidden_models.items()}


def make_eps_fn(network, model_cfg: DictConfig, forbidden: list[int], guidance, label: int | None = None,
                channels_last: bool = False, compile: bool = False, max_batch: int | None = None,
                precision: str = "fp32"):
    speed = dict(channels_last=channels_last, compile=compile, max_batch=max_batch, precision=precision)
    classes = forbidden if guidance.needs_conditional else []
    if model_cfg.kind == "pair":
        uncond, per_class = network
        missing = [c for c in classes if c not in per_class]
        if missing:
            raise UserError(f"pair model has no forbidden-class model for class {missing[0]}: "
                            f"model.forbidden_models has {sorted(per_class)}")
        return PairEps(uncond, [per_class[c] for c in classes], **speed)
    return ClassConditionalEps(network, classes, label=label, null_label=model_cfg.get("null_label", "last"), **speed)


def build(cfg: DictConfig, device: torch.device, network=None, label: int | None = None) -> SamplingSetup:
    guidance = build_guidance(cfg.method)
    forbidden = forbidden_classes(cfg, int(cfg.dataset.num_classes))
    network = network if network is not None else load_model(cfg.model, device)
    s = cfg.sampler
    eps_fn = make_eps_fn(network, cfg.model, forbidden, guidance, label, bool(s.get("channels_last", False)),
                         bool(s.get("compile", False)), s.get("max_batch"), precision_of(cfg, device))
    shape = (int(cfg.dataset.channels), int(cfg.dataset.image_size), int(cfg.dataset.image_size))
    schedule = build_schedule(cfg.sampler, cfg.model)
    eps_fn = as_epsilon(eps_fn, schedule, prediction_type(cfg.model))
    return SamplingSetup(eps_fn, schedule, guidance, shape, device, cfg.sampler.variance)


def generate(gen: SamplingSetup, seeds: list[int], progress: bool = False) -> SampleOutput:
    """Draw one batch: sample j from ``torch.Generator().manual_seed(seeds[j])`` alone — a CPU generator
    whatever the sampling device, so a seed gives the same sample on CPU and GPU up to float error."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    x_T = randn((len(seeds), *gen.shape), gens, device=gen.device)
    with torch.inference_mode():
        return sample(gen.eps_fn, gen.schedule, gen.guidance, x_T, generator=gens, progress=progress,
                      variance=gen.variance)


def generate_all(gen: SamplingSetup, seeds: list[int], batch_size: int, progress: bool = True, on_batch=None):
    """Batched ``generate`` over all seeds, concatenated (images, posterior, scale on the CPU).
    ``on_batch(seeds, output, seconds)`` is called after each batch (``dng evaluate`` saves it there)."""
    import time

    from tqdm.auto import tqdm

    outs = []
    for i in tqdm(range(0, len(seeds), batch_size), total=math.ceil(len(seeds) / batch_size),
                  disable=not progress, desc="batches"):
        t0 = time.time()
        out = generate(gen, seeds[i:i + batch_size], progress=False)
        outs.append(SampleOutput(out.images.cpu(), out.posterior.cpu(), out.scale.cpu(), out.timesteps))
        if on_batch is not None:
            on_batch(seeds[i:i + batch_size], outs[-1], time.time() - t0)
    return SampleOutput(torch.cat([o.images for o in outs]), torch.cat([o.posterior for o in outs], 1),
                        torch.cat([o.scale for o in outs], 1), outs[0].timesteps)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 [0, 255] (the format every metric and file uses)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def precision_of(cfg: DictConfig, device: torch.device | None = None) -> str:
    """The network precision this run uses (``sampler.precision`` with auto resolved; see models.resolve_precision)."""
    raw = str(cfg.sampler.get("precision", "fp32"))
    device = torch.device(device if device is not None else auto_device(str(cfg.sampler.get("device", "cpu"))))
    return resolve_precision(raw, device, cfg.method.get("name"))


def auto_device(device: str) -> str:
    """``auto`` -> cuda when a CUDA device is available, else cpu; any other name as it is."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def setup_torch(device: str = "cpu", num_threads: int | None = None) -> torch.device:
    if num_threads:
        torch.set_num_threads(int(num_threads))
    device = auto_device(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={device!r} is unavailable: no CUDA device here (use device=cpu)")
    return torch.device(device)


def device_name(device: torch.device) -> str:
    """The device actually used, as recorded with a result ("cpu", "cuda:0"; never "auto")."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def plain(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def hardware() -> str:
    import platform

    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}"
    return f"cpu:{platform.processor() or platform.machine()} x{os.cpu_count()} threads={torch.get_num_threads()}"


# ------------------------------------------------------------------------------ result identity
def result_identity(cfg: DictConfig, classifier: bool = True) -> dict:
    """Everything that determines a result (``runs.identity``): the result config and the hashes of the
    weights it used (``classifier=False``: a command that only samples, e.g. ``dng sample``)."""
    model = cfg.model
    weights = {"classifier": classifier_weights_hash(model.classifier)} if classifier else {}
    if classifier:  # the data a result is scored against, for a dataset of your own (dataset.root is a path key)
        from dng_cli.data import content_hash

        data_hash = content_hash(cfg.dataset, str(cfg.metrics.fid.split)) if "metrics" in cfg else None
        if data_hash is not None:
            weights["dataset"] = data_hash
    if model.kind == "conditional":
        weights["ddpm"] = _weights_hash(resolve(model.path, "ddpm"), "model.path")
    elif model.kind == "pair":
        weights["unconditional"] = _weights_hash(Path(str(model.unconditional)), "model.unconditional")
        for c, p in model.forbidden_models.items():
            weights[f"class_{c}"] = _weights_hash(Path(str(p)), f"model.forbidden_models.{c}")
    identity = runs.identity(plain(cfg), weights, schedule_of)
    identity.pop("sampler.precision", None)  # the precision actually used; fp32 is every earlier result's
    precision = precision_of(cfg) if "sampler" in cfg else "fp32"
    if precision != "fp32":
        identity["sampler.precision"] = precision
    return identity


def identity_config(config: dict) -> dict:
    """``runs.identity_config`` with the model's noise schedule (see ``schedule_identity``)."""
    return runs.identity_config(config, schedule_of)


def schedule_of(model: dict) -> dict:
    return schedule_identity(OmegaConf.create(model))


def schedule_identity(model_cfg: DictConfig) -> dict:
    """The model's noise schedule as result keys. A linear ε-chain keeps the keys the sampler config
    carried before the schedule moved into the model folder, so earlier results stay reusable."""
    conf = model_scheduler_config(model_cfg)
    schedule = NoiseSchedule.from_scheduler(conf)
    pred = str(conf.get("prediction_type", "epsilon"))
    if conf.get("trained_betas") is None and conf.get("beta_schedule", "linear") == "linear" and pred == "epsilon":
        return {"sampler.num_train_timesteps": float(len(schedule)), "sampler.beta_start": float(conf.get("beta_start", 1e-4)),
                "sampler.beta_end": float(conf.get("beta_end", 0.02))}
    return {"schedule.betas": runs.fingerprint(schedule.betas.tolist()), "schedule.prediction_type": pred}


def _weights_hash(folder: Path, key: str) -> str:
    """sha256 of a UNet folder's weights file (safetensors, .bin or .pt: ``unet_weights_file``)."""
    if not folder.is_dir():
        raise UserError(f"{key}: checkpoint folder {str(folder)!r} not found")
    try:
        return sha256_file(unet_weights_file(folder))
    except UserError as err:
        raise UserError(f"{key}: {err}") from None


def run_classifier(cfg: DictConfig):
    """The run's classifier (``model.classifier``), checked on one batch of the dataset's shape."""
    d = cfg.dataset
    return load_classifier(cfg.model.classifier, check=(int(d.channels), int(d.image_size), int(d.num_classes)))
