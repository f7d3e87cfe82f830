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
