import pytest
import torch

from dng_cli import UserError
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
