"""Methods compared at matched safety: one estimand, valid on plateaus, with intervals that include the matching.

Estimand — band-averaged matched quality (BAM). For method m and rate r, λ_m(r) is where m's forbidden rate
equals r: the rate falls with λ, so it is fitted by a decreasing (isotonic, weights n) curve against log λ over
m's evaluation grid (shared seeds only: pilots place the grid and are not evidence), and λ_m(r) is where the
fitted curve crosses r. Q_m(r) is a metric interpolated at λ_m(r). Both interpolations are in log λ, by the
shape-preserving cubic (PCHIP) through the grid points, and never beyond the grid: a crossing outside it is clamped to the grid end, and how often that
happened is reported. The claim for target t is

    Δ = (1/ln f²) ∫_{t/f}^{t·f} [Q_A(r) − Q_B(r)] d ln r        (f = ``band_factor``, 2 by default),

the matched difference averaged over log-spaced rates around t (trapezoid over ``BAND_RATES`` points). A method
on a plateau (its rate ≈ t over a wide range of λ while quality changes across it) moves Δ continuously, so the
same estimand serves a plateau method and a steep one and the bootstrap stays valid. The single-t matched value
Q_m(t) and λ_m(t) are reported beside it, as secondary columns.

Uncertainty: a paired bootstrap over the evaluation seeds. One replicate resamples the seed indices once — the
same indices for every method, grid point, rate and metric, since all methods share their seeds — and redoes the
rate fit, the crossings and the interpolation. Percentile intervals; p-values are studentized and centred
(|Δ*−Δ|/se ≥ |Δ|/se); one pre-registered primary metric forms the tested family (targets × pairs), the other
metrics a secondary family; within each, Westfall–Young max-T step-down adjusted p over the joint replicates
(exact for correlated claims). When no replicate reaches a claim's statistic the p-value is the normal tail,
Bonferroni over the claims still in the step (so the bootstrap's 1/(B+1) floor never decides). Every claim
carries its minimum detectable effect at the N it ran (80 % power at the family's level): an unresolved claim is
"inconclusive at N (MDE x)", not "no difference".

Pure math over arrays (numpy); what a metric is comes in as a callable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Callable, Sequence

import numpy as np

MIN_IDENTIFIED = 0.95  # diagnostic: λ_m(t) inside the grid in at least this share of replicates
BAND_RATES = 9
ALPHA, POWER = 0.05, 0.8
MARGIN = 1.5  # the grid brackets [t/(f·MARGIN), t·f·MARGIN], so that few bootstrap replicates clamp at the band's ends


@dataclass
class Point:
    """One evaluation of a method at ``scale`` on the shared seeds: per-seed records."""

    scale: float
    forbidden: np.ndarray  # [N] bool: classified as a forbidden class
    records: dict = field(default_factory=dict)  # what the metric callables read (classes, features, ...)


@dataclass
class Method:
    name: str
    points: list[Point]  # the grid, all on the same N seeds (same order)
    pilots: list[tuple[float, int, int]] = field(default_factory=list)  # (scale, forbidden, n): placed the grid only


Metric = Callable[[Point, np.ndarray], float]  # (point, seed indices) -> value


# --------------------------------------------------------------------------------- the rate curve
def isotonic_decreasing(y: Sequence[float], w: Sequence[float]) -> np.ndarray:
    """Weighted least-squares non-increasing fit of ``y`` (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for yi, wi in zip(y, w):
        blocks.append([float(yi), float(wi), 1])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            m2, w2, c2 = blocks.pop()
            m1, w1, c1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, c1 + c2])
    return np.concatenate([np.full(c, m) for m, _, c in blocks])


def rate_curve(scales: Sequence[float], forbidden: Sequence[float], n: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(sorted log λ, fitted rate): the isotonic fit of forbidden/n against log λ, weights n (probes at
    one scale are pooled)."""
    by_scale: dict[float, list[float]] = {}
    for s, k, m in zip(scales, forbidden, n):
        acc = by_scale.setdefault(float(s), [0.0, 0.0])
        acc[0] += k
        acc[1] += m
    xs = sorted(by_scale)
    ks, ns = np.array([by_scale[s][0] for s in xs]), np.array([by_scale[s][1] for s in xs])
    return np.log(xs), isotonic_decreasing(ks / ns, ns)


def crossing(log_scales: np.ndarray, fitted: np.ndarray, target: float) -> float | None:
    """λ where the fitted (non-increasing) rate crosses ``target``, linear in log λ; None when the
    fitted rate is on one side of it everywhere."""
    below = np.nonzero(fitted <= target)[0]
    if len(below) == 0 or below[0] == 0:
        return None
    j = below[0]
    a, b = fitted[j - 1], fitted[j]
    frac = (a - target) / (a - b)
    return float(math.exp(log_scales[j - 1] + frac * (log_scales[j] - log_scales[j - 1])))


def matched_scale(log_scales: np.ndarray, fitted: np.ndarray, rate: float) -> tuple[float, bool]:
    """(λ_m(rate), clamped): the crossing, or the grid end the fitted rate stays on the wrong side of (the
    largest λ when the rate is never reached, the smallest when every point is already below it)."""
    lam = crossing(log_scales, fitted, rate)
    if lam is not None:
        return lam, False
    return float(math.exp(log_scales[0] if fitted[0] <= rate else log_scales[-1])), True


def band_rates(target: float, factor: float, k: int = BAND_RATES) -> np.ndarray:
    """``k`` log-spaced rates over [target/factor, target·factor]."""
    return np.exp(np.linspace(math.log(target / factor), math.log(target * factor), k))


def band_weights(k: int = BAND_RATES) -> np.ndarray:
    """Trapezoid weights of the band average in ln r (sum 1)."""
    w = np.ones(k)
    if k > 1:
        w[0] = w[-1] = 0.5
    return w / w.sum()


def _edge_slope(h0: float, h1: float, m0: float, m1: float) -> float:
    """PCHIP's one-sided three-point end slope, kept shape-preserving (as scipy's PchipInterpolator)."""
    d = ((2 * h0 + h1) * m0 - h0 * m1) / (h0 + h1)
    if np.sign(d) != np.sign(m0):
        return 0.0
    if np.sign(m0) != np.sign(m1) and abs(d) > abs(3 * m0):
        return 3 * m0
    return float(d)


def pchip(x: np.ndarray, y: np.ndarray, at: np.ndarray) -> np.ndarray:
    """The shape-preserving piecewise cubic Hermite interpolant (Fritsch–Carlson; equal to scipy's
    PchipInterpolator) through (x, y), at ``at`` inside [x0, xn]: monotone data stay monotone, no overshoot."""
    h, delta = np.diff(x), np.diff(y) / np.diff(x)
    d = np.zeros(len(x))
    w1, w2 = 2 * h[1:] + h[:-1], h[1:] + 2 * h[:-1]
    same = delta[:-1] * delta[1:] > 0
    safe0, safe1 = np.where(same, delta[:-1], 1.0), np.where(same, delta[1:], 1.0)
    d[1:-1] = np.where(same, (w1 + w2) / (w1 / safe0 + w2 / safe1), 0.0)  # weighted harmonic mean of the slopes
    d[0], d[-1] = _edge_slope(h[0], h[1], delta[0], delta[1]), _edge_slope(h[-1], h[-2], delta[-1], delta[-2])
    i = np.clip(np.searchsorted(x, at, side="right") - 1, 0, len(x) - 2)
    t = (at - x[i]) / h[i]
    t2, t3 = t * t, t * t * t
    return ((2 * t3 - 3 * t2 + 1) * y[i] + (t3 - 2 * t2 + t) * h[i] * d[i] + (-2 * t3 + 3 * t2) * y[i + 1]
            + (t3 - t2) * h[i] * d[i + 1])


def interpolate_log(x: np.ndarray, y: Sequence[float], at: np.ndarray) -> np.ndarray:
    """``y`` (given at the sorted log λ ``x``) at log λ ``at`` within the grid: the shape-preserving cubic
    (PCHIP) through the points, linear with two. Its error falls as h³ with the grid's spacing where linear
    interpolation's falls as h²: what keeps two methods' different grids from biasing a paired difference (the
    A/A simulations in tests/test_matching.py)."""
    at = np.clip(at, x[0], x[-1])
    y = np.asarray(y, dtype=float)
    return np.interp(at, x, y) if len(x) < 3 else pchip(np.asarray(x, dtype=float), y, at)


def dense_curve(x: np.ndarray, fitted: np.ndarray, per_gap: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The fitted rate as the same cubic, on ``per_gap`` points per grid gap (so that ``crossing``'s linear
    inversion follows it); non-increasing like the fit, as PCHIP keeps monotone data monotone."""
    if len(x) < 3:
        return x, fitted
    dense = np.unique(np.concatenate([x, np.linspace(x[0], x[-1], per_gap * (len(x) - 1) + 1)]))
    return dense, np.minimum.accumulate(interpolate_log(x, fitted, dense))


# ------------------------------------------------------------------------------------------ the grid
def round_scale(scale: float, digits: int = 3) -> float:
    """Scales rounded to ``digits`` significant digits: a re-run asks for the very same points."""
    return float(f"{scale:.{digits}g}")


def _placed(x: np.ndarray, f: np.ndarray, rate: float) -> float:
    """Where a fit puts ``rate``: the crossing, else the probe whose fitted rate is nearest to it."""
    lam = crossing(x, f, rate)
    return lam if lam is not None else float(np.exp(x[int(np.argmin(np.abs(f - rate)))]))


def choose_grid(evaluate: Callable[[float], Point], pilots: list[tuple[float, int, int]], targets: Sequence[float],
                rates: Sequence[float], lo: float, hi: float, extend: int = 4,
                evaluate_many: Callable[[list[float]], list[Point]] | None = None, band_factor: float = 2.0,
                max_ratio: float = 2.0, initial: dict[float, Point] | None = None) -> dict[float, Point]:
    """The evaluation grid of one method, placed by rate. First wave: where the pilot fit puts t·a for every
    target t and every multiple a in ``rates`` (pilots place the grid; they are not evidence). Then, on the fit of
    the evaluation points themselves, waves until (i) the band [t/f, t·f] is bracketed with a margin (``MARGIN``) — a point below the grid while its smallest λ is
    already under t·f, above it while its largest λ is still over t/f, a factor s, s², s³, … away (s = max(2,
    ``max_ratio``); at most ``extend`` per side and target: pilots of a few hundred seeds can misplace a plateau
    by a factor 10) — and (ii) no gap inside the band exceeds ``max_ratio`` in λ (the
    geometric midpoint is added). ``evaluate_many(scales)`` runs a wave at once (launcher jobs); depends only on
    results, so a re-run asks for the same points. ``initial`` (finished points on the same seeds, e.g. an earlier
    compare's grid) replaces the pilot wave: the waves then only bracket and fill around them."""
    points: dict[float, Point] = dict(initial or {})
    step = max(2.0, max_ratio)

    def clamp(scale: float) -> float:
        return round_scale(min(max(scale, lo), hi))

    def run(scales: list[float]) -> None:
        todo = [s for s in dict.fromkeys(scales) if s not in points]
        if not todo:
            return
        if evaluate_many is not None:
            points.update(zip(todo, evaluate_many(todo)))
        else:
            for s in todo:
                points[s] = evaluate(s)

    first = []
    if pilots and not points:
        x, f = rate_curve(*zip(*pilots))
        first = [clamp(_placed(x, f, t * a)) for t in targets for a in rates]
    run(first)
    extended = {(t, side): 0 for t in targets for side in (-1, 1)}
    for _ in range(64):  # each wave adds points or ends the loop; 64 waves is far beyond any real grid
        if not points:
            break
        grid = sorted(points)
        x, f = rate_curve(grid, [float(points[s].forbidden.sum()) for s in grid],
                          [float(len(points[s].forbidden)) for s in grid])
        wave = []
        for t in targets:
            if f[0] < t * band_factor * MARGIN and extended[(t, -1)] < extend:
                wave.append(clamp(grid[0] / step ** (extended[(t, -1)] + 1)))  # 2, 4, 8, …
                extended[(t, -1)] += 1
            if f[-1] > t / (band_factor * MARGIN) and extended[(t, 1)] < extend:
                wave.append(clamp(grid[-1] * step ** (extended[(t, 1)] + 1)))
                extended[(t, 1)] += 1
            a, b = matched_scale(x, f, t * band_factor)[0], matched_scale(x, f, t / band_factor)[0]
            inside = [s for s in grid if a <= s <= b]
            span = ([max([s for s in grid if s <= a], default=grid[0])] + inside
                    + [min([s for s in grid if s >= b], default=grid[-1])])
            for u, v in zip(span, span[1:]):
                if v / u > max_ratio * (1 + 1e-9):
                    wave.append(clamp(math.sqrt(u * v)))
        wave = [s for s in dict.fromkeys(wave) if s not in points]
        if not wave:
            break
        run(wave)
    return points


# ------------------------------------------------------------------------------------- statistics
def _normal_tail(z: float) -> float:
    return 2.0 * (1.0 - NormalDist().cdf(z))


def max_t(estimates: np.ndarray, replicates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(raw p, Westfall–Young max-T step-down adjusted p) of "each difference is 0", from the point estimates
    [m] and the joint bootstrap replicates [m, B] (the same resampled seeds across claims, so the correlation
    between claims is kept). Statistic |Δ|/se against the centred replicates |Δ* − Δ|/se. When no replicate
    reaches a statistic, the normal tail (Bonferroni over the claims left in the step) replaces the empty count."""
    m, b = replicates.shape
    se = replicates.std(axis=1, ddof=1) if b >= 2 else np.zeros(m)
    ok = se > 0
    t_obs = np.where(ok, np.abs(estimates) / np.where(ok, se, 1.0), 0.0)
    t_boot = np.where(ok[:, None], np.abs(replicates - estimates[:, None]) / np.where(ok, se, 1.0)[:, None], 0.0)
    raw = np.ones(m)
    for j in range(m):
        if ok[j]:
            hits = int(np.sum(t_boot[j] >= t_obs[j]))
            raw[j] = (hits + 1) / (b + 1) if hits else min(1.0, _normal_tail(t_obs[j]))
    order = [j for j in np.argsort(-t_obs, kind="stable")]
    adjusted = np.ones(m)
    running = 0.0
    for k, j in enumerate(order):
        if not ok[j]:
            p = 1.0
        else:
            rest = order[k:]
            hits = int(np.sum(t_boot[rest].max(axis=0) >= t_obs[j]))
            p = (hits + 1) / (b + 1) if hits else min(1.0, len(rest) * _normal_tail(t_obs[j]))
        running = max(running, p)
        adjusted[j] = min(1.0, running)
    return raw, adjusted


def mde(se: float, claims: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """Minimum detectable effect: the difference a two-sided test at the family's per-claim level (α/claims,
    Bonferroni: what max-T gives for uncorrelated claims, conservative otherwise) finds with ``power``."""
    nd = NormalDist()
    return float((nd.inv_cdf(1 - alpha / (2 * max(claims, 1))) + nd.inv_cdf(power)) * se)


def _z(claims: int, alpha: float, power: float) -> float:
    nd = NormalDist()
    return nd.inv_cdf(1 - alpha / (2 * max(claims, 1))) + nd.inv_cdf(power)


def required_n(sigma1: float, effect: float, claims: int, alpha: float = ALPHA, power: float = POWER) -> int:
    """Samples per grid point for ``power`` to resolve ``effect`` when one sample's contribution to the claim has
    standard deviation ``sigma1`` (s.e. = σ₁/√N, as the paired bootstrap's s.e. scales)."""
    return int(math.ceil((_z(claims, alpha, power) * sigma1 / abs(effect)) ** 2))


def power_at(sigma1: float, effect: float, n: int, claims: int, alpha: float = ALPHA) -> float:
    """The chance that a claim of true size ``effect`` is resolved at N = ``n`` (normal approximation)."""
    nd = NormalDist()
    z = nd.inv_cdf(1 - alpha / (2 * max(claims, 1)))
    return float(nd.cdf(abs(effect) * math.sqrt(n) / sigma1 - z))


# --------------------------------------------------------------------------------------- analysis
class _Replicate:
    """One bootstrap replicate: seed indices (shared by every method; ``independent`` gives each method its
    own, for comparison only); fits and metric values cached."""

    def __init__(self, idx: np.ndarray, rng: np.random.Generator | None, independent: bool = False):
        self.shared, self.rng, self.cache, self.independent, self.own = idx, rng, {}, independent, {}

    def idx(self, method: str) -> np.ndarray:
        if not self.independent or self.rng is None:
            return self.shared
        if method not in self.own:
            self.own[method] = self.rng.integers(0, len(self.shared), len(self.shared))
        return self.own[method]

    def value(self, key, compute: Callable[[], float]) -> float:
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]


def _fit(method: Method, rep: _Replicate) -> tuple[np.ndarray, np.ndarray]:
    """The isotonic rate fit over the method's evaluation grid (pilots excluded) in this replicate."""
    def compute():
        idx = rep.idx(method.name)
        pts = sorted(method.points, key=lambda p: p.scale)
        return rate_curve([p.scale for p in pts], [float(p.forbidden[idx].sum()) for p in pts],
                          [float(len(idx))] * len(pts))
    return rep.value(("fit", method.name), compute)


def _matched(method: Method, rates: np.ndarray, metrics: dict[str, Metric], rep: _Replicate) -> tuple:
    """(λ_m(r) [k], clamped [k], {metric: Q_m(r) [k]}) in one replicate."""
    dense = dense_curve(*_fit(method, rep))
    found = [matched_scale(*dense, float(r)) for r in rates]
    lams = np.array([lam for lam, _ in found])
    clamped = np.array([c for _, c in found])
    pts = sorted(method.points, key=lambda p: p.scale)
    grid = np.log([p.scale for p in pts])
    values = {}
    for name, fn in metrics.items():
        vals = [rep.value((method.name, p.scale, name), lambda p=p: fn(p, rep.idx(method.name))) for p in pts]
        values[name] = interpolate_log(grid, vals, np.log(lams))
    return lams, clamped, values


def _eval_rate(method: Method, scale: float) -> float:
    """The evaluation seeds' raw forbidden rate at ``scale``, linear in log λ between grid points."""
    pts = sorted(method.points, key=lambda p: p.scale)
    return float(np.interp(math.log(scale), np.log([p.scale for p in pts]), [p.forbidden.mean() for p in pts]))


def analyse(methods: list[Method], targets: Sequence[float], metrics: dict[str, Metric], reference: str,
            n_boot: int = 1000, seed: int = 0, band_factor: float = 2.0, paired: bool = True,
            primary: str | None = None) -> dict:
    """Every method at every target (band-averaged and single-t matched metrics, λ*(t), the evaluation seeds'
    rate there, clamping) and every (method − reference) band-averaged difference per metric, with paired
    bootstrap intervals, raw and max-T adjusted p (``primary`` — default the first metric — is the tested
    family, the rest a secondary one) and MDEs (see the module docstring). ``paired=False`` resamples each method's
    seeds independently — the wrong interval for shared seeds, kept to show it."""
    n = len(methods[0].points[0].forbidden)
    if any(len(p.forbidden) != n for m in methods for p in m.points):
        raise ValueError("every grid point must hold the same seeds")
    primary = primary or next(iter(metrics))
    if primary not in metrics:
        raise ValueError(f"primary metric {primary!r} is not among the compared metrics {list(metrics)}")
    rng = np.random.default_rng(seed)
    reps = [_Replicate(np.arange(n), None)]
    for _ in range(n_boot):
        reps.append(_Replicate(rng.integers(0, n, n), np.random.default_rng(rng.integers(1 << 62)), not paired))
    weights = band_weights()
    out_methods, claims, diffs = [], [], []
    for t in targets:
        rates = np.concatenate([band_rates(t, band_factor), [t]])  # the band, then t itself (the matched column)
        per = {}
        for m in methods:
            runs = [_matched(m, rates, metrics, r) for r in reps]
            lam_t = np.array([lams[-1] for lams, _, _ in runs])
            clamped_t = np.array([c[-1] for _, c, _ in runs])
            clamped_band = np.array([c[:-1] for _, c, _ in runs])
            bam = {k: np.array([v[k][:-1] @ weights for _, _, v in runs]) for k in metrics}
            matched = {k: np.array([v[k][-1] for _, _, v in runs]) for k in metrics}
            x, f = _fit(m, reps[0])
            band_lams = runs[0][0][[0, BAND_RATES - 1]]
            inside = float(np.mean(~clamped_t[1:])) if n_boot else float(not clamped_t[0])
            entry = {"target": t, "method": m.name, "grid": sorted(p.scale for p in m.points),
                     "grid_rates": [float(p.forbidden.mean()) for p in sorted(m.points, key=lambda p: p.scale)],
                     "identified": bool(inside >= MIN_IDENTIFIED and not clamped_t[0]),
                     "identified_fraction": inside,
                     "reached": bool(f[-1] <= t),
                     "scale_star": float(lam_t[0]), "scale_star_clamped": bool(clamped_t[0]),
                     "scale_star_ci": _percentiles(lam_t[1:]),
                     "eval_rate": _eval_rate(m, float(lam_t[0])),
                     "band": [t / band_factor, t * band_factor],
                     "band_scales": sorted(float(v) for v in band_lams),
                     "clamped": float(np.mean(clamped_band[1:])) if n_boot else float(np.mean(clamped_band[0])),
                     "metrics": {k: _summary(v) for k, v in bam.items()},
                     "matched": {k: _summary(v) for k, v in matched.items()}}
            per[m.name] = (bam, matched, entry["clamped"])
            out_methods.append(entry)
        ref_bam, ref_matched, ref_clamped = per[reference]
        for m in methods:
            if m.name == reference:
                continue
            bam, matched, clamped = per[m.name]
            for k in metrics:
                d = bam[k] - ref_bam[k]
                claim = {"target": t, "method": m.name, "reference": reference, "metric": k,
                         "family": "primary" if k == primary else "secondary", "estimand": "band-averaged",
                         "band": [t / band_factor, t * band_factor], **_difference(d),
                         "matched_diff": float(matched[k][0] - ref_matched[k][0]),
                         "clamped": max(clamped, ref_clamped)}
                claims.append(claim)
                diffs.append(d)
    for family in ("primary", "secondary"):
        members = [i for i, c in enumerate(claims) if c["family"] == family]
        if not members:
            continue
        est = np.array([diffs[i][0] for i in members])
        boot = np.array([diffs[i][1:] for i in members]).reshape(len(members), n_boot)
        raw, adj = max_t(est, boot) if n_boot >= 2 else (np.ones(len(members)), np.ones(len(members)))
        for i, p, pa in zip(members, raw, adj):
            c = claims[i]
            c.update(p=float(p), p_adj=float(pa), resolved=bool(pa < ALPHA and n_boot >= 2),
                     mde=None if c["se"] is None else mde(c["se"], len(members)), family_size=len(members))
    return {"n_seeds": n, "n_boot": n_boot, "reference": reference, "methods": out_methods, "claims": claims,
            "n_claims": sum(c["family"] == "primary" for c in claims), "primary": primary,
            "estimand": "band-averaged matched quality", "band_factor": band_factor, "band_rates": BAND_RATES,
            "adjustment": "Westfall-Young max-T step-down, per family", "paired": paired}


def empty(n_seeds: int, n_boot: int, reference: str) -> dict:
    """The analysis of a comparison in which no method has a grid (no target reached)."""
    return {"n_seeds": n_seeds, "n_boot": n_boot, "reference": reference, "methods": [], "claims": [], "n_claims": 0,
            "primary": None, "estimand": "band-averaged matched quality", "paired": True}


def _percentiles(values: np.ndarray) -> list[float] | None:
    v = values[~np.isnan(values)]
    return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if len(v) >= 2 else None


def _summary(values: np.ndarray) -> dict:
    boot = values[1:][~np.isnan(values[1:])]
    return {"value": None if np.isnan(values[0]) else float(values[0]),
            "se": float(np.std(boot, ddof=1)) if len(boot) >= 2 else None, "ci": _percentiles(values[1:])}


def _difference(d: np.ndarray) -> dict:
    """Point estimate (replicate 0), s.e., percentile interval over the replicates."""
    ci = _percentiles(d[1:])
    return {"diff": float(d[0]), "se": float(np.std(d[1:], ddof=1)) if len(d) > 2 else None,
            "lo": ci[0] if ci else None, "hi": ci[1] if ci else None, "replicates": int(len(d) - 1)}
