"""DNG's tracked posterior against the exact one, on the analytic Gaussian mixture.

Along a reverse chain the forward process is class-independent given x_t, so p(c | x_t, …, x_T) = p(c | x_t),
which the mixture gives in closed form: w_c N(x_t; √ᾱ μ_c, v) / Σ_k w_k N(x_t; √ᾱ μ_k, v). DNG's recursive
update approximates it with Gaussian reverse kernels, so the gap shrinks with the step count. Measured
(400 samples, worst step of the mean |Δp| over samples): 0.013 at 1000 steps, 0.036 at 200, 0.050–0.056 at 50,
for both update conventions; a one-step lag gives 0.022 / 0.048 / 0.089 and a likelihood off by a factor 2
(temperature 2 or 0.5) ≥ 0.106 at every step count. The tolerances sit between the two."""

import math

import pytest
import torch

from dng_cli.guidance import DynamicNegativeGuidance
from dng_cli.sampler import sample
from dng_cli.schedule import NoiseSchedule

TOLERANCE = {1000: 0.018, 200: 0.042, 50: 0.07}


def _exact(gmm, x: torch.Tensor, t: int) -> torch.Tensor:
    a = gmm.abar[t].item()
    v = a * gmm.std ** 2 + 1 - a
    d = x.double().unsqueeze(1) - math.sqrt(a) * gmm.means.unsqueeze(0)
    return (gmm.weights.log() - (d ** 2).sum(-1) / (2 * v)).softmax(-1)[:, 0]


def _worst_gap(gmm, steps: int, variance: str, update_variance: str, temperature: float = 1.0, n: int = 400) -> float:
    states = []

    def eps_fn(x, t):  # the chain's state at each step, with its timestep
        states.append((x.clone(), int(t[0])))
        return gmm(x, t)

    x_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    detector = DynamicNegativeGuidance(0.0, prior=float(gmm.weights[0]), temperature=temperature, offset=0.0,
                                       p_min=1e-12, p_max=1 - 1e-12, update_variance=update_variance)
    out = sample(eps_fn, NoiseSchedule.linear().respace(steps), detector, x_T,
                 generator=torch.Generator().manual_seed(1), progress=False, variance=variance)
    # posterior[i - 1] is p after the update of step i - 1, i.e. given the chain down to the state of step i
    return max((out.posterior[i - 1].double() - _exact(gmm, x, t)).abs().mean().item()
               for i, (x, t) in enumerate(states) if i >= 1)


@pytest.mark.parametrize("steps", [1000, 200, 50])
@pytest.mark.parametrize("variance,update_variance", [("small", "sampled"), ("large", "small")],
                         ids=["default", "official"])
def test_tracked_posterior_follows_the_exact_one(gmm, steps, variance, update_variance):
    assert _worst_gap(gmm, steps, variance, update_variance) <= TOLERANCE[steps]


@pytest.mark.parametrize("temperature", [2.0, 0.5])
def test_a_likelihood_off_by_a_factor_two_is_caught(gmm, temperature):
    assert _worst_gap(gmm, 200, "small", "sampled", temperature) > TOLERANCE[200]
