"""Dynamic Negative Guidance (and Negative Prompting, ``NegativePromptGuidance``, and Safe Latent Diffusion,
``SafeLatentGuidance``) as diffusers guiders (``diffusers.guiders.BaseGuidance``), for modular pipelines and any
loop that follows the guiders protocol; ``NegativeConceptSDXLBlocks`` / ``NegativeConceptDenoiseStep`` are SDXL's
modular blocks with the negative concept as a third input (docs/diffusers.md). Importable without Hydra::

    from dng_cli.guiders import DynamicNegativeGuidance

    guider = DynamicNegativeGuidance(guidance_scale=10.0, prior=0.1)   # settings as configs/method/dng.yaml
    for i, t in enumerate(scheduler.timesteps):
        guider.set_state(i, len(scheduler.timesteps), t)
        guider.observe(latents, scheduler)          # the latents this step starts from: the posterior update
        batches = guider.prepare_inputs({"class_labels": (None, null_labels, forbidden_labels)})
        for b in batches:                            # one denoiser call per prediction the guider asks for
            b.noise_pred = unet(latents, t, class_labels=b.class_labels).sample
        noise_pred = guider(batches).pred
        latents = scheduler.step(noise_pred, t, latents, generator=generator).prev_sample

The predictions (``_input_predictions``): ``pred_uncond`` (ε_u), ``pred_negative`` (ε_c, the forbidden class or
concept) and, with ``cfg_scale`` set (text-to-image), ``pred_cond`` (the prompt): then ε_u is the classifier-free
prediction ε_∅ + w (ε_p − ε_∅), as ``dng sd`` and the paper's Stable Diffusion experiments use. A data tuple is
(cond, uncond, negative), so a loop block passes a third input beside diffusers' (cond, uncond) pairs.

DNG (Koulischer et al., ICLR 2025) guides with ε̃ = ε_u − λ p/(1 − p) (ε_c − ε_u), where p = p(c | x_t, …, x_T) is
tracked along the chain: after each step x_t → x' the guider updates log p with the Gaussian transition ratio
N(x'; μ_c, σ²)/N(x'; μ_u, σ²) of the UNguided means of that step, exactly as ``dng_cli.guidance``
(same clamping, same ``offset`` per original timestep). In a diffusers loop it sees x' only when the next step
starts, so the update runs in ``observe`` from the means it stored in ``forward``; ``posterior`` and ``scale``
hold p and λ_t per sample after each call (diagnostics). The chain's coefficients come from the scheduler's
config (β schedule, ``variance_type``: a DDPM-type ancestral sampler) and its ``timesteps``, through the
sampler's own ``NoiseSchedule``, once per chain.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput

from dng_cli.guidance import DynamicNegativeGuidance as _DNG
from dng_cli.guidance import NegativePrompting as _NP
from dng_cli.guidance import SafeLatentDiffusion as _SLD
from dng_cli.guidance import StepInfo
from dng_cli.schedule import NoiseSchedule


class _MethodGuider(BaseGuidance):
    """A ``dng_cli.guidance`` method as a guider: the predictions (cond, uncond, negative), the classifier-free ε_u
    with ``cfg_scale``, and diffusers' start/stop/enabled."""

    _input_predictions = ["pred_cond", "pred_uncond", "pred_negative"]

    def __init__(self, cfg_scale: float | None, start: float, stop: float, enabled: bool):
        super().__init__(start, stop, enabled)
        self.cfg_scale = cfg_scale
        self.scale = None  # λ_t per sample of the latest ``forward``, [B]

    @property
    def num_conditions(self) -> int:
        return 3 if self.cfg_scale is not None else 2

    @property
    def is_conditional(self) -> bool:
        return self._count_prepared == 1

    def _predictions(self) -> list[tuple[int, str]]:
        named = list(enumerate(self._input_predictions))
        return named if self.cfg_scale is not None else named[1:]

    def prepare_inputs(self, data: dict) -> list:
        """One batch per prediction: a data tuple is (cond, uncond, negative); a tensor goes to every batch."""
        return [self._prepare_batch(data, index, name) for index, name in self._predictions()]

    def prepare_inputs_from_block_state(self, data, input_fields: dict) -> list:
        return [self._prepare_batch_from_block_state(input_fields, data, index, name)
                for index, name in self._predictions()]

    def _guiding(self) -> bool:
        if not self._enabled:
            return False
        if self._num_inference_steps is None:
            return True
        return int(self._start * self._num_inference_steps) <= self._step < int(self._stop * self._num_inference_steps)

    def _unconditional(self, pred_uncond, pred_cond):
        return pred_uncond if self.cfg_scale is None else pred_uncond + self.cfg_scale * (pred_cond - pred_uncond)

    def _guide(self, eps_u, pred_negative, pred_cond, state, always: bool = False) -> GuiderOutput:
        """The method's ε̃ where it guides (enabled, in [start, stop)), else ε_u with scale 0; ``always``: the
        method runs every step (SLD's momentum), its output used only where it guides."""
        guiding = self._guiding()
        if guiding or always:
            pred, scale = self.method(eps_u, pred_negative.unsqueeze(0), self._step or 0, state)
        if not guiding:
            pred, scale = eps_u, eps_u.new_zeros(eps_u.shape[0])
        self.scale = scale
        return GuiderOutput(pred=pred, pred_cond=pred_cond if pred_cond is not None else pred_negative,
                            pred_uncond=eps_u)


class DynamicNegativeGuidance(_MethodGuider):
    """DNG as a guider; settings as ``dng_cli.guidance.DynamicNegativeGuidance`` (λ ``guidance_scale``, ``prior``,
    ``temperature``, ``offset`` per original timestep, ``p_min``/``p_max``, ``update_variance``), plus
    ``cfg_scale`` (None: no prompt branch, class-conditional models) and diffusers' ``start``/``stop``/``enabled``
    (outside [start, stop) of the steps: no negative guidance, the posterior is still tracked)."""

    @register_to_config
    def __init__(self, guidance_scale: float = 10.0, prior: float = 0.1, temperature: float = 1.0, offset: float = 0.0,
                 p_min: float = 1e-6, p_max: float = 0.99, update_variance: str = "sampled",
                 cfg_scale: float | None = None, start: float = 0.0, stop: float = 1.0, enabled: bool = True):
        super().__init__(cfg_scale, start, stop, enabled)
        self.method = _DNG(guidance_scale=guidance_scale, prior=prior, temperature=temperature, offset=offset,
                           p_min=p_min, p_max=p_max, update_variance=update_variance)
        self.reset()

    def reset(self) -> None:
        """Forget the tracked posterior: the next ``observe`` starts a new chain at the prior."""
        self._chain = None      # {"log_posterior": [B, 1]} of the chain being sampled
        self._last = None       # what the step just taken needs for the update: x_t, ε_u, ε_c, its coefficients
        self._coefficients = None  # per timestep of the chain: its step's coefficients (``_chain_coefficients``)
        self.posterior = None   # p per sample after the latest update, [B]
        self.scale = None

    # --------------------------------------------------------------------------------- the posterior
    def observe(self, latents: torch.Tensor, scheduler) -> None:
        """The latents x this step starts from: at the first step the posterior starts at the prior, later it is
        updated with the step that led to x (its unguided means, stored by ``forward``). Call it after
        ``set_state`` and before the denoiser runs. ``scheduler``: the one stepping the chain (its chain and
        timesteps give μ and σ² of each step)."""
        if self._chain is None or self._step == 0:
            self._chain = self.method.start(latents, 1)
            self._coefficients = _chain_coefficients(scheduler)  # once per chain, not per step
            self._last = None
        elif self._last is not None:
            x_t, eps_u, eps_c, coef = self._last
            mu_u = (x_t - coef["c_eps"] * eps_u) * coef["c_x"]
            mu_c = (x_t - coef["c_eps"] * eps_c) * coef["c_x"]
            self.method.update(self._chain, StepInfo(latents, mu_u, mu_c.unsqueeze(0), coef["variance"],
                                                     coef["variance_small"], coef["span"], coef["precision"],
                                                     coef["precision_small"]))
            self._last = None
        self._latents = latents
        self.posterior = self.method.posterior(self._chain)[:, 0]

    def forward(self, pred_uncond: torch.Tensor, pred_negative: torch.Tensor,
                pred_cond: torch.Tensor | None = None) -> GuiderOutput:
        if self._chain is None:
            raise RuntimeError("DynamicNegativeGuidance needs guider.observe(latents, scheduler) at every step, "
                               "before the denoiser runs: it tracks the posterior on the latents")
        eps_u = self._unconditional(pred_uncond, pred_cond)
        self._last = (self._latents, eps_u, pred_negative, self._coefficients[int(self._timestep)])
        return self._guide(eps_u, pred_negative, pred_cond, self._chain)


class NegativePromptGuidance(_MethodGuider):
    """Negative Prompting with a constant scale, ε̃ = ε_u − λ (ε_n − ε_u), as ``dng_cli.guidance.NegativePrompting``.
    Without ``cfg_scale`` (class-conditional) it equals diffusers' ``ClassifierFreeGuidance(guidance_scale=1 + λ)``
    fed (null, forbidden); with a prompt (``cfg_scale``: ε_u = ε_∅ + w (ε_p − ε_∅)) it needs the three predictions,
    which no stock guider combines this way (diffusers' ``negative_prompt`` *replaces* ε_∅ by ε_n)."""

    @register_to_config
    def __init__(self, guidance_scale: float = 1.0, cfg_scale: float | None = None, start: float = 0.0,
                 stop: float = 1.0, enabled: bool = True):
        super().__init__(cfg_scale, start, stop, enabled)
        self.method = _NP(guidance_scale=guidance_scale)

    def forward(self, pred_uncond: torch.Tensor, pred_negative: torch.Tensor,
                pred_cond: torch.Tensor | None = None) -> GuiderOutput:
        return self._guide(self._unconditional(pred_uncond, pred_cond), pred_negative, pred_cond, None)


class SafeLatentGuidance(_MethodGuider):
    """Safe Latent Diffusion (Schramowski et al., CVPR 2023) as a guider, as ``dng_cli.guidance.SafeLatentDiffusion``
    (``guidance_scale`` λ, ``threshold``, ``scale``, ``momentum_scale``, ``momentum_beta``, ``warmup_steps``) and
    diffusers' deprecated ``StableDiffusionPipelineSafe``; ``cfg_scale`` as for DNG. Its momentum is kept across
    the steps of a chain (reset at step 0); outside [start, stop) it is still updated, the guidance not applied."""

    @register_to_config
    def __init__(self, guidance_scale: float = 1.0, threshold: float = 0.04, scale: float = 100.0,
                 momentum_scale: float = 0.2, momentum_beta: float = 0.1, warmup_steps: int = 0,
                 cfg_scale: float | None = None, start: float = 0.0, stop: float = 1.0, enabled: bool = True):
        super().__init__(cfg_scale, start, stop, enabled)
        self.method = _SLD(guidance_scale=guidance_scale, threshold=threshold, scale=scale,
                           momentum_scale=momentum_scale, momentum_beta=momentum_beta, warmup_steps=warmup_steps)
        self._state = None

    def forward(self, pred_uncond: torch.Tensor, pred_negative: torch.Tensor,
                pred_cond: torch.Tensor | None = None) -> GuiderOutput:
        eps_u = self._unconditional(pred_uncond, pred_cond)
        if self._state is None or self._step == 0:
            self._state = self.method.start(eps_u, 1)
        return self._guide(eps_u, pred_negative, pred_cond, self._state, always=True)


def _chain_coefficients(scheduler) -> dict[int, dict]:
    """Per timestep of the scheduler's chain: μ(ε) = (x − c_eps ε) c_x of the DDPM step to its previous timestep,
    the variances (σ² as the scheduler draws with, β̃), the original timesteps it spans and their summed
    precisions — from the sampler's own ``NoiseSchedule`` of the scheduler's config at its timesteps."""
    kind = "large" if str(getattr(scheduler.config, "variance_type", "fixed_small")) == "fixed_large" else "small"
    chain = NoiseSchedule.from_scheduler(scheduler).keep(sorted(int(t) for t in scheduler.timesteps))
    betas, abar = chain.betas.tolist(), chain.alphas_cumprod.tolist()
    var, var_small = chain.variances(kind).tolist(), chain.variances("small").tolist()
    prec, prec_small = chain.span_precision(kind).tolist(), chain.span_precision("small").tolist()
    return {t: {"c_x": (1.0 - betas[k]) ** -0.5, "c_eps": betas[k] / (1.0 - abar[k]) ** 0.5, "variance": var[k],
                "variance_small": var_small[k], "span": span, "precision": prec[k], "precision_small": prec_small[k]}
            for k, (t, span) in enumerate(zip(chain.timesteps.tolist(), chain.timestep_spans()))}


_BLOCKS = ("NegativeConceptTextEncoderStep", "NegativeConceptLoopDenoiser", "NegativeConceptDenoiseStep",
           "NegativeConceptSDXLBlocks")


def __getattr__(name: str):
    """The modular-pipeline blocks (dng_cli.modular_blocks) load on first use: diffusers' pipeline machinery costs
    ≈ 1.8 s to import, which a guider alone does not need."""
    if name in _BLOCKS:
        from dng_cli import modular_blocks

        return getattr(modular_blocks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
