"""Guided ancestral DDPM sampling over any ``eps_fn(x, t) -> (eps_u, eps_c)`` (Ho et al. 2020, Alg. 2).

A K-step run follows the respaced chain exactly (see ``NoiseSchedule.respace``). Guidance is a
separate object (``dng_cli.guidance``); the loop only does the DDPM arithmetic and bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from dng_cli.guidance import Guidance, NoGuidance, StepInfo
from dng_cli.schedule import NoiseSchedule

EpsFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
Generators = torch.Generator | Sequence[torch.Generator] | None


@dataclass
class SampleOutput:
    images: torch.Tensor  # [B, ...] final x_0 (not clamped)
    posterior: torch.Tensor  # [steps, B] or [steps, B, K]: p(c | x_{t-1..T}) after each step (0 if untracked)
    scale: torch.Tensor  # [steps, B]: effective guidance scale λ_t used at each step
    timesteps: torch.Tensor  # [steps]: original timesteps, in sampling order


def randn(shape: Sequence[int], generator: Generators, device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise; with one generator per sample, row i comes from generator i only."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=device, dtype=dtype) for g in generator])


def sample(eps_fn: EpsFn, schedule: NoiseSchedule, guidance: Guidance | None = None, x_T: torch.Tensor | None = None,
           generator: Generators = None, progress: bool = True, variance: str = "small",
           shape: Sequence[int] | None = None) -> SampleOutput:
    """Run the reverse chain of ``schedule`` from ``x_T`` with ``guidance`` (default: none).

    ``eps_fn(x, t)``: ``t`` is a LongTensor[B] of ORIGINAL timesteps; returns ``eps_u`` [B, ...] and
    ``eps_c`` [B, ...] or [K, B, ...] for K forbidden classes (None is fine for ``NoGuidance``).
    ``generator``: one ``torch.Generator``, or one per sample so results do not depend on batching.
    ``variance``: "small" (σ² = β̃, the default: better at few steps) or "large" (σ² = β', the official code's).
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
        x = x_next
    if num_classes == 1:
        posterior = posterior.squeeze(-1)
    return SampleOutput(x, posterior, scale, ts)
