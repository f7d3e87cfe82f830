"""Stable Diffusion XL's modular blocks with a negative concept (docs/diffusers.md), for the guiders of
``dng_cli.guiders`` (importable from there too): diffusers' stock loop denoiser hands a guider (cond, uncond) pairs;
DNG, NP and SLD also need the negative concept's prediction, and DNG the latents each step starts from. These blocks
add both and are otherwise SDXL's own."""

from __future__ import annotations

import torch
from diffusers.modular_pipelines import SequentialPipelineBlocks
from diffusers.modular_pipelines.modular_pipeline_utils import InputParam, OutputParam
from diffusers.modular_pipelines.stable_diffusion_xl.before_denoise import StableDiffusionXLInputStep
from diffusers.modular_pipelines.stable_diffusion_xl.decoders import StableDiffusionXLDecodeStep
from diffusers.modular_pipelines.stable_diffusion_xl.denoise import (
    StableDiffusionXLDenoiseLoopWrapper,
    StableDiffusionXLLoopAfterDenoiser,
    StableDiffusionXLLoopBeforeDenoiser,
    StableDiffusionXLLoopDenoiser,
)
from diffusers.modular_pipelines.stable_diffusion_xl.encoders import StableDiffusionXLTextEncoderStep
from diffusers.modular_pipelines.stable_diffusion_xl.modular_blocks_stable_diffusion_xl import (
    StableDiffusionXLBeforeDenoiseStep,
)

_CONCEPT_INPUTS = ("concept_prompt_embeds", "concept_pooled_prompt_embeds", "concept_add_time_ids")


class NegativeConceptTextEncoderStep(StableDiffusionXLTextEncoderStep):
    """Encodes ``negative_concept`` (the class or concept to steer away from) with the pipeline's text encoders, as
    SDXL encodes its prompt: ``concept_prompt_embeds`` and ``concept_pooled_prompt_embeds``, one row per concept."""

    @property
    def description(self) -> str:
        return "Text encoder step for the negative concept of DNG, NP or SLD (dng_cli.guiders)"

    @property
    def inputs(self) -> list[InputParam]:
        return [InputParam("negative_concept", required=True, type_hint=str,
                           description="the class or concept to remove, e.g. 'a dog'"),
                InputParam("clip_skip")]

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        return [OutputParam("concept_prompt_embeds", type_hint=torch.Tensor),
                OutputParam("concept_pooled_prompt_embeds", type_hint=torch.Tensor)]

    @torch.no_grad()
    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        embeds, _, pooled, _ = self.encode_prompt(components, block_state.negative_concept, None,
                                                  components._execution_device, 1, False,
                                                  clip_skip=block_state.clip_skip)
        block_state.concept_prompt_embeds, block_state.concept_pooled_prompt_embeds = embeds, pooled
        self.set_block_state(state, block_state)
        return components, state


class NegativeConceptLoopDenoiser(StableDiffusionXLLoopDenoiser):
    """SDXL's loop denoiser with the negative concept as a third input: each guider input is a (cond, uncond,
    negative) tuple (a stock two-prediction guider reads the first two, as before), and a guider with ``observe``
    (DNG) sees the latents of each step before the denoiser runs. The concept's embeddings (one row, or one per
    sample) are repeated to the batch; its time ids default to the prompt's."""

    @property
    def inputs(self) -> list[InputParam]:
        names = ("latents", "prompt_embeds", "negative_prompt_embeds", "add_time_ids", "negative_add_time_ids",
                 "pooled_prompt_embeds", "negative_pooled_prompt_embeds", "ip_adapter_embeds",
                 "negative_ip_adapter_embeds", *_CONCEPT_INPUTS)
        return [*super().inputs, *(InputParam(n) for n in names)]

    @torch.no_grad()
    def __call__(self, components, block_state, i: int, t):
        s, guider = block_state, components.guider
        batch = s.prompt_embeds.shape[0]
        concept = {n: _to_batch(getattr(s, n, None), batch, n) for n in _CONCEPT_INPUTS}
        if concept["concept_prompt_embeds"] is None and _asks_negative(guider):
            raise ValueError(f"{type(guider).__name__} needs the negative concept: add NegativeConceptTextEncoderStep"
                             " (input negative_concept) or pass concept_prompt_embeds")
        guider_inputs = {
            "prompt_embeds": (s.prompt_embeds, s.negative_prompt_embeds, concept["concept_prompt_embeds"]),
            "time_ids": (s.add_time_ids, s.negative_add_time_ids,
                         concept["concept_add_time_ids"] if concept["concept_add_time_ids"] is not None
                         else s.add_time_ids),
            "text_embeds": (s.pooled_prompt_embeds, s.negative_pooled_prompt_embeds,
                            concept["concept_pooled_prompt_embeds"]),
            "image_embeds": (s.ip_adapter_embeds, s.negative_ip_adapter_embeds, s.negative_ip_adapter_embeds),
        }
        guider.set_state(step=i, num_inference_steps=s.num_inference_steps, timestep=t)
        if hasattr(guider, "observe"):
            guider.observe(s.latents, components.scheduler)
        batches = guider.prepare_inputs(guider_inputs)
        for b in batches:
            guider.prepare_models(components.unet)
            kwargs = {name: getattr(b, name) for name in guider_inputs}
            embeds = kwargs.pop("prompt_embeds")
            added = {k: v for k, v in kwargs.items() if v is not None}
            b.noise_pred = components.unet(s.scaled_latents, t, encoder_hidden_states=embeds,
                                           timestep_cond=s.timestep_cond, cross_attention_kwargs=s.cross_attention_kwargs,
                                           added_cond_kwargs=added or None, return_dict=False)[0]
            guider.cleanup_models(components.unet)
        s.noise_pred = guider(batches)[0]
        return components, s


def _asks_negative(guider) -> bool:
    return "pred_negative" in getattr(guider, "_input_predictions", ())


def _to_batch(x: torch.Tensor | None, batch: int, name: str) -> torch.Tensor | None:
    if x is None or x.shape[0] == batch:
        return x
    if x.shape[0] != 1:
        raise ValueError(f"{name} has {x.shape[0]} rows; give one (for every sample) or one per sample ({batch})")
    return x.expand(batch, *x.shape[1:])


class NegativeConceptDenoiseStep(StableDiffusionXLDenoiseLoopWrapper):
    """SDXL's denoise loop (text-to-image and image-to-image) with ``NegativeConceptLoopDenoiser`` in the middle."""

    block_classes = [StableDiffusionXLLoopBeforeDenoiser, NegativeConceptLoopDenoiser,
                     StableDiffusionXLLoopAfterDenoiser]
    block_names = ["before_denoiser", "denoiser", "after_denoiser"]

    @property
    def description(self) -> str:
        return "SDXL's denoise loop, its guider fed (cond, uncond, negative concept) and the latents (dng_cli.guiders)"


class NegativeConceptSDXLBlocks(SequentialPipelineBlocks):
    """Stable Diffusion XL text-to-image with a negative concept: SDXL's own blocks plus
    ``NegativeConceptTextEncoderStep`` and ``NegativeConceptDenoiseStep``. Inputs as SDXL's (``prompt``,
    ``num_inference_steps``, ``generator``, …) plus ``negative_concept``; the guider decides the method."""

    block_classes = [StableDiffusionXLTextEncoderStep, NegativeConceptTextEncoderStep, StableDiffusionXLInputStep,
                     StableDiffusionXLBeforeDenoiseStep, NegativeConceptDenoiseStep, StableDiffusionXLDecodeStep]
    block_names = ["text_encoder", "concept_text_encoder", "input", "before_denoise", "denoise", "decode"]

    @property
    def description(self) -> str:
        return "SDXL text-to-image with DNG, NP or SLD away from a negative concept (dng_cli.guiders)"
