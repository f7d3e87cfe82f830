"""The stratified at-risk rate estimator (dng_cli/stratified.py) on a simulated seed population with known truth:
unbiased (mean over repeats within 2 s.e. of the truth) and its variance formula matches the repeats' variance."""

import math

import numpy as np
import pytest

from dng_cli import stratified


def simulate(w, r_a, r_b, pool, n_a, n_b, repeats, seed=0):
    """Each repeat: a pool of seeds whose unguided chains mark them at risk (prob. w), then n_a guided chains from the
    pool's at-risk seeds and n_b from the rest, drawn without replacement; a seed's guided outcome is Bernoulli(r_A)
    or Bernoulli(r_B), fixed per seed (a chain is a function of its seed)."""
    rng = np.random.default_rng(seed)
    estimates = []
    for _ in range(repeats):
        risk = rng.random(pool) < w
        guided = np.where(risk, rng.random(pool) < r_a, rng.random(pool) < r_b)
        idx_a, idx_b = np.flatnonzero(risk), np.flatnonzero(~risk)
        if len(idx_a) < n_a or len(idx_b) < n_b:
            continue  # (a pool too small for the design: not drawn at these settings' sizes in practice)
        a = guided[rng.choice(idx_a, n_a, replace=False)]
        b = guided[rng.choice(idx_b, n_b, replace=False)]
        estimates.append(stratified.rate(a, b, len(idx_a) / pool, pool).rate)
    return np.array(estimates)


@pytest.mark.parametrize("w, r_a, r_b, pool, n_a, n_b", [
    (0.07, 0.14, 0.003, 5000, 200, 100),   # MNIST-like: 7 % at risk, 1 % guided rate
    (0.3, 0.9, 0.05, 200, 30, 50),          # a small pool: its own term is half the variance
])
def test_unbiased_and_the_variance_formula_holds(w, r_a, r_b, pool, n_a, n_b):
    est = simulate(w, r_a, r_b, pool, n_a, n_b, repeats=3000)
    assert len(est) >= 2900
    truth = w * r_a + (1 - w) * r_b
    se_mean = est.std(ddof=1) / math.sqrt(len(est))
    assert abs(est.mean() - truth) <= 2 * se_mean
    formula = stratified.variance(w, r_a, r_b, n_a, n_b, pool)
    # the repeats' variance has relative s.e. ≈ sqrt(2/R) (≈ 2.6 %) for near-normal estimates; 15 % covers the
    # discreteness of small strata and fails for a wrong weight (w instead of w², or the pool term left out)
    assert est.var(ddof=1) == pytest.approx(formula, rel=0.15)


def test_the_pool_term_is_needed_for_a_small_pool():
    est = simulate(0.3, 0.9, 0.05, 200, 30, 50, repeats=3000, seed=1)
    without_pool = stratified.variance(0.3, 0.9, 0.05, 30, 50, None)
    assert est.var(ddof=1) > 1.5 * without_pool


def test_neyman_allocation_and_the_gain_over_plain_sampling():
    # nothing forbidden outside the at-risk stratum: all but the floor go to it, and the variance per chain falls
    # by 1/w · (1 - r)/(1 - r_A) against plain sampling of the same n
    n_a, n_b = stratified.neyman(500, 0.07, 0.01 / 0.07, 0.0)
    assert (n_a, n_b) == (499, 1)
    w, r_a = 0.07, 0.01 / 0.07
    gain = stratified.plain_variance(0.01, 500) / stratified.variance(w, r_a, 0.0, 500, 1)
    assert gain == pytest.approx(0.99 / (w * (1 - r_a)), rel=1e-9)
    assert 15 < gain < 17
    # equal S_h·W_h: an even split
    assert stratified.neyman(100, 0.5, 0.2, 0.2) == (50, 50)
    with pytest.raises(ValueError, match="at least one guided chain"):
        stratified.rate([], [True], 0.2)


def test_the_before_after_script_on_records(tmp_path):
    """scripts/stratified_rate.py: strata from an unguided run's records, stratum counts per grid point, the pooled
    share of forbidden outcomes from seeds not at risk."""
    import json
    import subprocess
    import sys

    from conftest import REPO

    def run(folder, classes, scale=None):
        folder.mkdir(parents=True)
        np.savez(folder / "records.npz", seeds=np.arange(len(classes)), classes=np.array(classes, np.int16))
        (folder / "metrics.json").write_text(json.dumps({"forbidden": [0], "guidance_scale": scale}))

    unguided = [0] * 10 + [1] * 90  # seeds 0-9 at risk
    run(tmp_path / "unguided", unguided)
    guided = [0] * 2 + [1] * 8 + [0] + [1] * 89  # 2 at-risk seeds and 1 other seed forbidden: 3 %
    run(tmp_path / "cmp" / "eval" / "dng" / "scale=4", guided, 4.0)
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "stratified_rate.py"), str(tmp_path / "unguided"),
                          str(tmp_path / "cmp"), "--target", "0.02", "--pool", "1000"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    (point,) = out["points"]
    assert out["w"] == 0.1 and point["at_risk"] == [2, 10] and point["rest"] == [1, 90] and point["rate"] == 0.03
    assert point["se_plain"] == pytest.approx(math.sqrt(0.03 * 0.97 / 100))
    assert out["pooled"]["dng"]["q"] == pytest.approx(1 / 3)
    assert "| dng | 4 | 3.0 % | 2/10 | 1/90 |" in res.stdout
