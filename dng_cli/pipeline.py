"""From a run spec (``dng_cli.spec``) to samples: model, eps_fn and batched generation.

Shared by ``dng sample`` and ``dng evaluate``. The functions that also take a config (``build``,
``result_identity``, ``run_classifier``, …) resolve it into a run spec first. Sample i always starts from x_T drawn by its own
generator seeded ``seed + i`` and draws every later noise from it too, so a sample does not depend
on the batch size or on which other samples are drawn, and methods are compared on identical noise.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from dng_cli import UserError, runs, spec
from dng_cli.models import ClassConditionalEps, PairEps, build_unet, load_classifier, load_ddpm
from dng_cli.sampler import SampleOutput, as_epsilon, randn, sample
from dng_cli.schedule import NoiseSchedule
from dng_cli.spec import build_guidance, forbidden_classes, respaced  # noqa: F401  (re-exported: sd, compare, tests)


def forbidden_names(cfg, forbidden: list[int]) -> str:
    """"[6 Shirt]" from the dataset's class names ("[0]" when the names are the indices themselves);
    ``cfg``: a config or a run spec."""
    names = list(cfg.dataset.get("class_names") or [])
    return "[" + ", ".join(f"{c}" if len(names) <= c or str(names[c]) == str(c) else f"{c} {names[c]}"
                           for c in forbidden) + "]"


def model_scheduler_config(model_cfg: DictConfig) -> dict:
    """The noise schedule a model config's model was trained with (``spec.scheduler_config``)."""
    return spec.scheduler_config(model_cfg, spec.model_folders(model_cfg))


def build_schedule(sampler_cfg: DictConfig, model_cfg: DictConfig) -> NoiseSchedule:
    """The model's own chain (``model_scheduler_config``), respaced to ``sampler.steps``."""
    return respaced(NoiseSchedule.from_scheduler(model_scheduler_config(model_cfg)), sampler_cfg)


@dataclass
class SamplingSetup:
    """A loaded model with its eps_fn for one method, ready to draw samples."""

    eps_fn: object
    schedule: NoiseSchedule
    guidance: object
    shape: tuple[int, ...]
    device: torch.device
    variance: str
    backend: str = "torch"  # the inference backend the network actually runs on (backends.network may fall back)


def load_model(model, device: torch.device):
    """The network(s) of a model (a ``spec.ModelSpec`` or a model config): one UNet, or (unconditional,
    {class: UNet}) in pair mode."""
    model = model if isinstance(model, spec.ModelSpec) else spec.model_spec(model)
    if model.kind == "conditional":
        return load_ddpm(model.path).to(device)
    if model.kind == "random":
        return build_unet(spec.thawed(model.unet), seed=model.seed).eval().requires_grad_(False).to(device)
    uncond = load_ddpm(model.unconditional).to(device)
    return uncond, {c: load_ddpm(p).to(device) for c, p in model.forbidden_models.items()}


def make_eps_fn(network, model: spec.ModelSpec, forbidden: list[int], guidance, label: int | None = None,
                channels_last: bool = False, compile: bool = False, max_batch: int | None = None,
                precision: str = "fp32", backend: str = "torch"):
    speed = dict(channels_last=channels_last, compile=compile, max_batch=max_batch, precision=precision,
                 backend=backend)
    classes = list(forbidden) if guidance.needs_conditional else []
    if model.kind == "pair":
        uncond, per_class = network
        missing = [c for c in classes if c not in per_class]
        if missing:
            raise UserError(f"pair model has no forbidden-class model for class {missing[0]}: "
                            f"model.forbidden_models has {sorted(per_class)}")
        return PairEps(uncond, [per_class[c] for c in classes], **speed)
    return ClassConditionalEps(network, classes, label=label, null_label=model.null_label, **speed)


def build(run, device: torch.device, network=None, label: int | None = None) -> SamplingSetup:
    """A ``SamplingSetup`` for a run spec (or a config, resolved first)."""
    run = run if isinstance(run, spec.RunSpec) else spec.resolve_run(run, scored=False)
    guidance = run.guidance()
    network = network if network is not None else load_model(run.model, device)
    s = run.sampler
    eps_fn = make_eps_fn(network, run.model, run.forbidden, guidance, label, s.channels_last, s.compile, s.max_batch,
                         s.precision, s.backend)
    backend = eps_fn.backend
    eps_fn = as_epsilon(eps_fn, run.schedule, run.model.prediction_type)
    return SamplingSetup(eps_fn, run.schedule, guidance, run.dataset.shape, device, s.variance, backend)


def generate(gen: SamplingSetup, seeds: list[int], progress: bool = False, on_step=None) -> SampleOutput:
    """Draw one batch: sample j from ``torch.Generator().manual_seed(seeds[j])`` alone — a CPU generator
    whatever the sampling device, so a seed gives the same sample on CPU and GPU up to float error."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    x_T = randn((len(seeds), *gen.shape), gens, device=gen.device)
    with torch.inference_mode():
        return sample(gen.eps_fn, gen.schedule, gen.guidance, x_T, generator=gens, progress=progress,
                      variance=gen.variance, on_step=on_step)


def generate_all(gen: SamplingSetup, seeds: list[int], batch_size: int, progress: bool = True, on_batch=None):
    """Batched ``generate`` over all seeds, concatenated (images, posterior, scale on the CPU).
    ``on_batch(seeds, output, seconds)`` is called after each batch (``dng evaluate`` saves it there).
    ``progress``: one bar (or, off a terminal, a line every 30 s) over sampling steps × batches with samples/s and
    an ETA (``dng_cli.progress``)."""
    import time

    from dng_cli.progress import Progress

    outs = []
    steps = len(gen.schedule)
    with Progress(math.ceil(len(seeds) / batch_size) * steps, f"sampling {len(seeds)} images", unit="step",
                  enabled=progress) as bar:
        for i in range(0, len(seeds), batch_size):
            t0 = time.time()
            chunk = seeds[i:i + batch_size]
            out = generate(gen, chunk, on_step=lambda k: bar.update(1, len(chunk) if k == steps - 1 else 0))
            outs.append(SampleOutput(out.images.cpu(), out.posterior.cpu(), out.scale.cpu(), out.timesteps))
            if on_batch is not None:
                on_batch(chunk, outs[-1], time.time() - t0)
    return SampleOutput(torch.cat([o.images for o in outs]), torch.cat([o.posterior for o in outs], 1),
                        torch.cat([o.scale for o in outs], 1), outs[0].timesteps)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 [0, 255] (the format every metric and file uses)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def precision_of(cfg: DictConfig, device: torch.device | None = None) -> str:
    """The network precision a config's run uses (``spec.precision_for``)."""
    return spec.precision_for(cfg.sampler, cfg.method.get("name"), device)


auto_device = spec.auto_device


def setup_torch(device: str = "cpu", num_threads: int | None = None) -> torch.device:
    """The device, with the thread count every backend uses: ``num_threads`` (sampler.num_threads), else
    ``OMP_NUM_THREADS`` (torch reads it itself), else SLURM's ``--cpus-per-task`` for a job that SLURM started
    (no more threads than the job's cores when several share a node), else torch's default."""
    slurm = os.environ.get("SLURM_CPUS_PER_TASK")
    if not num_threads and not os.environ.get("OMP_NUM_THREADS") and slurm and slurm.isdigit() and int(slurm) > 0:
        num_threads = int(slurm)
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


plain = spec.plain


def hardware() -> str:
    import platform

    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}"
    return f"cpu:{platform.processor() or platform.machine()} x{os.cpu_count()} threads={torch.get_num_threads()}"


# ------------------------------------------------------------------------------ result identity
def result_identity(cfg: DictConfig, classifier: bool = True) -> dict:
    """The result identity of a config's run (``spec.RunSpec.identity``; ``classifier=False``: a command
    that only samples, e.g. ``dng sample``)."""
    return dict(spec.resolve_run(cfg, scored=classifier).identity)


def identity_config(config: dict) -> dict:
    """``runs.identity_config`` with the model's noise schedule (see ``spec.schedule_keys``)."""
    return runs.identity_config(config, schedule_of)


schedule_of = spec.schedule_of


def run_classifier(run):
    """The run's classifier (``model.classifier``), checked on one batch of the dataset's shape; ``run``: a
    run spec or a config."""
    if isinstance(run, spec.RunSpec):
        d, source = run.dataset, spec.thawed(run.model.classifier)
    else:
        d, source = run.dataset, run.model.classifier
    return load_classifier(source, check=(int(d.channels), int(d.image_size), int(d.num_classes)))
