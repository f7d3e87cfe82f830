"""method=dng_hold: DNG whose guidance weight keeps the running maximum of the tracked posterior once it has
reached ``hold`` (issue 28's low-rate variant). The tracked posterior is the paper's; only the weight changes."""

import pytest
import torch

from dng_cli import UserError
from dng_cli.guidance import DynamicNegativeGuidance
from dng_cli.sampler import sample
from dng_cli.schedule import NoiseSchedule

LAM, PRIOR, HOLD = 4.0, 0.1, 0.5


def _run(gmm, guidance, steps=50, n=2000):
    x_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(0))
    return sample(gmm, NoiseSchedule.linear().respace(steps), guidance, x_T,
                  generator=torch.Generator().manual_seed(1), progress=False)


def test_the_weight_is_the_running_max_once_the_posterior_reached_hold(gmm):
    out = _run(gmm, DynamicNegativeGuidance(LAM, prior=PRIOR, hold=HOLD))
    before = torch.cat([torch.full_like(out.posterior[:1], PRIOR), out.posterior[:-1]])  # p each weight saw
    running_max = torch.cummax(before, dim=0).values
    guided = torch.where(running_max >= HOLD, running_max, before)
    assert torch.allclose(out.scale, LAM * guided / (1 - guided), rtol=1e-5, atol=1e-6)
    held = (running_max >= HOLD) & (before < running_max - 1e-3)
    assert held.any()  # the case this variant exists for: p fell after reaching hold, the weight did not


def test_hold_leaves_the_tracked_posterior_and_undetected_samples_alone(gmm):
    """Until a sample's posterior reaches hold it is guided exactly as by DNG, so the chains agree step for step."""
    a = _run(gmm, DynamicNegativeGuidance(LAM, prior=PRIOR), n=400)
    b = _run(gmm, DynamicNegativeGuidance(LAM, prior=PRIOR, hold=HOLD), n=400)
    never = (b.posterior.max(0).values < HOLD)
    assert never.any() and (~never).any()
    assert torch.equal(a.images[never], b.images[never])
    assert torch.equal(a.posterior[:, never], b.posterior[:, never])


def test_hold_removes_more_on_the_mixture(gmm):
    """Exact scores, the prior calibrated (the fixture's forbidden share, 0.3), λ 1: DNG leaves 4.0 % of the
    forbidden component on these seeds, the hold about half of that (2.05 %)."""
    plain = _run(gmm, DynamicNegativeGuidance(1.0, prior=0.3))
    held = _run(gmm, DynamicNegativeGuidance(1.0, prior=0.3, hold=HOLD))
    rate = lambda out: (gmm.component(out.images) == 0).double().mean().item()  # noqa: E731
    assert rate(held) < 0.75 * rate(plain) < 0.75 * 0.3, (rate(held), rate(plain))


@pytest.mark.parametrize("hold", [0.1, 0.05, 1.0, "high"])
def test_a_hold_outside_prior_and_p_max_is_refused(hold):
    with pytest.raises(UserError, match="hold="):
        DynamicNegativeGuidance(LAM, prior=PRIOR, hold=hold)
