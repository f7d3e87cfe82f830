"""`dng sd` offline on a tiny randomly initialised Stable Diffusion (UNet, VAE, CLIP text encoder),
checked against diffusers' own pipelines on the same components, latents and generators."""

import warnings

import pytest
import torch

from dng_cli import cli
from dng_cli.sampler import generate_all
from dng_cli.commands import sd

STEPS, SEEDS, W = 4, [0, 1], 3.0


def test_prompt_eps_is_one_forward_and_cfg():
    comps = sd.tiny_random(0)
    emb = sd.encode(comps, ["", "a cat", "a dog"], "cpu")
    calls = []
    comps.unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    eps_fn = sd.PromptEps(comps.unet, emb, cfg_scale=3.0)
    z = torch.randn(2, 4, 8, 8)
    t = torch.full((2,), 500)
    with torch.inference_mode():
        eps_u, eps_c = eps_fn(z, t)
        e = [comps.unet(z, t, encoder_hidden_states=emb[i:i + 1].repeat(2, 1, 1)).sample for i in range(3)]
        branch_u, branch_c = sd.PromptEps(comps.unet, emb, 3.0, branches=True)(z, t)
    assert calls[0] == 6  # one batched forward of [z; z; z]
    assert torch.allclose(eps_u, e[0] + 3.0 * (e[1] - e[0]), atol=1e-4)
    assert torch.allclose(eps_c, e[2], atol=1e-4)
    assert torch.allclose(branch_u, e[0], atol=1e-4) and torch.allclose(branch_c, torch.stack(e[1:]), atol=1e-4)


def _ours(compose, comps, method, variance="small", *extra):
    cfg = compose("sd", ["sd_model=tiny_random", "prompt=a cat", "negative_prompt=a dog", f"method={method}",
                         f"sampler.steps={STEPS}", f"sampler.variance={variance}", f"cfg_scale={W}", *extra])
    gen = sd.setup(comps, cfg, torch.device("cpu"))
    return generate_all(gen, SEEDS, len(SEEDS), progress=False).images


def _scheduler(comps, variance_type="fixed_small"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(**comps.scheduler_config, timestep_spacing="linspace", clip_sample=False,
                         variance_type=variance_type)


def _theirs(comps, scheduler, **kw):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                                   unet=comps.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe("a cat", num_inference_steps=STEPS, guidance_scale=W, height=16, width=16, output_type="latent",
                num_images_per_prompt=len(SEEDS), generator=[torch.Generator().manual_seed(s) for s in SEEDS], **kw).images


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("variance,variance_type", [("small", "fixed_small"), ("large", "fixed_large")])
def test_guidance_scale_zero_equals_stable_diffusion_pipeline(compose, prediction_type, variance, variance_type):
    """NP at λ = 0 is plain classifier-free guidance: diffusers' StableDiffusionPipeline + DDPMScheduler
    on the same components and generators, for an ε- and a v-prediction model."""
    comps = sd.tiny_random(0, prediction_type)
    ours = _ours(compose, comps, "np", variance, "method.guidance_scale=0")
    theirs = _theirs(comps, _scheduler(comps, variance_type))
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


def test_replaced_negative_prompt_equals_diffusers_negative_prompt(compose):
    comps = sd.tiny_random(0)
    ours = _ours(compose, comps, "negative_prompt")
    theirs = _theirs(comps, _scheduler(comps), negative_prompt="a dog")
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    # and it is not the paper's NP (a third branch next to the empty prompt)
    assert not torch.allclose(_ours(compose, comps, "np", "small", "method.guidance_scale=1"), theirs, atol=1e-3)


@pytest.mark.parametrize("preset", ["WEAK", "MEDIUM", "STRONG", "MAX"])
def test_sld_presets_equal_stable_diffusion_pipeline_safe(compose, preset):
    from diffusers import StableDiffusionPipelineSafe
    from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig

    comps = sd.tiny_random(0)
    settings = dict(getattr(SafetyConfig, preset))
    settings["sld_warmup_steps"] = min(settings["sld_warmup_steps"], 2)  # a 4-step chain: let guidance act
    ours = _ours(compose, comps, f"sld_{preset.lower()}", "small",
                 *(f"method.{k}={v}" for k, v in settings.items()))
    pipe = StableDiffusionPipelineSafe(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                                       unet=comps.unet, scheduler=_scheduler(comps), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.safety_concept = "a dog"
    latents = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe("a cat", num_inference_steps=STEPS, guidance_scale=W, height=16, width=16, output_type="np",
             num_images_per_prompt=len(SEEDS), generator=[torch.Generator().manual_seed(s) for s in SEEDS],
             callback=lambda i, t, z: latents.append(z.clone()), callback_steps=1, **settings)
    assert torch.allclose(ours, latents[-1], atol=1e-4), (ours - latents[-1]).abs().max()
    plain_cfg = _ours(compose, comps, "np", "small", "method.guidance_scale=0")
    assert not torch.allclose(ours, plain_cfg, atol=1e-3)  # the safety term did act


def test_sld_preset_values_are_diffusers_safety_config():
    from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig
    from omegaconf import OmegaConf

    from dng_cli.commands.compare import method_config

    for preset in ("WEAK", "MEDIUM", "STRONG", "MAX"):
        conf = OmegaConf.to_container(method_config(f"sld_{preset.lower()}"))
        assert {k: conf[k] for k in getattr(SafetyConfig, preset)} == getattr(SafetyConfig, preset)


@pytest.mark.parametrize("method", ["sld_medium", "negative_prompt", "ccfg_sd"])
def test_prompt_branch_methods_are_refused_outside_sd(tmp_path, capsys, method):
    with pytest.raises(SystemExit):
        cli.main(["evaluate", "model=tiny_random", f"method={method}", f"hydra.run.dir={tmp_path / 'r'}"])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "dng sd only" in err and "allowed here are none, np, sld, dng" in err


def test_unknown_prediction_type_is_one_line(compose):
    comps = sd.tiny_random(0, "flow")
    with pytest.raises(Exception, match="prediction_type='flow'"):
        _ours(compose, comps, "np")


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["dng", "np", "sld", "sld_medium", "negative_prompt", "ccfg", "ccfg_sd"])
def test_sd_command_offline(tmp_path, method):
    run_dir = tmp_path / method
    cli_args = ["sd", "sd_model=tiny_random", "prompt=a cat", "negative_prompt=a dog", f"method={method}",
                "sampler.steps=3", "n_samples=2", "sampler.batch_size=2", "sampler.device=cpu", "sampler.progress=false",
                f"hydra.run.dir={run_dir}"]
    cli.main(cli_args)
    for name in ("samples.png", "samples.npz", "trajectory.csv", "guidance.png"):
        assert (run_dir / name).is_file()
    import numpy as np

    saved = np.load(run_dir / "samples.npz")
    assert saved["images"].shape == (2, 3, 16, 16) and saved["latents"].shape == (2, 4, 8, 8)


def test_sd_needs_negative_prompt(capsys, tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["sd", "sd_model=tiny_random", "prompt=a cat", "method=dng", f"hydra.run.dir={tmp_path / 'r'}"])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "negative_prompt" in err


def test_sd_refuses_a_precision_it_does_not_apply(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["sd", "sd_model=tiny_random", "prompt=a cat", "negative_prompt=a dog", "sampler.precision=bf16",
                  f"hydra.run.dir={tmp_path / 'x'}"])
    assert exit_info.value.code == 2
    assert "sampler.precision=bf16 is not supported by dng sd" in capsys.readouterr().err


def test_sd_refuses_a_backend_it_does_not_apply(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["sd", "sd_model=tiny_random", "prompt=a cat", "negative_prompt=a dog", "sampler.backend=onnxruntime",
                  f"hydra.run.dir={tmp_path / 'x'}"])
    assert exit_info.value.code == 2 and not (tmp_path / "x").exists()
    assert "sampler.backend=onnxruntime is not supported by dng sd" in capsys.readouterr().err
