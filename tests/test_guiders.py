"""DNG as a diffusers guider (dng_cli.guiders): inside a loop that follows diffusers' guiders protocol, with
diffusers' own DDPMScheduler stepping the chain, it gives the samples and the posterior of dng_cli's sampler."""

import json

import pytest
import torch

from dng_cli import guidance
from dng_cli.guiders import DynamicNegativeGuidance, NegativePromptGuidance, SafeLatentGuidance
from dng_cli.models import ClassConditionalEps, load_ddpm
from dng_cli.sampler import randn, sample
from dng_cli.schedule import NoiseSchedule
from dng_cli.spec import resolve

SEEDS, STEPS, FORBIDDEN = [0, 1, 2, 3], 10, 0
SETTINGS = dict(guidance_scale=10.0, prior=0.1, temperature=1.0, offset=0.0, p_min=1e-6, p_max=0.99)


@pytest.fixture(scope="module")
def mnist():
    unet = load_ddpm("mnist")
    conf = json.loads((resolve("mnist", "ddpm") / "scheduler_config.json").read_text())
    return unet, conf


def ours(unet, conf, settings, steps=STEPS):
    schedule = NoiseSchedule.from_scheduler(conf).respace(steps)
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    x_T = randn((len(SEEDS), 1, 28, 28), gens)
    with torch.inference_mode():
        out = sample(ClassConditionalEps(unet, [FORBIDDEN]), schedule, guidance.DynamicNegativeGuidance(**settings),
                     x_T, generator=gens, progress=False)
    return out, schedule


def diffusers_loop(unet, conf, guider, timesteps, labels=None):
    """The guiders protocol as diffusers' modular denoise loops run it, plus ``observe`` (the latents) for DNG;
    ``labels``: the data tuple of class labels (default: DNG's (None, null, forbidden))."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(conf)
    scheduler.set_timesteps(timesteps=timesteps)
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    latents = randn((len(SEEDS), 1, 28, 28), gens)
    null = torch.full((len(SEEDS),), 10)
    forbidden = torch.full((len(SEEDS),), FORBIDDEN)
    posteriors = []
    with torch.inference_mode():
        for i, t in enumerate(scheduler.timesteps):
            guider.set_state(i, len(scheduler.timesteps), t)
            if hasattr(guider, "observe"):
                guider.observe(latents, scheduler)
                if i > 0:
                    posteriors.append(guider.posterior.clone())
            batches = guider.prepare_inputs({"class_labels": labels(null, forbidden) if labels else (None, null, forbidden)})
            for b in batches:
                guider.prepare_models(unet)
                b.noise_pred = unet(latents, t.expand(len(SEEDS)), class_labels=b.class_labels).sample
                guider.cleanup_models(unet)
            pred = guider(batches).pred
            latents = scheduler.step(pred, t, latents, generator=gens).prev_sample
    return latents, torch.stack(posteriors) if posteriors else None


def test_the_dng_guider_in_a_diffusers_loop_equals_the_sampler(mnist):
    unet, conf = mnist
    out, schedule = ours(unet, conf, SETTINGS)
    guider = DynamicNegativeGuidance(**SETTINGS)
    assert guider.num_conditions == 2
    latents, posteriors = diffusers_loop(unet, conf, guider, schedule.timesteps.flip(0).tolist())
    image_diff = float((latents - out.images).abs().max())
    posterior_diff = float((posteriors - out.posterior[:-1]).abs().max())
    print(f"max |Δx_0| {image_diff:.2e}, max |Δp| {posterior_diff:.2e}")
    assert image_diff < 1e-3 and posterior_diff < 1e-4
    assert float((out.posterior - SETTINGS["prior"]).abs().max()) > 0.05  # the posterior did move from the prior


def test_the_offset_and_the_large_variance_follow_the_original_timesteps(mnist):
    unet, conf = mnist
    settings = {**SETTINGS, "guidance_scale": 2.0, "offset": 1e-4}  # a drift of ≈ 0.5 in log p per step
    conf_large = {**conf, "variance_type": "fixed_large"}
    schedule = NoiseSchedule.from_scheduler(conf).respace(STEPS)
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    with torch.inference_mode():
        out = sample(ClassConditionalEps(unet, [FORBIDDEN]), schedule, guidance.DynamicNegativeGuidance(**settings),
                     randn((len(SEEDS), 1, 28, 28), gens), generator=gens, progress=False, variance="large")
    latents, posteriors = diffusers_loop(unet, conf_large, DynamicNegativeGuidance(**settings),
                                         schedule.timesteps.flip(0).tolist())
    assert float((posteriors - out.posterior[:-1]).abs().max()) < 1e-4
    assert torch.allclose(latents, out.images, rtol=1e-3, atol=1e-3)  # |x_0| reaches hundreds at 10 large steps


def test_save_pretrained_round_trip_gives_identical_outputs(mnist, tmp_path):
    unet, conf = mnist
    guider = DynamicNegativeGuidance(guidance_scale=7.0, prior=0.2, temperature=0.5, offset=0.01, stop=0.8)
    guider.save_pretrained(tmp_path / "guider")
    again = DynamicNegativeGuidance.from_pretrained(tmp_path / "guider")
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(again.config) == public(guider.config) and again.config.stop == 0.8
    timesteps = NoiseSchedule.from_scheduler(conf).respace(STEPS).timesteps.flip(0).tolist()
    a, pa = diffusers_loop(unet, conf, guider, timesteps)
    b, pb = diffusers_loop(unet, conf, again, timesteps)
    assert torch.equal(a, b) and torch.equal(pa, pb)


def test_with_a_prompt_branch_the_unconditional_prediction_is_classifier_free():
    guider = DynamicNegativeGuidance(cfg_scale=7.5, guidance_scale=2.0, prior=0.3)
    assert guider.num_conditions == 3
    batches = guider.prepare_inputs({"prompt_embeds": (torch.ones(1), torch.zeros(1), -torch.ones(1))})
    assert [b.__guidance_identifier__ for b in batches] == ["pred_cond", "pred_uncond", "pred_negative"]
    assert [float(b.prompt_embeds) for b in batches] == [1.0, 0.0, -1.0]

    from diffusers import DDPMScheduler

    chain = DDPMScheduler(num_train_timesteps=10)  # the latents' chain: any DDPM scheduler
    chain.set_timesteps(10)
    x = torch.randn(2, 4, 8, 8)
    e0, ep, en = torch.randn(3, 2, 4, 8, 8)
    guider.set_state(0, 10, torch.tensor(9))
    guider.observe(x, chain)
    for b, e in zip(batches, (ep, e0, en)):
        b.noise_pred = e
    pred = guider(batches).pred
    eps_u = e0 + 7.5 * (ep - e0)
    w = 2.0 * 0.3 / 0.7
    assert torch.allclose(pred, eps_u - w * (en - eps_u), atol=1e-5)
    assert torch.allclose(guider.scale, torch.full((2,), w))


def test_forward_without_observe_is_one_clear_error():
    guider = DynamicNegativeGuidance()
    with pytest.raises(RuntimeError, match="observe"):
        guider.forward(torch.zeros(1), torch.zeros(1))


def test_np_is_diffusers_classifier_free_guidance_with_the_forbidden_class_as_its_unconditional_branch(mnist):
    """The mapping docs/diffusers.md states instead of a new class: the paper's NP, ε_u − λ(ε_c − ε_u), is
    ClassifierFreeGuidance(guidance_scale=1 + λ) fed (cond, uncond) = (null label, forbidden class)."""
    from diffusers.guiders import ClassifierFreeGuidance

    unet, conf = mnist
    schedule = NoiseSchedule.from_scheduler(conf).respace(STEPS)
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    with torch.inference_mode():
        out = sample(ClassConditionalEps(unet, [FORBIDDEN]), schedule, guidance.NegativePrompting(guidance_scale=2.0),
                     randn((len(SEEDS), 1, 28, 28), gens), generator=gens, progress=False)
    latents, _ = diffusers_loop(unet, conf, ClassifierFreeGuidance(guidance_scale=3.0), schedule.timesteps.flip(0).tolist(),
                                labels=lambda null, forbidden: (null, forbidden))
    assert float((latents - out.images).abs().max()) < 1e-3


def test_the_docs_example_runs_and_tracks_the_posterior():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "diffusers.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1).replace("print(", "result = (")
    scope: dict = {}
    exec(compile(code, "docs/diffusers.md", "exec"), scope)
    assert scope["x"].shape == (8, 1, 28, 28) and torch.isfinite(scope["x"]).all()
    assert scope["guider"].posterior.shape == (8,) and scope["guider"].scale.shape == (8,)


def test_the_sld_guider_in_a_diffusers_loop_equals_the_sampler(mnist, tmp_path):
    unet, conf = mnist
    settings = dict(guidance_scale=2.0, threshold=0.04, scale=100.0, momentum_scale=0.2, momentum_beta=0.1,
                    warmup_steps=2)
    schedule = NoiseSchedule.from_scheduler(conf).respace(STEPS)
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    with torch.inference_mode():
        out = sample(ClassConditionalEps(unet, [FORBIDDEN]), schedule, guidance.SafeLatentDiffusion(**settings),
                     randn((len(SEEDS), 1, 28, 28), gens), generator=gens, progress=False)
    guider = SafeLatentGuidance(**settings)
    timesteps = schedule.timesteps.flip(0).tolist()
    latents, _ = diffusers_loop(unet, conf, guider, timesteps)
    assert float((latents - out.images).abs().max()) < 1e-3
    guider.save_pretrained(tmp_path / "sld")
    again, _ = diffusers_loop(unet, conf, SafeLatentGuidance.from_pretrained(tmp_path / "sld"), timesteps)
    assert torch.equal(again, latents)
    plain, _ = diffusers_loop(unet, conf, SafeLatentGuidance(**{**settings, "guidance_scale": 0.0}), timesteps)
    assert float((plain - latents).abs().max()) > 1e-2  # the guidance did change the samples


def test_with_a_prompt_the_dng_guider_equals_dng_sd(compose):
    """Text-to-image: the guider with cfg_scale, fed (prompt, "", negative) embeddings in a guiders-protocol loop
    over diffusers' DDPMScheduler, gives `dng sd method=dng`'s latents (tiny random Stable Diffusion, offline)."""
    pytest.importorskip("transformers")
    from diffusers import DDPMScheduler

    from dng_cli.commands import sd
    from dng_cli.sampler import generate_all
    from dng_cli.spec import plain

    w, steps, seeds = 3.0, 4, [0, 1]
    comps = sd.tiny_random(0)
    cfg = compose("sd", ["sd_model=tiny_random", "prompt=a cat", "negative_prompt=a dog", "method=dng",
                         f"sampler.steps={steps}", f"cfg_scale={w}"])
    gen = sd.setup(comps, cfg, torch.device("cpu"))
    out = generate_all(gen, seeds, len(seeds), progress=False)

    guider = DynamicNegativeGuidance(**{k: v for k, v in plain(cfg.method).items() if k != "name"}, cfg_scale=w)
    assert guider.num_conditions == 3
    scheduler = DDPMScheduler(**comps.scheduler_config, clip_sample=False, variance_type="fixed_small")
    scheduler.set_timesteps(timesteps=gen.schedule.timesteps.flip(0).tolist())
    emb_0, emb_p, emb_n = (e.unsqueeze(0).repeat(len(seeds), 1, 1) for e in sd.encode(comps, ["", "a cat", "a dog"], "cpu"))
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    latents = randn((len(seeds), *gen.shape), gens)
    with torch.inference_mode():
        for i, t in enumerate(scheduler.timesteps):
            guider.set_state(i, steps, t)
            guider.observe(latents, scheduler)
            batches = guider.prepare_inputs({"encoder_hidden_states": (emb_p, emb_0, emb_n)})
            for b in batches:
                b.noise_pred = comps.unet(latents, t, encoder_hidden_states=b.encoder_hidden_states).sample
            latents = scheduler.step(guider(batches).pred, t, latents, generator=gens).prev_sample
    assert float((latents - out.images).abs().max()) < 1e-3
    assert torch.allclose(guider.posterior, out.posterior[-2], atol=1e-4)


GUIDERS = {"np": NegativePromptGuidance, "sld": SafeLatentGuidance, "dng": DynamicNegativeGuidance}


@pytest.mark.parametrize("method", ["np", "sld", "dng"])
def test_inside_diffusers_modular_denoise_step_the_guiders_equal_dng_sd(compose, method, tmp_path):
    """The shipped modular loop (NegativeConceptDenoiseStep: SDXL's loop blocks with the negative concept as a third
    input and observe) run by diffusers' ModularPipeline, the guider of each method in it, gives `dng sd`'s latents
    on the same seeds (tiny random Stable Diffusion, offline)."""
    pytest.importorskip("transformers")
    from diffusers import DDPMScheduler

    from dng_cli.commands import sd
    from dng_cli.guiders import NegativeConceptDenoiseStep
    from dng_cli.sampler import generate_all
    from dng_cli.spec import plain

    w, steps, seeds = 3.0, 4, [0, 1, 2]
    comps = sd.tiny_random(0)
    extra = ["method.guidance_scale=2.0", "method.warmup_steps=1"] if method == "sld" else []
    cfg = compose("sd", ["sd_model=tiny_random", "prompt=a cat", "negative_prompt=a dog", f"method={method}",
                         f"sampler.steps={steps}", f"cfg_scale={w}", *extra])
    gen = sd.setup(comps, cfg, torch.device("cpu"))
    out = generate_all(gen, seeds, len(seeds), progress=False)

    guider = GUIDERS[method](**{k: v for k, v in plain(cfg.method).items() if k != "name"}, cfg_scale=w)
    scheduler = DDPMScheduler(**comps.scheduler_config, clip_sample=False, variance_type="fixed_small")
    scheduler.set_timesteps(timesteps=gen.schedule.timesteps.flip(0).tolist())
    pipe = NegativeConceptDenoiseStep().init_pipeline()
    pipe.update_components(unet=comps.unet, scheduler=scheduler, guider=guider)
    emb_0, emb_p, emb_n = sd.encode(comps, ["", "a cat", "a dog"], "cpu").unsqueeze(1)

    def run():
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return pipe(latents=randn((len(seeds), *gen.shape), gens), timesteps=scheduler.timesteps,
                    num_inference_steps=steps, generator=gens, prompt_embeds=emb_p.expand(len(seeds), -1, -1),
                    negative_prompt_embeds=emb_0.expand(len(seeds), -1, -1), concept_prompt_embeds=emb_n,
                    output="latents")

    latents = run()
    diff = float((latents - out.images).abs().max())
    print(f"{method}: max |Δ latents| {diff:.2e}")
    assert diff < 1e-3
    assert float(guider.scale.abs().max()) > 0 or method == "sld"
    if method == "dng":
        assert torch.allclose(guider.posterior, out.posterior[-2], atol=1e-4)
    guider.save_pretrained(tmp_path / method)  # the round trip: the loaded guider gives identical latents
    pipe.update_components(guider=type(guider).from_pretrained(tmp_path / method))
    assert torch.equal(run(), latents)


def tiny_sdxl(seed: int = 0) -> dict:
    """A tiny randomly initialised Stable Diffusion XL (two CLIP text encoders, the text_time UNet), offline."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from dng_cli.commands import sd

    one = sd.tiny_random(seed)
    torch.manual_seed(seed)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=one.tokenizer.vocab_size, hidden_size=16, intermediate_size=32, projection_dim=8,
        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
        pad_token_id=1)).eval()
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=4, attention_head_dim=2, addition_embed_type="text_time",
                                addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 8).eval()
    scheduler = DDPMScheduler(**sd.SD_SCHEDULER, clip_sample=False, variance_type="fixed_small")
    return dict(text_encoder=one.text_encoder, text_encoder_2=text_encoder_2, tokenizer=one.tokenizer,
                tokenizer_2=one.tokenizer, unet=unet, vae=one.vae, scheduler=scheduler)


def test_the_sdxl_blocks_with_a_negative_concept_run_dng_end_to_end_and_match_a_guiders_loop():
    """NegativeConceptSDXLBlocks (SDXL's text-to-image blocks plus the concept encoder and the three-input loop) on a
    tiny SDXL: an image comes out, DNG's posterior moves, and the latents equal a plain guiders-protocol loop fed
    the same embeddings — the pipeline adds nothing of its own to the method."""
    pytest.importorskip("transformers")
    from dng_cli.guiders import NegativeConceptSDXLBlocks

    comps, steps, seeds = tiny_sdxl(0), 4, [0, 1]
    guider = DynamicNegativeGuidance(guidance_scale=3.0, prior=0.3, cfg_scale=2.0)
    pipe = NegativeConceptSDXLBlocks().init_pipeline()
    pipe.update_components(**comps, guider=guider)
    state = pipe(prompt="a cat", negative_concept="a dog", num_inference_steps=steps, height=16, width=16,
                 num_images_per_prompt=len(seeds), generator=[torch.Generator().manual_seed(s) for s in seeds])
    latents, images = state.get("latents"), state.get("images")
    assert latents.shape == (2, 4, 8, 8) and len(images) == 2  # VAE with two blocks: 16 px -> 8
    assert float((guider.posterior - 0.3).abs().max()) > 1e-3

    # the same chain by hand: the embeddings the blocks made, the guiders protocol, the scheduler stepping
    scheduler, unet = comps["scheduler"], comps["unet"]
    ref = DynamicNegativeGuidance(guidance_scale=3.0, prior=0.3, cfg_scale=2.0)
    g = lambda name: state.get(name)  # noqa: E731
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    x = randn((len(seeds), 4, 8, 8), gens)
    concept = g("concept_prompt_embeds").expand(2, -1, -1), g("concept_pooled_prompt_embeds").expand(2, -1)
    inputs = {"encoder_hidden_states": (g("prompt_embeds"), g("negative_prompt_embeds"), concept[0]),
              "text_embeds": (g("pooled_prompt_embeds"), g("negative_pooled_prompt_embeds"), concept[1]),
              "time_ids": (g("add_time_ids"), g("negative_add_time_ids"), g("add_time_ids"))}
    with torch.inference_mode():
        for i, t in enumerate(scheduler.timesteps):
            ref.set_state(i, steps, t)
            ref.observe(x, scheduler)
            batches = ref.prepare_inputs(inputs)
            for b in batches:
                b.noise_pred = unet(x, t, encoder_hidden_states=b.encoder_hidden_states,
                                    added_cond_kwargs={"text_embeds": b.text_embeds, "time_ids": b.time_ids}).sample
            x = scheduler.step(ref(batches).pred, t, x, generator=gens).prev_sample
    assert torch.allclose(x, latents, atol=1e-5) and torch.allclose(ref.posterior, guider.posterior, atol=1e-6)
    # (last: it re-runs the pipeline) the concept is encoded as SDXL's own text encoder step encodes a prompt
    as_prompt = pipe(prompt="a dog", negative_concept="a cat", num_inference_steps=1, height=16, width=16,
                     output=["prompt_embeds", "pooled_prompt_embeds"])
    assert torch.equal(state.get("concept_prompt_embeds"), as_prompt["prompt_embeds"])
    assert torch.equal(state.get("concept_pooled_prompt_embeds"), as_prompt["pooled_prompt_embeds"])


def test_the_negative_concept_loop_refuses_a_missing_concept_in_one_line():
    from diffusers import DDPMScheduler

    from dng_cli.commands import sd
    from dng_cli.guiders import NegativeConceptDenoiseStep

    comps = sd.tiny_random(0)
    scheduler = DDPMScheduler(**comps.scheduler_config)
    scheduler.set_timesteps(2)
    pipe = NegativeConceptDenoiseStep().init_pipeline()
    pipe.update_components(unet=comps.unet, scheduler=scheduler, guider=NegativePromptGuidance(cfg_scale=2.0))
    emb = sd.encode(comps, ["", "a cat"], "cpu")
    with pytest.raises(ValueError, match="negative concept"):
        pipe(latents=torch.zeros(1, 4, 8, 8), timesteps=scheduler.timesteps, num_inference_steps=2,
             prompt_embeds=emb[1:], negative_prompt_embeds=emb[:1])


def test_the_docs_modular_pipeline_example_runs_on_a_tiny_sdxl_folder(tmp_path):
    """docs/diffusers.md's SDXL example as written, pointed at a tiny random SDXL saved in diffusers' layout (with
    the Euler scheduler the hub's SDXL ships, which the example replaces by DDPM), on the CPU in fp32 at 16 px."""
    pytest.importorskip("transformers")
    import re
    from pathlib import Path

    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    comps = tiny_sdxl(0)
    comps["scheduler"] = EulerDiscreteScheduler.from_config(comps["scheduler"].config)
    StableDiffusionXLPipeline(**comps).save_pretrained(tmp_path / "sdxl")
    text = (Path(__file__).resolve().parents[1] / "docs" / "diffusers.md").read_text()
    code = next(c for c in re.findall(r"```python\n(.*?)```", text, re.S) if "NegativeConceptSDXLBlocks" in c)
    for old, new in (('"stabilityai/stable-diffusion-xl-base-1.0"', repr(str(tmp_path / "sdxl"))),
                     ("torch.float16", "torch.float32"), ('"cuda"', '"cpu"'), ("1024", "16"),
                     ("num_inference_steps=50", "num_inference_steps=4"), ('"park.png"', repr(str(tmp_path / "p.png"))),
                     ("print(", "result = (")):
        assert old in code, old
        code = code.replace(old, new)
    scope: dict = {}
    exec(compile(code, "docs/diffusers.md", "exec"), scope)
    assert (tmp_path / "p.png").exists() and scope["images"][0].size == (16, 16)
    guider = scope["pipe"].guider
    assert isinstance(guider, DynamicNegativeGuidance) and guider.posterior.shape == (1,)
    assert type(scope["pipe"].scheduler).__name__ == "DDPMScheduler"
