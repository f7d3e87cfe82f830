"""Matched safety (dng_cli.matching) on cases where the truth is known: the isotonic rate fit and its
crossing, plateaus, Holm, an A/A comparison that must come out unresolved, a planted difference that
must be found, and paired intervals narrower than independent ones on shared seeds."""

import math

import numpy as np
import pytest

from dng_cli import matching, metrics

K = 10  # classes; 0 is forbidden


def test_isotonic_fit_is_the_weighted_decreasing_projection():
    y, w = [0.1, 0.3, 0.2, 0.05, 0.06], [1, 1, 2, 1, 1]
    f = matching.isotonic_decreasing(y, w)
    assert np.all(np.diff(f) <= 1e-12)
    assert f[0] == pytest.approx((0.1 + 0.3 + 2 * 0.2) / 4) and f[3] == f[4] == pytest.approx(0.055)
    assert matching.isotonic_decreasing([0.3, 0.2, 0.1], [1, 1, 1]).tolist() == [0.3, 0.2, 0.1]  # already decreasing


def test_crossing_of_a_simulated_rate_curve():
    """Binomial probes of r(λ) = 0.2·exp(−λ) at N = 20000: λ0(1 %) within 5 % of log 20 = 2.996."""
    rng = np.random.default_rng(0)
    scales = [0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4, 6]
    n = 20000
    ks = [rng.binomial(n, 0.2 * math.exp(-s)) for s in scales]
    x, f = matching.rate_curve(scales, ks, [n] * len(scales))
    assert matching.crossing(x, f, 0.01) == pytest.approx(math.log(20), rel=0.05)
    assert matching.crossing(x, f, 0.5) is None and matching.crossing(x, f, 1e-6) is None  # no crossing inside
    assert matching.plateau(x, f, 0.01, n) is None


def test_a_plateau_is_detected():
    scales = [1, 2, 4, 8, 16, 32]
    rates = [0.05, 0.012, 0.011, 0.010, 0.009, 0.002]  # ~1 % from λ 2 to 16: a factor 8
    n = 1000
    x, f = matching.rate_curve(scales, [r * n for r in rates], [n] * 6)
    lo, hi = matching.plateau(x, f, 0.01, n)
    assert lo == pytest.approx(2) and hi == pytest.approx(16)
    assert matching.plateau(x, f, 0.05, n) is None


def test_holm_on_a_known_set():
    assert matching.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert matching.holm([0.5]) == [0.5] and matching.holm([0.6, 0.6]) == [1.0, 1.0]


# ------------------------------------------------------------- a simulated sampler with known truth
class World:
    """Per-seed latents shared by every method evaluated on the same seeds: seed i is forbidden at scale λ
    when u_i < r(λ); its kept class is argmax_c (z_ic + skew_c·log λ); its 4-d feature g_i + log λ·v."""

    def __init__(self, n: int, rng: np.random.Generator):
        self.u, self.z = rng.random(n), rng.gumbel(size=(n, K - 1))
        self.g = rng.normal(size=(n, 4))

    def point(self, scale: float, lam_c: float, skew: float, parametrisation: float = 1.0) -> matching.Point:
        lam = scale / parametrisation  # a method whose yaml scale is another's times `parametrisation`
        rate = 0.3 / (1 + (lam / lam_c) ** 4)
        forbidden = self.u < rate
        pull = np.zeros(K - 1)
        pull[6] = skew * (1 + math.log(lam))  # a method that piles mass onto class 7
        classes = np.where(forbidden, 0, 1 + np.argmax(self.z + pull, axis=1))
        feats = self.g + math.log(lam) * np.array([0.3, 0.0, 0.1, 0.0]) + skew * np.array([0.0, 1.5, 0.0, 0.0])
        return matching.Point(scale, forbidden, {"classes": classes, "features": feats})


def _pilots(rng, lam_c, parametrisation, n=300):
    """Pilot probes on their own seeds, spaced as a bisection with tolerance 0.5 leaves them."""
    out = []
    for scale in parametrisation * 1.5 ** np.arange(-2, 7):
        lam = scale / parametrisation
        out.append((scale * 1.0, int(rng.binomial(n, 0.3 / (1 + (lam / lam_c) ** 4))), n))
    return out


REF = (np.zeros(4), np.eye(4))


def _metric_fns():
    mu, cov = (torch_t(REF[0]), torch_t(REF[1]))
    return {"kl_kept": lambda p, idx: metrics.kl_kept(np.bincount(p.records["classes"][idx], minlength=K), [0]),
            "fid": lambda p, idx: metrics.fid_to_gaussian(mu, cov, torch_t(p.records["features"][idx]))}


def torch_t(a):
    import torch

    return torch.as_tensor(np.asarray(a, dtype=np.float64))


def _compare(seed, skew_b, parametrisation_b, factors_b=(0.7, 1.0, 1.45), n=1000, n_boot=200, target=0.02, paired=True):
    rng = np.random.default_rng(seed)
    world = World(n, rng)
    methods = []
    for name, skew, par, factors in (("a", 0.0, 1.0, (0.8, 1.0, 1.25)), ("b", skew_b, parametrisation_b, factors_b)):
        pilots = _pilots(rng, 2.0, par)
        grid = matching.choose_grid(lambda s: world.point(s, 2.0, skew, par), pilots, [target], factors, 0.01, 1000)
        methods.append(matching.Method(name, [grid[s] for s in sorted(grid)], pilots))
    return matching.analyse(methods, [target], _metric_fns(), "a", n_boot=n_boot, seed=seed, paired=paired)


@pytest.mark.slow
def test_an_a_a_comparison_comes_out_unresolved():
    """The same method entered twice — once with its yaml scale halved (so its λ is doubled), another grid
    and its own pilot seeds — must not be told apart in ≥ 95 % of repeats."""
    repeats = 40
    resolved = 0
    for r in range(repeats):
        out = _compare(r, skew_b=0.0, parametrisation_b=2.0)
        assert all(m["identified"] for m in out["methods"])
        resolved += any(c["resolved"] for c in out["claims"])
    assert resolved <= 0.05 * repeats, f"{resolved} of {repeats} A/A repeats resolved a difference"


@pytest.mark.slow
def test_a_planted_difference_is_detected():
    """Method b piles the removed mass onto class 7 and shifts a feature: found in ≥ 90 % of repeats."""
    repeats, found = 20, 0
    for r in range(repeats):
        out = _compare(100 + r, skew_b=0.4, parametrisation_b=1.0)
        claim = {c["metric"]: c for c in out["claims"]}
        found += claim["kl_kept"]["resolved"] and claim["kl_kept"]["diff"] > 0 and claim["fid"]["resolved"]
    assert found >= 0.9 * repeats, f"found in {found} of {repeats}"


def test_paired_intervals_are_narrower_on_shared_seeds():
    widths = {}
    for paired in (True, False):
        out = _compare(7, skew_b=0.2, parametrisation_b=1.0, factors_b=(0.8, 1.0, 1.25), paired=paired)
        widths[paired] = {c["metric"]: c["hi"] - c["lo"] for c in out["claims"]}
    for key in ("kl_kept", "fid"):
        assert widths[True][key] < 0.8 * widths[False][key], (key, widths)


def test_the_interval_carries_the_matchings_noise():
    """The s.e. of λ* is not zero and a replicate that cannot match counts as such: an unreachable target is
    'not identified' and its claims compare the fronts over a band (or say there is none)."""
    out = _compare(3, skew_b=0.0, parametrisation_b=1.0)
    m = out["methods"][0]
    assert m["scale_star_ci"][0] < m["scale_star"] < m["scale_star_ci"][1]
    rng = np.random.default_rng(0)
    world = World(400, rng)
    flat = matching.Method("a", [world.point(s, 2.0, 0.0) for s in (4.0, 5.0, 6.0)], [])
    other = matching.Method("b", [world.point(s, 2.0, 0.0) for s in (1.0, 2.0, 3.0)], [])
    res = matching.analyse([flat, other], [0.2], _metric_fns(), "b", n_boot=50)
    assert not res["methods"][0]["identified"]
    assert {c["kind"] for c in res["claims"]} <= {"band", "no common band"}
