"""Matched safety (dng_cli.matching) on cases where the truth is known: the isotonic rate fit and its crossing,
the shape-preserving interpolation, max-T and the MDE, a grid that brackets the band without gaps, 200-repeat
A/A simulations on a DNG-like plateau (two different grids, own pilots) that must resolve ≤ 5 % and a planted
difference whose interval must cover it ≥ 93 %, and paired intervals narrower than independent ones."""

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


def test_pchip_is_scipys_shape_preserving_cubic():
    interpolate = pytest.importorskip("scipy.interpolate")
    rng = np.random.default_rng(0)
    for trial in range(50):
        x = np.unique(np.sort(rng.random(int(rng.integers(3, 10))) * 5))
        y = rng.normal(size=len(x)) if trial % 2 else np.sort(rng.random(len(x)))[::-1]
        if trial % 5 == 0 and len(x) > 3:
            y[1:3] = y[1]  # a tie, as the isotonic fit makes them
        at = np.linspace(x[0], x[-1], 41)
        assert matching.pchip(x, y, at) == pytest.approx(interpolate.PchipInterpolator(x, y)(at), abs=1e-12)
    x, f = np.log([1.0, 2, 4, 8]), np.array([0.1, 0.05, 0.05, 0.01])
    dense_x, dense_f = matching.dense_curve(x, f)
    assert np.all(np.diff(dense_f) <= 0) and dense_f.max() <= 0.1 and dense_f.min() >= 0.01  # monotone, no overshoot


def test_a_crossing_outside_the_grid_is_held_at_its_end_and_says_so():
    x, f = np.log([1.0, 2.0, 4.0]), np.array([0.05, 0.02, 0.01])
    assert matching.matched_scale(x, f, 0.001) == (pytest.approx(4.0), True)  # never reached: the largest λ
    assert matching.matched_scale(x, f, 0.2) == (pytest.approx(1.0), True)  # below everywhere: the smallest
    lam, clamped = matching.matched_scale(x, f, 0.03)
    assert 1.0 < lam < 2.0 and not clamped


def test_max_t_and_the_mde_on_known_cases():
    rng = np.random.default_rng(0)
    boot = rng.normal(size=(3, 2000)) * np.array([[1.0], [1.0], [0.0]])
    est = np.array([2.5, 0.3, 0.0])
    raw, adj = matching.max_t(est, est[:, None] + boot)
    assert raw[2] == adj[2] == 1.0  # no variation: nothing to test
    assert raw[0] == pytest.approx(0.0124, abs=0.006) and raw[1] == pytest.approx(0.76, abs=0.04)
    assert adj[0] >= raw[0] and adj[1] >= raw[1] and adj[0] <= adj[1]
    one_raw, one_adj = matching.max_t(est[:1], est[:1, None] + boot[:1])
    assert one_raw[0] == one_adj[0]  # a family of one: max-T is the raw p
    far_raw, far_adj = matching.max_t(np.array([8.0, 0.3]), np.array([8.0, 0.3])[:, None] + boot[:2])
    assert 0 < far_raw[0] < 1 / 2001 and 0 < far_adj[0] <= 2 * far_raw[0]  # the normal tail, not the 1/(B+1) floor
    assert matching.mde(1.0, 1) == pytest.approx(1.959964 + 0.841621, abs=1e-5)
    assert matching.mde(1.0, 4) > matching.mde(1.0, 1)


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


def _compare(seed, skew_b, parametrisation_b, rates_b=(0.5, 0.7, 1.0, 1.4, 2.0), n=1000, n_boot=200, target=0.02,
             paired=True):
    rng = np.random.default_rng(seed)
    world = World(n, rng)
    methods = []
    for name, skew, par, rates in (("a", 0.0, 1.0, (0.8, 1.0, 1.25)), ("b", skew_b, parametrisation_b, rates_b)):
        pilots = _pilots(rng, 2.0, par)
        grid = matching.choose_grid(lambda s: world.point(s, 2.0, skew, par), pilots, [target], rates, 0.01, 1000,
                                    max_ratio=1.5)
        methods.append(matching.Method(name, [grid[s] for s in sorted(grid)], pilots))
    return matching.analyse(methods, [target], _metric_fns(), "a", n_boot=n_boot, seed=seed, paired=paired)


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
        out = _compare(7, skew_b=0.2, parametrisation_b=1.0, rates_b=(0.8, 1.0, 1.25), paired=paired)
        widths[paired] = {c["metric"]: c["hi"] - c["lo"] for c in out["claims"]}
    for key in ("kl_kept", "fid"):
        assert widths[True][key] < 0.8 * widths[False][key], (key, widths)


def test_the_interval_carries_the_matchings_noise():
    """The s.e. of λ* is not zero; a target a method does not reach on its grid is held at the grid's end, and
    the row says so (not reached, every replicate clamped) instead of extrapolating."""
    out = _compare(3, skew_b=0.0, parametrisation_b=1.0)
    m = out["methods"][0]
    assert m["scale_star_ci"][0] < m["scale_star"] < m["scale_star_ci"][1] and m["reached"]
    rng = np.random.default_rng(0)
    world = World(400, rng)
    flat = matching.Method("a", [world.point(s, 2.0, 0.0) for s in (0.5, 0.7, 1.0)], [])
    other = matching.Method("b", [world.point(s, 2.0, 0.0) for s in (1.0, 2.0, 3.0)], [])
    res = matching.analyse([flat, other], [0.02], _metric_fns(), "b", n_boot=50)
    row = res["methods"][0]
    assert not row["reached"] and not row["identified"] and row["clamped"] == 1.0 and row["scale_star"] == 1.0
    assert row["eval_rate"] > 0.1


# --------------------------------------------------- 200-repeat simulations on a DNG-like plateau
class Plateau:
    """A DNG-like rate curve (7 % → a plateau near 1 % from λ ≈ 5 to 40 → 0.3 % by λ 150) on per-seed latents
    shared by every method on the same seeds: seed i is forbidden at λ when u_i < r(λ); its quality score is
    g_i + 0.1·(1 + h_i)·ln λ (+ ``shift``: a planted difference), so quality changes across the plateau
    (0.1 σ per unit of ln λ, as KL kept and FID do on MNIST)."""

    def __init__(self, n: int, rng: np.random.Generator):
        self.u, self.g, self.h = rng.random(n), rng.normal(size=n), 0.5 * rng.normal(size=n)

    @staticmethod
    def rate(lam: float) -> float:
        x = math.log(lam)
        return (0.002 + 0.09 / (1 + math.exp(4 * (x - math.log(2.5))))
                + 0.008 / (1 + math.exp(3 * (x - math.log(60)))))

    def point(self, lam: float, shift: float = 0.0) -> matching.Point:
        return matching.Point(lam, self.u < self.rate(lam), {"q": self.g + 0.1 * (1 + self.h) * math.log(lam) + shift})

    def pilots(self, rng: np.random.Generator, n: int = 300) -> list[tuple[float, int, int]]:
        """A pilot bisection's probes on their own seeds (the compare's pilot_n = 300)."""
        return [(s, int(rng.binomial(n, self.rate(s))), n) for s in (1, 2, 4, 8, 16, 32, 64, 128)]


def test_the_grid_brackets_the_band_and_leaves_no_gap_inside_it():
    """Placed by rate on the plateau: the grid reaches past both band edges on the evaluation seeds' own rates,
    and no two neighbours around the band are more than grid_max_ratio apart."""
    rng = np.random.default_rng(1)
    world = Plateau(1000, rng)
    grid = matching.choose_grid(None, world.pilots(rng), [0.01], (0.8, 1.0, 1.25), 0.01, 1000, max_ratio=1.5,
                                evaluate_many=lambda ss: [world.point(s) for s in ss])
    scales = sorted(grid)
    rates = [grid[s].forbidden.mean() for s in scales]
    assert rates[0] >= 0.02 and rates[-1] <= 0.005, list(zip(scales, rates))  # brackets [t/2, 2t]
    inside = [i for i, r in enumerate(rates) if 0.005 <= r <= 0.02]
    span = scales[max(inside[0] - 1, 0): inside[-1] + 2]
    assert max(b / a for a, b in zip(span, span[1:])) <= 1.5 * (1 + 1e-9), span


QUALITY = {"q": lambda p, idx: float(p.records["q"][idx].mean())}
SHIFT = 0.03  # the planted difference: ≈ 2.5 s.e. at N = 500


@pytest.mark.slow
def test_two_hundred_simulated_compares_resolve_no_a_a_difference_and_cover_a_planted_one():
    """Per repeat, one plateau world and three methods on its seeds, each with its own pilots and first-wave
    rates (0.8, 1, 1.25), (0.5, 0.7, 1, 1.4, 2), (0.6, 1, 1.6): b is a itself (A/A), c is a shifted by SHIFT.
    Over 200 repeats the A/A claim may be resolved (its own p < 0.05) in at most 5 % (the Wilson upper bound is
    in the message), and the 95 % interval of c − a must cover SHIFT in at least 93 %."""
    repeats, n = 200, 500
    false, covered = 0, 0
    for r in range(repeats):
        rng = np.random.default_rng(10_000 + r)
        world = Plateau(n, rng)
        methods = []
        for name, rates, shift in (("a", (0.8, 1.0, 1.25), 0.0), ("b", (0.5, 0.7, 1.0, 1.4, 2.0), 0.0),
                                   ("c", (0.6, 1.0, 1.6), SHIFT)):
            grid = matching.choose_grid(None, world.pilots(rng), [0.01], rates, 0.01, 1000, max_ratio=1.5,
                                        evaluate_many=lambda ss, shift=shift: [world.point(s, shift) for s in ss])
            methods.append(matching.Method(name, [grid[s] for s in sorted(grid)]))
        claims = {c["method"]: c for c in matching.analyse(methods, [0.01], QUALITY, "a", n_boot=100, seed=r)["claims"]}
        false += claims["b"]["p"] < 0.05
        covered += claims["c"]["lo"] <= SHIFT <= claims["c"]["hi"]
    rate, upper = false / repeats, _wilson_upper(false, repeats)
    assert rate <= 0.05, f"A/A resolved in {false}/{repeats} = {rate:.3f} (95 % upper bound {upper:.3f})"
    assert covered >= 0.93 * repeats, f"the interval covered the planted difference in {covered}/{repeats}"
    print(f"A/A resolved {false}/{repeats} (upper bound {upper:.3f}); planted covered {covered}/{repeats}")


def _wilson_upper(k: int, n: int) -> float:
    p, z = k / n, 1.959963984540054
    return (p + z * z / (2 * n) + z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / (1 + z * z / n)


@pytest.mark.slow
def test_the_planner_predicts_how_often_a_planted_difference_is_found():
    """σ₁ from five small pilot compares (N = 300) predicts, through ``power_at``, how often 120 compares at
    N = 600 resolve a planted shift; the observed rate lies within the simulation's own error of the prediction."""
    def compare(n, seed):
        rng = np.random.default_rng(seed)
        world = Plateau(n, rng)
        methods = []
        for name, rates, shift in (("a", (0.8, 1.0, 1.25), 0.0), ("c", (0.6, 1.0, 1.6), SHIFT)):
            grid = matching.choose_grid(None, world.pilots(rng), [0.01], rates, 0.01, 1000, max_ratio=1.5,
                                        evaluate_many=lambda ss, shift=shift: [world.point(s, shift) for s in ss])
            methods.append(matching.Method(name, [grid[s] for s in sorted(grid)]))
        return matching.analyse(methods, [0.01], QUALITY, "a", n_boot=100, seed=seed)["claims"][0]

    sigma1 = float(np.mean([compare(300, 50_000 + r)["se"] * math.sqrt(300) for r in range(5)]))
    predicted = matching.power_at(sigma1, SHIFT, 600, claims=1)
    repeats = 120
    found = sum(compare(600, 60_000 + r)["resolved"] for r in range(repeats)) / repeats
    tolerance = 2 * math.sqrt(predicted * (1 - predicted) / repeats) + 0.05  # binomial error + σ₁'s own
    print(f"planner: predicted power {predicted:.3f}, found {found:.3f} over {repeats} (tolerance {tolerance:.3f})")
    assert abs(found - predicted) <= tolerance, (found, predicted, tolerance)
    assert matching.power_at(sigma1, SHIFT, matching.required_n(sigma1, SHIFT, 1), 1) >= 0.8
    assert matching.power_at(sigma1, SHIFT, matching.required_n(sigma1, SHIFT, 1) - 1, 1) < 0.8
