"""Negative guidance methods: how ε_u and the forbidden-class ε_c combine into the ε̃ a step uses.

Every method is one small class. The sampler calls ``start`` once, ``__call__`` every step and, for
methods that track a posterior, ``update`` after the step has been taken. ``eps_c`` always arrives
as ``[K, B, ...]`` (K forbidden classes); returned scales are the effective λ_t per sample, ``[B]``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from dng_cli import UserError

State = dict[str, Any]


class NoGuidance:
    """Plain ancestral sampling: ε̃ = ε_u."""

    tracks_posterior = False
    needs_conditional = False

    def start(self, x_T: torch.Tensor, num_classes: int) -> State:
        return {}

    def __call__(self, eps_u: torch.Tensor, eps_c: torch.Tensor | None, step: int, state: State):
        return eps_u, eps_u.new_zeros(eps_u.shape[0])


class NegativePrompting(NoGuidance):
    """Negative Prompting with a constant scale (Ho & Salimans 2022; Liu et al. 2022, "Composable
    Diffusion", Eq. 13 with a negative weight):  ε̃ = ε_u - λ Σ_c (ε_c - ε_u).
    """

    needs_conditional = True

    def __init__(self, guidance_scale: float = 1.0):
        self.guidance_scale = _check_finite_nonneg("guidance_scale", guidance_scale)

    def __call__(self, eps_u, eps_c, step, state):
        eps = eps_u - self.guidance_scale * (eps_c - eps_u).sum(0)
        return eps, eps_u.new_full((eps_u.shape[0],), self.guidance_scale)


class SafeLatentDiffusion(NoGuidance):
    """Safe Latent Diffusion (Schramowski et al., CVPR 2023, Eqs. 3-8), as diffusers'
    ``StableDiffusionPipelineSafe`` with the prompt taken as the unconditional prediction:

        d = ε_u - ε_c;   m = where(d < threshold, min(scale·|d|, 1), 0)            # Eq. 6
        γ = m ⊙ (ε_c - ε_u) + momentum_scale · ν                                   # Eqs. 4, 7
        ν ← momentum_beta · ν + (1 - momentum_beta) · γ        (every step)        # Eq. 8
        ε̃ = ε_u - λ Σ_c γ_c      once step index ≥ warmup_steps, else ε_u           # Eq. 3

    The reported effective scale is λ times the mean of the element-wise mask m (0 during warm-up).
    """

    needs_conditional = True

    def __init__(self, guidance_scale: float = 1.0, threshold: float = 0.04, scale: float = 100.0,
                 momentum_scale: float = 0.2, momentum_beta: float = 0.1, warmup_steps: int = 0):
        self.guidance_scale = _check_finite_nonneg("guidance_scale", guidance_scale)
        self.threshold = float(threshold)
        self.scale = _check_finite_nonneg("scale", scale)
        self.momentum_scale = _check_finite_nonneg("momentum_scale", momentum_scale)
        if not 0.0 <= momentum_beta < 1.0:
            raise UserError(f"momentum_beta={momentum_beta} is invalid: it must lie in [0, 1)")
        self.momentum_beta = float(momentum_beta)
        if int(warmup_steps) != warmup_steps or warmup_steps < 0:
            raise UserError(f"warmup_steps={warmup_steps} is invalid: it must be a non-negative integer")
        self.warmup_steps = int(warmup_steps)

    def start(self, x_T, num_classes):
        return {"momentum": x_T.new_zeros((num_classes, *x_T.shape))}

    def __call__(self, eps_u, eps_c, step, state):
        diff = eps_c - eps_u  # = -d
        mask = torch.where(-diff < self.threshold, (self.scale * diff.abs()).clamp_(max=1.0), 0.0)  # Eq. 6
        gamma = mask * diff + self.momentum_scale * state["momentum"]  # Eqs. 4, 7
        state["momentum"] = self.momentum_beta * state["momentum"] + (1 - self.momentum_beta) * gamma  # Eq. 8
        if step < self.warmup_steps:
            return eps_u, eps_u.new_zeros(eps_u.shape[0])
        eps = eps_u - self.guidance_scale * gamma.sum(0)  # Eq. 3
        return eps, self.guidance_scale * mask.flatten(2).mean(-1).sum(0)


class DynamicNegativeGuidance(NoGuidance):
    """Dynamic Negative Guidance (Koulischer et al., ICLR 2025, Eqs. 9-12 and Alg. 1):

        ε̃ = ε_u - λ Σ_c p_c / (1 - Σ_c p_c) · (ε_c - ε_u),
        p_c = p(c | x_t, …, x_T), tracked along the reverse chain from p_c = prior:
        log p_c ← clip( log p_c + (offset - temperature · (‖x' - μ_c‖² - ‖x' - μ_u‖²)) / (2σ²),
                        log p_min, log p_max ),
        μ_u = μ(ε_u), μ_c = μ(ε_c) the UNguided means of the step just taken, x' its result.

    The posterior lives in log space, so it stays finite for any scale. ``1 - Σ p`` is floored at
    ``1 - p_max`` (only reachable with several classes). σ² is the variance the sampler draws with
    (``update_variance="sampled"``); ``update_variance="small"`` uses β̃ whatever the sampler draws
    with — with ``sampler.variance=large`` and ``offset=0`` that is the official implementation's
    convention (github.com/FelixKoulischer/Dynamic-Negative-Guidance).
    Static limit: temperature = offset = 0 is NP with scale λ·prior/(1-prior).
    """

    tracks_posterior = True
    needs_conditional = True

    def __init__(self, guidance_scale: float = 5.0, prior: float = 0.01, temperature: float = 0.2,
                 offset: float = 2e-4, p_min: float = 1e-6, p_max: float = 0.8,
                 update_variance: str = "sampled"):
        self.guidance_scale = _check_finite_nonneg("guidance_scale", guidance_scale)
        if not 0.0 < prior < 1.0:
            raise UserError(f"prior={prior} is invalid: it must lie in (0, 1)")
        self.temperature = _check_finite_nonneg("temperature", temperature)
        if not math.isfinite(offset):
            raise UserError(f"offset={offset} is invalid: it must be a finite number")
        if not 0.0 < p_min < 1.0:
            raise UserError(f"p_min={p_min} is invalid: it must lie in (0, 1)")
        if not p_min < p_max < 1.0:
            raise UserError(f"p_max={p_max} is invalid: it must satisfy p_min={p_min} < p_max < 1")
        if not p_min <= prior <= p_max:
            raise UserError(f"prior={prior} is invalid: it must lie in [p_min, p_max] = [{p_min}, {p_max}]")
        if update_variance not in ("sampled", "small"):
            raise UserError(f"update_variance={update_variance!r} is invalid: allowed are sampled, small")
        self.prior, self.offset, self.p_min, self.p_max = float(prior), float(offset), float(p_min), float(p_max)
        self.update_variance = update_variance

    def check_classes(self, num_classes: int) -> None:
        """The priors of all forbidden classes together must stay below p_max (they share 1 - Σp)."""
        if num_classes > 1 and num_classes * self.prior >= self.p_max:
            raise UserError(f"prior={self.prior} is invalid with {num_classes} forbidden classes: "
                            f"{num_classes} x prior must be < p_max={self.p_max}")

    def start(self, x_T, num_classes):
        self.check_classes(num_classes)
        return {"log_posterior": x_T.new_full((x_T.shape[0], num_classes), math.log(self.prior))}

    def weights(self, log_posterior: torch.Tensor) -> torch.Tensor:
        """Per-class scales λ p_c / (1 - Σ p), [B, K]."""
        p = log_posterior.exp()
        return self.guidance_scale * p / (1.0 - p.sum(-1, keepdim=True)).clamp_(min=1.0 - self.p_max)

    def __call__(self, eps_u, eps_c, step, state):
        w = self.weights(state["log_posterior"])  # [B, K]
        w_b = w.t().reshape(*w.t().shape, *([1] * (eps_u.dim() - 1)))  # [K, B, 1, ...]
        eps = eps_u - (w_b * (eps_c - eps_u)).sum(0)  # Eq. 12
        return eps, w.sum(-1)

    def update(self, state: State, x_next: torch.Tensor, mu_u: torch.Tensor, mu_c: torch.Tensor, variance: float):
        """Bayes update of log p_c with the Gaussian transition ratio N(x'; μ_c, σ²) / N(x'; μ_u, σ²)."""
        r = x_next - mu_u
        delta = mu_c - mu_u  # [K, B, ...]
        # ‖x' - μ_c‖² - ‖x' - μ_u‖² = ‖δ‖² - 2⟨x' - μ_u, δ⟩
        sq = (delta * (delta - 2 * r)).flatten(2).sum(-1).t()  # [B, K]
        increment = (self.offset - self.temperature * sq) / (2.0 * variance)
        increment = torch.nan_to_num(increment, nan=0.0, posinf=1e30, neginf=-1e30)
        state["log_posterior"] = (state["log_posterior"] + increment).clamp_(math.log(self.p_min), math.log(self.p_max))


def _check_finite_nonneg(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise UserError(f"{name}={value} is invalid: it must be a finite number >= 0")
    return value


METHODS = {
    "none": NoGuidance,
    "np": NegativePrompting,
    "sld": SafeLatentDiffusion,
    "dng": DynamicNegativeGuidance,
}
