"""Guided ancestral DDPM sampling over any ``eps_fn(x, t) -> (eps_u, eps_c)`` (Ho et al. 2020, Alg. 2).

A K-step run follows the respaced chain exactly (see ``NoiseSchedule.respace``). Guidance is a
separate object (``dng_cli.guidance``); the loop only does the DDPM arithmetic and bookkeeping.
``generate``/``generate_all`` draw a run's samples from a ``SamplingSetup`` (network, schedule, guidance) with one
CPU generator per seed, batch by batch (as EDM's ``StackedRandomGenerator``, but device-independent).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from dng_cli import UserError
from dng_cli.guidance import Guidance, NoGuidance, StepInfo
from dng_cli.schedule import NoiseSchedule, check_prediction_type

class NonFinite(UserError):
    """A chain left the finite numbers: its images would be black and its metrics meaningless."""


EpsFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
Generators = torch.Generator | Sequence[torch.Generator] | None


@dataclass
class SampleOutput:
    images: torch.Tensor  # [B, ...] final x_0 (not clamped)
    posterior: torch.Tensor  # [steps, B] or [steps, B, K]: p(c | x_{t-1..T}) after each step (0 if untracked)
    scale: torch.Tensor  # [steps, B]: effective guidance scale λ_t used at each step
    timesteps: torch.Tensor  # [steps]: original timesteps, in sampling order


def randn(shape: Sequence[int], generator: Generators, device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise drawn on each generator's own device — the CPU for ``torch.Generator()`` — and
    moved to ``device``: a seed then means the same noise on every device and at every batch size
    (diffusers' ``randn_tensor`` convention). One generator per sample: sample j from generator j alone."""
    if generator is None:
        return torch.randn(tuple(shape), device=device, dtype=dtype)
    if isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype).to(device)
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=g.device, dtype=dtype)
                        for g in generator]).to(device)


def as_epsilon(eps_fn: EpsFn, schedule: NoiseSchedule, prediction_type: str = "epsilon") -> EpsFn:
    """``eps_fn`` of a model that predicts ``prediction_type`` (diffusers' names), as an ε-predictor.

    At x_t = √ᾱ x_0 + √(1-ᾱ) ε: v = √ᾱ ε - √(1-ᾱ) x_0 gives ε = √ᾱ v + √(1-ᾱ) x_t, and a predicted
    x_0 gives ε = (x_t - √ᾱ x_0)/√(1-ᾱ). Both are affine in the output with weights that do not depend
    on it, so classifier-free and negative combinations commute with the conversion."""
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return eps_fn
    abar_all = schedule.original().alphas_cumprod

    def converted(x: torch.Tensor, t: torch.Tensor):
        abar = abar_all.to(x.device)[t.long()].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        a, b = abar.sqrt(), (1.0 - abar).sqrt()
        outs = eps_fn(x, t)
        if prediction_type == "v_prediction":
            return tuple(None if o is None else a * o + b * x for o in outs)
        return tuple(None if o is None else (x - a * o) / b for o in outs)

    return converted


def sample(eps_fn: EpsFn, schedule: NoiseSchedule, guidance: Guidance | None = None, x_T: torch.Tensor | None = None,
           generator: Generators = None, progress: bool = True, variance: str = "small",
           shape: Sequence[int] | None = None, on_step: Callable[[int], None] | None = None) -> SampleOutput:
    """Run the reverse chain of ``schedule`` from ``x_T`` with ``guidance`` (default: none).

    ``eps_fn(x, t)``: ``t`` is a LongTensor[B] of ORIGINAL timesteps; returns ``eps_u`` [B, ...] and
    ``eps_c`` [B, ...] or [K, B, ...] for K forbidden classes (None is fine for ``NoGuidance``).
    ``generator``: one ``torch.Generator``, or one per sample so results do not depend on batching.
    ``variance``: "small" (σ² = β̃, the default: better at few steps) or "large" (σ² = β', the official code's).
    ``on_step(i)`` is called after step i (a caller's progress over several batches).
    """
    guidance = guidance if guidance is not None else NoGuidance()
    if x_T is None:
        if shape is None:
            raise ValueError("sample() needs x_T or shape")
        x_T = randn(shape, generator)
    x = x_T
    batch, steps = x.shape[0], len(schedule)
    sigma2 = schedule.variances(variance)
    # Per-step coefficients as Python floats: no host syncs inside the loop.
    abar, betas = schedule.alphas_cumprod.tolist(), schedule.betas.tolist()
    sig, var, var_small = sigma2.sqrt().tolist(), sigma2.tolist(), schedule.variances("small").tolist()
    prec, prec_small = schedule.span_precision(variance).tolist(), schedule.span_precision("small").tolist()
    spans = schedule.timestep_spans()
    ts = schedule.timesteps.flip(0)
    t_batch = ts.to(x.device).view(-1, 1).expand(steps, batch).contiguous()

    state, num_classes = None, None
    posterior = scale = None
    finite = torch.ones(steps, dtype=torch.bool, device=x.device)  # per step, checked once at the end: no host syncs
    for i in tqdm(range(steps), disable=not progress, desc="sampling", leave=False):
        k = steps - 1 - i  # index into the (ascending) schedule
        eps_u, eps_c = eps_fn(x, t_batch[i])
        if eps_c is not None and eps_c.dim() == x.dim():
            eps_c = eps_c.unsqueeze(0)
        if state is None:
            num_classes = eps_c.shape[0] if eps_c is not None else 1
            state = guidance.start(x, num_classes)
            posterior = x.new_zeros((steps, batch, num_classes))
            scale = x.new_empty((steps, batch))
        eps, scale[i] = guidance(eps_u, eps_c, i, state)
        c_x = (1.0 - betas[k]) ** -0.5  # 1/√(1-β'_k)
        c_eps = betas[k] / (1.0 - abar[k]) ** 0.5  # β'_k/√(1-ᾱ_k)
        x_next = (x - c_eps * eps) * c_x  # μ(ε̃)
        if k > 0:
            x_next = x_next + sig[k] * randn(x.shape, generator, device=x.device, dtype=x.dtype)
            if guidance.needs_update:
                mu_u = (x - c_eps * eps_u) * c_x
                mu_c = (x - c_eps * eps_c) * c_x
                guidance.update(state, StepInfo(x_next, mu_u, mu_c, var[k], var_small[k], spans[k], prec[k],
                                                prec_small[k]))
        p = guidance.posterior(state)
        if p is not None:
            posterior[i] = p
        finite[i] = torch.isfinite(eps).all() & torch.isfinite(x_next).all() & (
            torch.isfinite(p).all() if p is not None else True)
        x = x_next
        if on_step is not None:
            on_step(i)
    if not bool(finite.all()):
        i = int((~finite).nonzero()[0])
        raise NonFinite(f"the sampler produced NaN/inf at step {i + 1} of {steps} (timestep {int(ts[i])}): the "
                        f"denoiser's output or the guided update overflowed; check the model's weights, "
                        f"sampler.precision and the guidance scale (nothing was written)")
    if num_classes == 1:
        posterior = posterior.squeeze(-1)
    return SampleOutput(x, posterior, scale, ts)
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


