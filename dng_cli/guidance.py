"""Negative guidance methods: how ε_u and the forbidden-class ε_c combine into the ε̃ a step uses.

Every method is one small class implementing the ``Guidance`` protocol, and the sampler knows
nothing else about it:

- ``start(x_T, num_classes) -> state``: once, before the first step (the method's memory lives in
  ``state``, one entry per sample);
- ``__call__(eps_u, eps_c, step, state) -> (ε̃, λ_t)``: every step; ``eps_c`` is ``[K, B, ...]``
  (K forbidden classes), λ_t the effective scale per sample, ``[B]``;
- ``update(state, info: StepInfo)``: after every noisy step, for methods with ``needs_update``
  (the step's result, the unguided means μ_u, μ_c, its variances and the original timesteps it spans);
- ``posterior(state) -> [B, K] | None``: p(c | x_t, …, x_T) of methods that track one.

A new method is one subclass here plus one ``configs/method/<name>.yaml`` (and an entry in METHODS).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from dng_cli import UserError

State = dict[str, Any]


@dataclass
class StepInfo:
    """What one reverse step x_t -> x' hands to ``Guidance.update``."""

    x_next: torch.Tensor  # x' = μ(ε̃) + σ z, [B, ...]
    mu_u: torch.Tensor  # μ(ε_u), the unguided mean of the step, [B, ...]
    mu_c: torch.Tensor  # μ(ε_c) per forbidden class, [K, B, ...]
    variance: float  # σ_k² the sampler drew with
    variance_small: float  # β̃_k of the (respaced) chain
    timestep_span: tuple[int, int]  # original timesteps (τ_{k-1}, τ_k] this step covers
    span_precision: float  # Σ_{s in span} 1/σ_s² on the original chain, same variance kind as ``variance``
    span_precision_small: float  # Σ_{s in span} 1/β̃_s on the original chain


class Guidance:
    """Base class and protocol of a guidance method; on its own it is plain ancestral sampling."""

    # the predictions it combines, as diffusers' guiders declare ``_input_predictions``: "uncond" (ε_u) and
    # "forbidden" (one ε_c per forbidden class) for a class-conditional or pair model; "empty", "prompt" and
    # "negative" (the raw text branches ε_∅, ε_p, ε_n) for Stable Diffusion (``dng sd``)
    inputs: tuple[str, ...] = ("uncond", "forbidden")
    needs_update = False  # does the sampler call ``update`` after each step?
    tracks_posterior = False  # does ``posterior`` return p(c | x_t, …, x_T)?

    def start(self, x_T: torch.Tensor, num_classes: int) -> State:
        return {}

    def __call__(self, eps_u: torch.Tensor, eps_c: torch.Tensor | None, step: int, state: State):
        raise NotImplementedError

    def update(self, state: State, info: StepInfo) -> None:
        """Called after each noisy step when ``needs_update``; default: nothing to track."""

    def posterior(self, state: State) -> torch.Tensor | None:
        """p(c | x_t, …, x_T) per sample and forbidden class, [B, K]; None when not tracked."""
        return None

    def check_classes(self, num_classes: int) -> None:
        """Raise UserError when the method cannot guide away from ``num_classes`` classes at once."""


class NoGuidance(Guidance):
    """Plain ancestral sampling: ε̃ = ε_u."""

    inputs = ("uncond",)

    def __call__(self, eps_u: torch.Tensor, eps_c: torch.Tensor | None, step: int, state: State):
        return eps_u, eps_u.new_zeros(eps_u.shape[0])


class NegativePrompting(Guidance):
    """Negative Prompting with a constant scale (Ho & Salimans 2022; Liu et al. 2022, "Composable
    Diffusion", Eq. 13 with a negative weight):  ε̃ = ε_u - λ Σ_c (ε_c - ε_u).
    """

    def __init__(self, guidance_scale: float = 1.0):
        self.guidance_scale = _check_finite_nonneg("guidance_scale", guidance_scale)

    def __call__(self, eps_u, eps_c, step, state):
        eps = eps_u - self.guidance_scale * (eps_c - eps_u).sum(0)
        return eps, eps_u.new_full((eps_u.shape[0],), self.guidance_scale)


CCFG_TAU_DIMS = 4 * 64 * 64  # the SD-1.5 latent (4×64×64), on which CCFG's τ (0.2) is set


def _ccfg_weight(diff: torch.Tensor, sample_dims: int, tau: float, sign: float = -1.0) -> torch.Tensor:
    """2σ(sign·τ̂‖d‖²) per sample of d [..., *sample], ‖·‖² summed over the last ``sample_dims`` dims (a sample's
    values) and τ̂ = τ·16384/D for a D-value sample: CCFG's exponent at the same per-value scale on any shape
    (τ̂ = τ on SD latents)."""
    per_sample = diff.flatten(-sample_dims)
    tau_hat = tau * CCFG_TAU_DIMS / per_sample.shape[-1]
    return 2 * torch.sigmoid(sign * tau_hat * per_sample.pow(2).sum(-1))


class ContrastiveCFG(Guidance):
    """Contrastive CFG's negative guidance (Chang, Chung & Ye 2024, arXiv 2411.17077; the ``ddim_np_ccfg``
    solver of github.com/jinhojsk515/ContrastiveCFG):  ε̃ = ε_u − w Σ_c 2σ(−τ̂‖ε_c − ε_u‖²) (ε_c − ε_u).

    Per sample the NP direction is scaled by 2σ(−τ̂‖ε_c − ε_u‖²): ≈ w where the conditional and unconditional
    predictions agree (the sample looks like the class), → 0 where they differ. Their τ = 0.2 is set for a
    sum over 4×64×64 latent values; ``tau`` here is that τ, applied as τ̂ = τ·16384/D to a D-value sample (the
    same scale per value: τ̂ ≈ 4.18 on 1×28×28), so ``tau=0.2`` is their default on every shape."""

    def __init__(self, guidance_scale: float = 1.0, tau: float = 0.2):
        self.guidance_scale = _check_finite_nonneg("guidance_scale", guidance_scale)
        self.tau = _check_finite_nonneg("tau", tau)

    def __call__(self, eps_u, eps_c, step, state):
        diff = eps_c - eps_u  # [K, B, ...]
        weight = _ccfg_weight(diff, eps_u.dim() - 1, self.tau)  # [K, B]
        eps = eps_u - self.guidance_scale * (weight.view(*weight.shape, *([1] * (eps_u.dim() - 1))) * diff).sum(0)
        return eps, self.guidance_scale * weight.sum(0)


class SafeLatentDiffusion(Guidance):
    """Safe Latent Diffusion (Schramowski et al., CVPR 2023, Eqs. 3-8), as diffusers'
    ``StableDiffusionPipelineSafe`` with the prompt taken as the unconditional prediction:

        d = ε_u - ε_c;   m = where(d < threshold, min(scale·|d|, 1), 0)            # Eq. 6
        γ = m ⊙ (ε_c - ε_u) + momentum_scale · ν                                   # Eqs. 4, 7
        ν ← momentum_beta · ν + (1 - momentum_beta) · γ        (every step)        # Eq. 8
        ε̃ = ε_u - λ Σ_c γ_c      once step index ≥ warmup_steps, else ε_u           # Eq. 3

    The reported effective scale is λ times the mean of the element-wise mask m (0 during warm-up).
    Momentum and warm-up count sampling steps, as in diffusers: ν's memory spans 1/(1 - β_m) steps,
    so at 50 steps it reaches 20x further back in diffusion time than at 1000.
    """

    def __init__(self, guidance_scale: float = 1.0, threshold: float = 0.04, scale: float = 100.0,
                 momentum_scale: float = 0.2, momentum_beta: float = 0.1, warmup_steps: int = 0):
        self.guidance_scale = _check_finite_nonneg("guidance_scale", guidance_scale)
        self.threshold = _number("threshold", threshold)
        self.scale = _check_finite_nonneg("scale", scale)
        self.momentum_scale = _check_finite_nonneg("momentum_scale", momentum_scale)
        momentum_beta = _number("momentum_beta", momentum_beta)
        if not 0.0 <= momentum_beta < 1.0:
            raise UserError(f"momentum_beta={momentum_beta} is invalid: it must lie in [0, 1)")
        self.momentum_beta = float(momentum_beta)
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
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


class DynamicNegativeGuidance(Guidance):
    """Dynamic Negative Guidance (Koulischer et al., ICLR 2025, Eqs. 9-12 and Alg. 1):

        ε̃ = ε_u - λ Σ_c p_c / (1 - Σ_c p_c) · (ε_c - ε_u),
        p_c = p(c | x_t, …, x_T), tracked along the reverse chain from p_c = prior:
        log p_c ← clip( log p_c + Σ_{s ∈ span} offset/(2σ_s²) - temperature · (‖x' - μ_c‖² - ‖x' - μ_u‖²)/(2σ²),
                        log p_min, log p_max ),
        μ_u = μ(ε_u), μ_c = μ(ε_c) the UNguided means of the step just taken, x' its result.

    ``offset`` is a drift rate per ORIGINAL timestep: a respaced step adds offset/(2σ_s²) for every
    original timestep s it spans (σ_s² of the original chain), so its total drift is the same at
    every step count; at K = T steps this is the official code's per-step offset/(2σ²).
    The posterior lives in log space, so it stays finite for any scale. ``1 - Σ p`` is floored at
    ``1 - p_max`` (only reachable with several classes). σ² is the variance the sampler draws with
    (``update_variance="sampled"``); ``update_variance="small"`` uses β̃ whatever the sampler draws
    with — with ``sampler.variance=large`` and ``offset=0`` that is the official implementation's
    convention (github.com/FelixKoulischer/Dynamic-Negative-Guidance).
    Static limit: temperature = offset = 0 is NP with scale λ·prior/(1-prior).
    ``guidance_scale=0`` tracks the posterior without guiding: a pure detector run.

    ``hold`` (a variant, not the paper's method; ``method=dng_hold``): once a class's tracked posterior has
    reached ``hold``, the guidance weight uses the running maximum of that posterior instead of its current
    value, so a sample detected mid-chain stays guided through the late steps where the learned model's
    posterior decays (docs/method.md). The tracked posterior itself, and every diagnostic, are unchanged;
    ``hold=None`` (the default) is the paper's update exactly.
    """

    needs_update = True
    tracks_posterior = True

    def __init__(self, guidance_scale: float = 10.0, prior: float = 0.1, temperature: float = 1.0,
                 offset: float = 0.0, p_min: float = 1e-6, p_max: float = 0.99,
                 update_variance: str = "sampled", hold: float | None = None):
        self.guidance_scale = _check_finite_nonneg("guidance_scale", guidance_scale)
        prior, offset, p_min, p_max = (_number(n, v) for n, v in
                                       (("prior", prior), ("offset", offset), ("p_min", p_min), ("p_max", p_max)))
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
        self.prior, self.offset, self.p_min, self.p_max = prior, offset, p_min, p_max
        self.update_variance = update_variance
        if hold is not None:
            hold = _number("hold", hold)
            if not prior < hold <= p_max:
                raise UserError(f"hold={hold} is invalid: it must satisfy prior={prior} < hold <= p_max={p_max} "
                                f"(or be null: no hold)")
        self.hold = hold

    def check_classes(self, num_classes: int) -> None:
        """The priors of all forbidden classes together must stay below p_max (they share 1 - Σp)."""
        if num_classes > 1 and num_classes * self.prior >= self.p_max:
            raise UserError(f"prior={self.prior} is invalid with {num_classes} forbidden classes: "
                            f"{num_classes} x prior must be < p_max={self.p_max}")

    def start(self, x_T, num_classes):
        self.check_classes(num_classes)
        state = {"log_posterior": x_T.new_full((x_T.shape[0], num_classes), math.log(self.prior))}
        if self.hold is not None:
            state["log_posterior_max"] = state["log_posterior"].clone()  # running max of the tracked posterior
        return state

    def guided_log_posterior(self, state) -> torch.Tensor:
        """The log posterior the weights use: the tracked one, or with ``hold`` its running maximum for every
        class whose maximum has reached ``hold``."""
        log_p = state["log_posterior"]
        if self.hold is None:
            return log_p
        held = state["log_posterior_max"]
        return torch.where(held >= math.log(self.hold), held, log_p)

    def posterior(self, state):
        return state["log_posterior"].exp()

    def weights(self, log_posterior: torch.Tensor) -> torch.Tensor:
        """Per-class scales λ p_c / (1 - Σ p), [B, K]."""
        p = log_posterior.exp()
        return self.guidance_scale * p / (1.0 - p.sum(-1, keepdim=True)).clamp_(min=1.0 - self.p_max)

    def __call__(self, eps_u, eps_c, step, state):
        w = self.weights(self.guided_log_posterior(state))  # [B, K]
        w_b = w.t().reshape(*w.t().shape, *([1] * (eps_u.dim() - 1)))  # [K, B, 1, ...]
        eps = eps_u - (w_b * (eps_c - eps_u)).sum(0)  # Eq. 12
        return eps, w.sum(-1)

    def update(self, state: State, info: StepInfo) -> None:
        """Bayes update of log p_c with the Gaussian transition ratio N(x'; μ_c, σ²) / N(x'; μ_u, σ²)."""
        small = self.update_variance == "small"
        variance = info.variance_small if small else info.variance
        drift = 0.5 * self.offset * (info.span_precision_small if small else info.span_precision)
        r = info.x_next - info.mu_u
        delta = info.mu_c - info.mu_u  # [K, B, ...]
        # ‖x' - μ_c‖² - ‖x' - μ_u‖² = ‖δ‖² - 2⟨x' - μ_u, δ⟩
        sq = (delta * (delta - 2 * r)).flatten(2).sum(-1).t()  # [B, K]
        increment = drift - self.temperature * sq / (2.0 * variance)
        increment = torch.nan_to_num(increment, nan=0.0, posinf=1e30, neginf=-1e30)
        state["log_posterior"] = (state["log_posterior"] + increment).clamp_(math.log(self.p_min), math.log(self.p_max))
        if self.hold is not None:
            state["log_posterior_max"] = torch.maximum(state["log_posterior_max"], state["log_posterior"])


def _number(name: str, value) -> float:
    if isinstance(value, bool):
        raise UserError(f"{name}={value!r} is invalid: it must be a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name}={value!r} is invalid: it must be a number") from None


def _check_finite_nonneg(name: str, value: float) -> float:
    value = _number(name, value)
    if not (math.isfinite(value) and value >= 0):
        raise UserError(f"{name}={value} is invalid: it must be a finite number >= 0")
    return value


class _PromptBranches(Guidance):
    """Text-to-image methods defined on the raw branches ε_∅ (empty prompt), ε_p (prompt) and ε_n
    (negative prompt / safety concept) with the classifier-free scale w, as diffusers' pipelines are."""

    inputs = ("empty", "prompt", "negative")  # the sampler's eps_u = ε_∅, eps_c = [ε_p, ε_n]

    def __init__(self, cfg_scale: float = 7.5):
        self.cfg_scale = _check_finite_nonneg("cfg_scale", cfg_scale)

    def check_classes(self, num_classes: int) -> None:
        if num_classes != 1:
            raise UserError(f"{type(self).__name__} removes one concept (the negative prompt), not {num_classes}")


class ReplacedNegativePrompt(_PromptBranches):
    """What Stable Diffusion users call a negative prompt (diffusers' ``negative_prompt``): the
    negative prompt REPLACES the unconditional branch, ε̃ = ε_n + w (ε_p - ε_n); w ≤ 1: ε̃ = ε_p.
    The DNG paper's NP instead keeps ε_∅ and pushes from a third branch (``NegativePrompting``)."""

    def __call__(self, eps_u, eps_c, step, state):
        eps_p, eps_n = eps_c[0], eps_c[1]
        w = self.cfg_scale
        eps = eps_n + w * (eps_p - eps_n) if w > 1.0 else eps_p
        return eps, eps_p.new_full((eps_p.shape[0],), w)


class ContrastiveCFGPrompt(_PromptBranches):
    """Contrastive CFG on the raw text branches, as their ``ddim_np_ccfg`` solver (``dng sd`` only): the prompt
    with CCFG's positive term w·2σ(+τ̂‖ε_p − ε_∅‖²)(ε_p − ε_∅) (``naive_positive``: plain CFG w(ε_p − ε_∅)), the
    negative prompt with its negative term −w·2σ(−τ̂‖ε_n − ε_∅‖²)(ε_n − ε_∅)."""

    def __init__(self, cfg_scale: float = 7.5, tau: float = 0.2, naive_positive: bool = False):
        super().__init__(cfg_scale)
        self.tau = _check_finite_nonneg("tau", tau)
        self.naive_positive = bool(naive_positive)

    def __call__(self, eps_u, eps_c, step, state):
        eps_p, eps_n = eps_c[0], eps_c[1]
        w, shape = self.cfg_scale, (-1, *([1] * (eps_u.dim() - 1)))
        pos = torch.ones(eps_u.shape[0], dtype=eps_u.dtype, device=eps_u.device) if self.naive_positive \
            else _ccfg_weight(eps_p - eps_u, eps_u.dim() - 1, self.tau, +1.0)
        neg = _ccfg_weight(eps_n - eps_u, eps_u.dim() - 1, self.tau)
        eps = eps_u + w * pos.view(shape) * (eps_p - eps_u) - w * neg.view(shape) * (eps_n - eps_u)
        return eps, w * neg


class DiffusersSafeLatentDiffusion(_PromptBranches):
    """Safe Latent Diffusion exactly as diffusers' ``StableDiffusionPipelineSafe`` (its "perform
    guidance" block), with ε_s the safety concept (our negative prompt):

        m = where(ε_p - ε_s ≥ sld_threshold, 0, min(|ε_p - ε_s| · sld_guidance_scale, 1))
        γ = m ⊙ (ε_s - ε_∅) + sld_momentum_scale · ν;   ν ← sld_mom_beta · ν + (1 - sld_mom_beta) · γ
        ε̃ = ε_∅ + w ((ε_p - ε_∅) - γ)    from step sld_warmup_steps on (before: plain CFG)

    The safety term is scaled by the CFG scale w. Safety guidance is on only when
    sld_guidance_scale > 1 and w > 1 (diffusers' rule); w ≤ 1 samples ε_p alone. Presets:
    configs/method/sld_{weak,medium,strong,max}.yaml = diffusers' ``SafetyConfig``. The reported
    effective scale is w times the mean of m (0 during warm-up)."""

    def __init__(self, sld_guidance_scale: float = 1000.0, sld_warmup_steps: int = 10, sld_threshold: float = 0.01,
                 sld_momentum_scale: float = 0.3, sld_mom_beta: float = 0.4, cfg_scale: float = 7.5):
        super().__init__(cfg_scale)
        self.sld_guidance_scale = _check_finite_nonneg("sld_guidance_scale", sld_guidance_scale)
        if isinstance(sld_warmup_steps, bool) or not isinstance(sld_warmup_steps, int) or sld_warmup_steps < 0:
            raise UserError(f"sld_warmup_steps={sld_warmup_steps} is invalid: it must be a non-negative integer")
        self.sld_warmup_steps = sld_warmup_steps
        self.sld_threshold = _number("sld_threshold", sld_threshold)
        self.sld_momentum_scale = _check_finite_nonneg("sld_momentum_scale", sld_momentum_scale)
        self.sld_mom_beta = _number("sld_mom_beta", sld_mom_beta)
        if not 0.0 <= self.sld_mom_beta < 1.0:
            raise UserError(f"sld_mom_beta={sld_mom_beta} is invalid: it must lie in [0, 1)")

    def start(self, x_T, num_classes):
        return {"momentum": torch.zeros_like(x_T)}

    def __call__(self, eps_u, eps_c, step, state):
        eps_0, eps_p, eps_s = eps_u, eps_c[0], eps_c[1]
        w = self.cfg_scale
        zero = eps_0.new_zeros(eps_0.shape[0])
        if w <= 1.0:
            return eps_p, zero
        guidance = eps_p - eps_0
        if self.sld_guidance_scale <= 1.0:
            return eps_0 + w * guidance, zero
        d = eps_p - eps_s
        scale = torch.clamp(d.abs() * self.sld_guidance_scale, max=1.0)
        mask = torch.where(d >= self.sld_threshold, torch.zeros_like(scale), scale)
        gamma = mask * (eps_s - eps_0) + self.sld_momentum_scale * state["momentum"]
        state["momentum"] = self.sld_mom_beta * state["momentum"] + (1 - self.sld_mom_beta) * gamma
        if step < self.sld_warmup_steps:
            return eps_0 + w * guidance, zero
        return eps_0 + w * (guidance - gamma), w * mask.flatten(1).mean(-1)


METHODS = {
    "none": NoGuidance,
    "np": NegativePrompting,
    "sld": SafeLatentDiffusion,
    "dng": DynamicNegativeGuidance,
    "ccfg": ContrastiveCFG,
    "ccfg_sd": ContrastiveCFGPrompt,  # dng sd only
    "negative_prompt": ReplacedNegativePrompt,  # dng sd only
    "sld_diffusers": DiffusersSafeLatentDiffusion,  # dng sd only
}


def _plain(value):
    """A method config's value as plain Python (mappings -> dict, sequences -> list), whatever container holds it."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(v) for v in value]
    return value


def build_guidance(method: Mapping):
    """The guidance object of a method mapping ({"name": …, its settings}): ``METHODS[name](**settings)``."""
    name = method.get("name")
    if name not in METHODS:
        raise UserError(f"method={name!r} is unknown: allowed are {', '.join(METHODS)}")
    kwargs = {k: _plain(v) for k, v in method.items() if k != "name"}
    try:
        return METHODS[name](**kwargs)
    except TypeError as err:
        raise UserError(f"method {name}: {err}") from None
