"""Guidance identities, SLD against a plain reference of the diffusers formula, extreme settings."""

import math

import pytest
import torch

from dng_cli import UserError
from dng_cli.guidance import DynamicNegativeGuidance, NegativePrompting, NoGuidance, SafeLatentDiffusion
from dng_cli.sampler import sample
from dng_cli.schedule import NoiseSchedule


def _run(eps_fn, guidance, steps=20, n=64, seed=0, variance="large"):
    x_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
    return sample(eps_fn, NoiseSchedule.linear().respace(steps), guidance, x_T,
                  generator=torch.Generator().manual_seed(seed + 1), progress=False, variance=variance)


def test_np_zero_is_none(gmm):
    a = _run(gmm, NoGuidance())
    b = _run(gmm, NegativePrompting(0.0))
    assert torch.equal(a.images, b.images)


def test_dng_static_limit_is_np(gmm):
    lam, prior = 3.0, 0.2
    a = _run(gmm, DynamicNegativeGuidance(lam, prior=prior, temperature=0.0, offset=0.0))
    b = _run(gmm, NegativePrompting(lam * prior / (1 - prior)))
    assert torch.allclose(a.images, b.images, atol=1e-5)
    assert torch.allclose(a.posterior, torch.full_like(a.posterior, prior))
    assert torch.allclose(a.scale, b.scale)


def test_dng_tiny_pmax_is_none(gmm):
    a = _run(gmm, NoGuidance())
    b = _run(gmm, DynamicNegativeGuidance(5.0, prior=1e-9, p_min=1e-10, p_max=1e-9))
    assert torch.allclose(a.images, b.images, atol=1e-6)


def sld_reference(eps_u, eps_c, steps, lam, thr, s_s, s_m, beta_m, warmup):
    """A plain transcription of diffusers' StableDiffusionPipelineSafe guidance with text = uncond."""
    momentum = None
    outs = []
    for i in range(steps):
        noise_pred_text, noise_pred_uncond, noise_pred_safety_concept = eps_u[i], eps_u[i], eps_c[i]
        noise_guidance = noise_pred_text - noise_pred_uncond
        if momentum is None:
            momentum = torch.zeros_like(noise_guidance)
        scale = torch.clamp(torch.abs(noise_pred_text - noise_pred_safety_concept) * s_s, max=1.0)
        safety_concept_scale = torch.where((noise_pred_text - noise_pred_safety_concept) >= thr,
                                           torch.zeros_like(scale), scale)
        noise_guidance_safety = torch.mul(noise_pred_safety_concept - noise_pred_uncond, safety_concept_scale)
        noise_guidance_safety = noise_guidance_safety + s_m * momentum
        momentum = beta_m * momentum + (1 - beta_m) * noise_guidance_safety
        if i >= warmup:
            noise_guidance = noise_guidance - noise_guidance_safety
        outs.append(noise_pred_uncond + lam * noise_guidance)
    return outs


def test_sld_matches_diffusers_formula():
    g = torch.Generator().manual_seed(0)
    steps, shape = 6, (3, 1, 4, 4)
    eps_u = torch.randn(steps, *shape, generator=g)
    eps_c = eps_u + 0.05 * torch.randn(steps, *shape, generator=g)
    params = dict(guidance_scale=2.5, threshold=0.01, scale=30.0, momentum_scale=0.3, momentum_beta=0.4, warmup_steps=2)
    sld = SafeLatentDiffusion(**params)
    state = sld.start(eps_u[0], 1)
    ref = sld_reference(eps_u, eps_c, steps, 2.5, 0.01, 30.0, 0.3, 0.4, 2)
    for i in range(steps):
        eps, scale = sld(eps_u[i], eps_c[i].unsqueeze(0), i, state)
        assert torch.allclose(eps, ref[i], atol=1e-6), i
        assert (scale == 0).all() if i < 2 else (scale > 0).all()
    # momentum matters: without it the late steps differ
    assert not torch.allclose(ref[-1], sld_reference(eps_u, eps_c, steps, 2.5, 0.01, 30.0, 0.0, 0.4, 2)[-1])


@pytest.mark.parametrize("lam,offset", [(1e3, 1.0), (1e3, 0.0), (0.0, 1.0)])
def test_extreme_settings_stay_finite(gmm, lam, offset):
    out = _run(gmm, DynamicNegativeGuidance(lam, prior=0.5, temperature=10.0, offset=offset, p_min=1e-12,
                                            p_max=0.999999), steps=50)
    assert torch.isfinite(out.posterior).all() and torch.isfinite(out.scale).all()
    assert ((out.posterior >= 1e-12 * 0.999) & (out.posterior <= 0.999999 * 1.001)).all()


def test_extreme_on_unet_stays_finite():
    from dng_cli.models import ClassConditionalEps, build_unet

    unet = build_unet(dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                           block_out_channels=(4, 8), down_block_types=("DownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, num_class_embeds=11), seed=0)
    eps_fn = ClassConditionalEps(unet.eval(), [0])
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = sample(eps_fn, NoiseSchedule.linear().respace(5), DynamicNegativeGuidance(1e3, offset=1.0), x_T,
                     generator=torch.Generator().manual_seed(1), progress=False)
    assert torch.isfinite(out.posterior).all() and torch.isfinite(out.scale).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(p_max=1.0), "p_max"), (dict(p_max=1e-7), "p_max"), (dict(prior=0.0), "prior"),
    (dict(prior=1.0), "prior"), (dict(temperature=-1.0), "temperature"), (dict(guidance_scale=math.inf), "guidance_scale"),
])
def test_dng_rejects_bad_values(kwargs, match):
    with pytest.raises(UserError, match=match):
        DynamicNegativeGuidance(**kwargs)


def test_several_classes_one_posterior_each():
    from gmm import GaussianMixtureEps

    gmm = GaussianMixtureEps([[0.0, 2.0], [-2.0, -1.0], [2.0, -1.0], [0.0, -3.0]], [0.25] * 4, 0.25, forbidden=(0, 3))
    out = _run(gmm, DynamicNegativeGuidance(3.0, prior=0.25, temperature=1.0, offset=0.0, p_max=0.99), steps=100, n=600)
    assert out.posterior.shape == (100, 600, 2)
    comp = gmm.component(out.images)
    forbidden_rate = torch.isin(comp, torch.tensor([0, 3])).double().mean().item()
    unguided = gmm.component(_run(gmm, NoGuidance(), steps=100, n=600).images)
    assert torch.isin(unguided, torch.tensor([0, 3])).double().mean().item() > 0.4
    assert forbidden_rate < 0.02


def test_dng_offset_drift_does_not_depend_on_steps(gmm):
    """With temperature 0 only the offset moves the posterior: after the whole chain log p has drifted
    by offset/2 · Σ_s 1/σ_s² over the ORIGINAL timesteps, at 50 steps as at 1000."""
    prior, offset = 1e-4, 1e-7
    finals = {}
    for steps in (1000, 50):
        out = _run(gmm, DynamicNegativeGuidance(0.0, prior=prior, temperature=0.0, offset=offset, p_min=1e-9,
                                                p_max=1 - 1e-9), steps=steps, n=4, variance="small")
        finals[steps] = out.posterior[-1].double().log()
    drift = 0.5 * offset * float(NoiseSchedule.linear().span_precision("small").sum())
    assert drift > 0.01
    for v in finals.values():
        assert torch.allclose(v, torch.full_like(v, math.log(prior) + drift), rtol=0, atol=1e-4)


def test_dng_guidance_scale_zero_is_a_detector(gmm):
    """λ = 0: the samples are the unguided ones and the posterior is still tracked."""
    a = _run(gmm, NoGuidance(), variance="small")
    b = _run(gmm, DynamicNegativeGuidance(0.0, prior=0.3, temperature=1.0, offset=0.0, p_max=0.99), variance="small")
    assert torch.equal(a.images, b.images)
    assert b.posterior.std() > 0.1


def test_official_presets_compose(compose):
    from dng_cli.guidance import build_guidance

    expected = {"dng": (10.0, 0.1, 1.0, 0.0, 0.99), "dng_official_readme": (5.0, 0.01, 0.2, 2e-4, 0.8),
                "dng_official_cli": (1.0, 0.2, 1.0, 0.0, 0.99), "dng_fewstep": (10.0, 0.5, 1.0, 0.0, 0.99)}
    for preset, values in expected.items():
        g = build_guidance(compose("evaluate", [f"method={preset}"]).method)
        assert isinstance(g, DynamicNegativeGuidance)
        assert (g.guidance_scale, g.prior, g.temperature, g.offset, g.p_max) == values, preset


def test_a_new_method_is_one_class_and_its_config(gmm, monkeypatch):
    """The protocol is all the sampler knows: a toy method defined here runs through the pipeline."""
    from omegaconf import OmegaConf

    from dng_cli import guidance as G
    from dng_cli.guidance import build_guidance
    from dng_cli.guidance import Guidance, StepInfo

    class HalfNP(Guidance):
        needs_update = True
        tracks_posterior = True

        def __init__(self, guidance_scale: float = 1.0):
            self.guidance_scale = guidance_scale

        def start(self, x_T, num_classes):
            return {"updates": 0, "spans": []}

        def __call__(self, eps_u, eps_c, step, state):
            lam = self.guidance_scale * (0.5 if step < 10 else 1.0)
            return eps_u - lam * (eps_c - eps_u).sum(0), eps_u.new_full((eps_u.shape[0],), lam)

        def update(self, state, info: StepInfo):
            state["updates"] += 1
            state["spans"].append(info.timestep_span)
            assert info.mu_c.shape[0] == 1 and info.variance > 0 and info.span_precision > 0

        def posterior(self, state):
            return torch.full((1, 1), float(state["updates"]))

    monkeypatch.setitem(G.METHODS, "half_np", HalfNP)
    method = build_guidance(OmegaConf.create({"name": "half_np", "guidance_scale": 2.0}))
    out = _run(gmm, method, steps=20, n=4)
    assert out.scale[:10].eq(1.0).all() and out.scale[10:].eq(2.0).all()
    assert out.posterior[-1].eq(19).all()  # 19 noisy steps updated it (not the last, noiseless one)
    ref = _run(gmm, NegativePrompting(2.0), steps=20, n=4)
    assert not torch.equal(out.images, ref.images)
