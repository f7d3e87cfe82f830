import pytest
import torch

from dng_cli import UserError
from dng_cli.sampler import sample
from dng_cli.schedule import NoiseSchedule


def test_linear_matches_ddpm():
    s = NoiseSchedule.linear(1000, 1e-4, 0.02)
    assert len(s) == 1000
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    assert torch.allclose(s.alphas_cumprod, torch.cumprod(1 - s.betas, 0))


def test_respace_full_is_identity():
    s = NoiseSchedule.linear()
    r = s.respace(1000)
    assert torch.equal(r.timesteps, s.timesteps)
    assert torch.allclose(r.betas, s.betas, rtol=1e-9, atol=1e-15)
    assert torch.allclose(r.alphas_cumprod, s.alphas_cumprod, rtol=0, atol=0)


def test_respaced_chain_is_exact():
    s = NoiseSchedule.linear()
    r = s.respace(10)
    assert r.timesteps[0] == 0 and r.timesteps[-1] == 999 and len(r) == 10
    # the respaced chain's own cumulative product reproduces the kept ᾱ exactly
    assert torch.allclose(torch.cumprod(1 - r.betas, 0), s.alphas_cumprod[r.timesteps], rtol=1e-12)
    small = r.variances("small")
    assert small[0] == 0 and torch.all(small[1:] < r.betas[1:])


@pytest.mark.parametrize("steps", [0, -1, 1001, 2.5])
def test_respace_rejects_bad_steps(steps):
    with pytest.raises(UserError, match="steps"):
        NoiseSchedule.linear().respace(steps)


def test_unknown_variance():
    with pytest.raises(UserError, match="variance"):
        NoiseSchedule.linear().variances("medium")


@pytest.mark.parametrize("kind", ["small", "large"])
def test_span_precision_is_step_invariant(kind):
    """DNG's offset is a rate per original timestep: the drift Σ_k offset/2 · Σ_{s ∈ span_k} 1/σ_s² of
    a whole chain is the same at every step count, and at K = T each step adds exactly offset/(2σ_k²)."""
    full = NoiseSchedule.linear()
    totals = {k: float(full.respace(k).span_precision(kind).sum()) for k in (1000, 250, 100, 50, 10, 2)}
    assert all(v == pytest.approx(totals[1000], rel=1e-12) for v in totals.values()), totals
    per_step = full.respace(1000).span_precision(kind)
    assert torch.allclose(per_step[1:], 1.0 / full.variances(kind)[1:], rtol=1e-12)
    assert per_step[0] == 0.0  # the last, noiseless step updates nothing
    # ≈ 29 nats of drift over the chain for the official offset 2e-4 with β̃ (dominated by t → 0)
    assert 0.5 * 2e-4 * totals[1000] > 20 if kind == "small" else True


def test_spans_cover_the_original_chain_once():
    s = NoiseSchedule.linear().respace(50)
    spans = s.timestep_spans()
    assert spans[0] == (-1, 0) and spans[-1][1] == 999
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert s.respace(10).original().betas.equal(NoiseSchedule.linear().betas)  # respacing twice keeps the original


# ----------------------------------------------------------------- the schedule from diffusers' scheduler
@pytest.mark.parametrize("config", [
    {}, {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 500},
    {"trained_betas": torch.linspace(1e-3, 0.05, 200).tolist(), "num_train_timesteps": 200},
])
def test_from_scheduler_equals_diffusers_chain(config):
    from diffusers import DDPMScheduler

    theirs = DDPMScheduler(**config)
    ours = NoiseSchedule.from_scheduler(theirs)
    assert torch.allclose(ours.alphas_cumprod.float(), theirs.alphas_cumprod, rtol=1e-5, atol=1e-6)
    again = DDPMScheduler.from_config(ours.scheduler_config())  # and back: a config diffusers reads
    assert torch.allclose(again.alphas_cumprod, theirs.alphas_cumprod, rtol=1e-5, atol=1e-6)


def test_unknown_beta_schedule_is_one_clear_error():
    with pytest.raises(UserError, match="beta_schedule='sigmoid'.*allowed are linear"):
        NoiseSchedule.from_scheduler({"beta_schedule": "sigmoid"})


@pytest.mark.parametrize("variance,variance_type", [("small", "fixed_small"), ("large", "fixed_large")])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("steps", [1000, 50, 7])
def test_respaced_chain_equals_diffusers_ddpm_scheduler_step_by_step(variance, variance_type, prediction_type, steps):
    """Our ancestral chain == DDPMScheduler(timestep_spacing="linspace", clip_sample=False) on the same noise,
    for a model of every prediction type (a fixed random linear map stands in for the network)."""
    from diffusers import DDPMScheduler

    from dng_cli.sampler import as_epsilon

    config = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": prediction_type}
    theirs = DDPMScheduler(**config, timestep_spacing="linspace", clip_sample=False, variance_type=variance_type)
    theirs.set_timesteps(steps)
    schedule = NoiseSchedule.from_scheduler(theirs.config).respace(steps)
    assert schedule.timesteps.flip(0).tolist() == theirs.timesteps.tolist()
    w = torch.randn(8, 8, generator=torch.Generator().manual_seed(0)) / 8

    def model(x, t):  # some smooth function of (x, t)
        return torch.tanh(x @ w + t.view(-1, 1) / 1000.0)

    seeds = [3, 4]
    x_T = torch.stack([torch.randn(8, generator=torch.Generator().manual_seed(s)) for s in seeds])
    ours = sample(as_epsilon(lambda x, t: (model(x, t), None), schedule, prediction_type), schedule, x_T=x_T.clone(),
                  generator=[torch.Generator().manual_seed(s).manual_seed(100 + s) for s in seeds], progress=False,
                  variance=variance).images
    gens = [torch.Generator().manual_seed(100 + s) for s in seeds]
    x = x_T.clone()
    for t in theirs.timesteps:
        x = theirs.step(model(x, t.repeat(len(x))), t, x, generator=gens).prev_sample
    assert torch.allclose(ours, x, atol=2e-4, rtol=1e-4), (ours - x).abs().max()


def test_the_model_folder_carries_the_schedule(tmp_path):
    import json

    from omegaconf import OmegaConf

    from dng_cli import spec

    def scheduler_config(model_cfg):
        return spec.scheduler_config(model_cfg, spec.model_folders(model_cfg))

    def build_schedule(sampler_cfg, model_cfg):
        return spec.respaced(NoiseSchedule.from_scheduler(scheduler_config(model_cfg)), sampler_cfg)

    shipped = scheduler_config(OmegaConf.create({"kind": "conditional", "path": "mnist"}))
    assert torch.equal(NoiseSchedule.from_scheduler(shipped).betas, NoiseSchedule.linear().betas)
    sampler = OmegaConf.create({"steps": 10, "variance": "small"})
    for name, conf in (("u", {}), ("c", {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "scheduler_config.json").write_text(json.dumps(conf))
    pair = OmegaConf.create({"kind": "pair", "unconditional": str(tmp_path / "u"), "forbidden_models": {0: str(tmp_path / "u")}})
    assert len(build_schedule(sampler, pair)) == 10
    pair.forbidden_models[0] = str(tmp_path / "c")
    with pytest.raises(UserError, match="forbidden_models.0 was trained with another noise schedule"):
        build_schedule(sampler, pair)
    random = OmegaConf.create({"kind": "random", "scheduler": {"num_train_timesteps": 100}})
    assert build_schedule(OmegaConf.create({"steps": 100, "variance": "small"}), random).timesteps[-1] == 99
