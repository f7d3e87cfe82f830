"""Behaviour on an analytic Gaussian mixture, where the right answer is known in closed form."""

import torch

from dng_cli.guidance import DynamicNegativeGuidance, NegativePrompting, NoGuidance
from dng_cli.sampler import sample
from dng_cli.schedule import NoiseSchedule

N, STEPS = 2000, 200


def _run(gmm, guidance, steps=STEPS, n=N):
    x_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(0))
    out = sample(gmm, NoiseSchedule.linear().respace(steps), guidance, x_T,
                 generator=torch.Generator().manual_seed(1), progress=False)
    comp = gmm.component(out.images)
    return out, torch.bincount(comp, minlength=3).double() / n, gmm.distance(out.images)


def test_unguided_reproduces_weights(gmm):
    _, hist, dist = _run(gmm, NoGuidance())
    assert torch.allclose(hist, gmm.weights, atol=0.03)
    assert (dist < 4 * gmm.std).double().mean() > 0.99


def test_dng_removes_forbidden_and_keeps_the_rest(gmm):
    _, hist, dist = _run(gmm, DynamicNegativeGuidance(2.0, prior=0.3, temperature=1.0, offset=0.0, p_max=0.99))
    assert hist[0] < 0.01
    kept_ratio = hist[1] / (hist[1] + hist[2])
    assert abs(kept_ratio - 0.42 / 0.70) < 0.05  # relative weights of the kept components
    assert (dist < 4 * gmm.std).double().mean() > 0.99  # samples stay on their components


def test_posterior_identifies_forbidden_samples(gmm):
    out, _, _ = _run(gmm, DynamicNegativeGuidance(0.0, prior=0.3, temperature=1.0, offset=0.0, p_min=1e-6,
                                                  p_max=1 - 1e-6))
    is_forbidden = gmm.component(out.images) == 0
    accuracy = ((out.posterior[-1] > 0.5) == is_forbidden).double().mean()
    assert accuracy >= 0.95


def test_np_that_removes_as_much_distorts(gmm):
    out, hist, dist = _run(gmm, NegativePrompting(2.0))
    assert hist[0] < 0.01  # as safe as DNG above ...
    assert (dist > 4 * gmm.std).double().mean() > 0.5  # ... but most samples are pushed off every component


def test_few_steps_small_variance_keeps_components_sharp(gmm):
    """At 10 respaced steps σ² = β' (large) blurs every component to ~1.8x its width; β̃ (small, the
    default) stays within 25% of it. Exact scores, so only the sampler's variance differs."""
    x_T = torch.randn(N, 2, generator=torch.Generator().manual_seed(0))

    def spread(**variance) -> float:  # rms distance to the nearest mean, in units of the component's
        out = sample(gmm, NoiseSchedule.linear().respace(10), NoGuidance(), x_T,
                     generator=torch.Generator().manual_seed(1), progress=False, **variance)
        return (gmm.distance(out.images).pow(2).mean().sqrt() / (gmm.std * 2**0.5)).item()

    small, large = spread(variance="small"), spread(variance="large")
    assert abs(small - 1) < 0.25
    assert large > 1.5
    assert spread() == small  # the default
