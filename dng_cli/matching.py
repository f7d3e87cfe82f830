"""Methods compared at matched safety, with intervals that include the matching itself.

Estimand: for method m and target t, a metric's value at the guidance scale λ_m(t) where m's TRUE
forbidden rate equals t. The rate falls with λ, so it is fitted by a decreasing (isotonic, weights n)
curve against log λ over every probe of the method — its evaluation grid on the shared seeds and its
pilot probes — and λ_m(t) is where the fitted curve crosses t (linear in log λ between the fitted points
around the crossing). Each metric is measured at every grid point and interpolated at λ_m(t) (linear in
log λ); a crossing outside the grid leaves the metric unidentified (no extrapolation).

Uncertainty: a paired bootstrap over the evaluation seeds. One replicate resamples the seed indices once
— the same indices for every method, grid point and metric, since all methods share their seeds — and
redraws each pilot probe's count (binomial: pilot seeds are independent of the evaluation seeds); then
the rate fit, the crossing and the interpolation are redone. The interval of a difference thus carries
the noise of the matching. p-values are two-sided bootstrap p-values, Holm-adjusted over every claim of
one comparison (targets × pairs × metrics); "resolved" means adjusted p < 0.05.

Identification: when the crossing is missing or outside the grid in more than 5 % of the replicates,
or the fitted rate stays within the Wilson half-width of t over more than a factor 2 in λ (a plateau),
the target is not identified for that method; its claims at t compare the two fronts instead — the mean
metric gap over a band of rates around t where both fronts were measured.

Pure math over arrays (numpy); what a metric is comes in as a callable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

Z95 = 1.959963984540054
MIN_IDENTIFIED = 0.95
EXTEND_ABOVE = 0.025  # the grid grows while more replicates than this cross outside it (half the 5 % allowed)
PLATEAU_SPAN = 2.0


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
    pilots: list[tuple[float, int, int]] = field(default_factory=list)  # (scale, forbidden, n) on pilot seeds


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


def plateau(log_scales: np.ndarray, fitted: np.ndarray, target: float, n: int) -> tuple[float, float] | None:
    """(λ_lo, λ_hi) when the fitted rate stays within the Wilson half-width of ``target`` (at ``n``
    samples) over more than a factor ``PLATEAU_SPAN`` in λ — the target is then not identified."""
    half = Z95 * math.sqrt(max(target * (1 - target), 1.0 / n) / n)
    near = np.abs(fitted - target) <= half
    best = None
    i = 0
    while i < len(near):
        if near[i]:
            j = i
            while j + 1 < len(near) and near[j + 1]:
                j += 1
            span = (float(math.exp(log_scales[i])), float(math.exp(log_scales[j])))
            if span[1] / span[0] > PLATEAU_SPAN and (best is None or span[1] / span[0] > best[1] / best[0]):
                best = span
            i = j + 1
        else:
            i += 1
    return best


def interpolate(scales: Sequence[float], values: Sequence[float], at: float) -> float:
    """Linear in log λ between the grid points around ``at`` (which lies within the grid)."""
    x = np.log(np.asarray(scales, dtype=float))
    return float(np.interp(math.log(at), x, np.asarray(values, dtype=float)))


# ------------------------------------------------------------------------------------------ the grid
def round_scale(scale: float, digits: int = 3) -> float:
    """Scales rounded to ``digits`` significant digits: a re-run asks for the very same points."""
    return float(f"{scale:.{digits}g}")


def outside_grid(points: list[Point], pilots: list[tuple[float, int, int]], target: float, n_boot: int = 200,
                 seed: int = 0) -> tuple[float, float]:
    """Fractions of rate-only bootstrap replicates (grid seeds resampled, pilot counts redrawn) whose
    crossing of ``target`` falls below and above the grid (no crossing: the side the fitted rate is on)."""
    rng = np.random.default_rng(seed)
    n = len(points[0].forbidden)
    grid = sorted(p.scale for p in points)
    below = above = 0
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        scales = [p.scale for p in points] + [s for s, _, _ in pilots]
        ks = [float(p.forbidden[idx].sum()) for p in points] + [float(rng.binomial(m, k / m)) for _, k, m in pilots]
        ns = [float(n)] * len(points) + [float(m) for _, _, m in pilots]
        x, f = rate_curve(scales, ks, ns)
        lam = crossing(x, f, target)
        if lam is None:
            below += bool(f[0] <= target)
            above += bool(f[0] > target)
        else:
            below += lam < grid[0]
            above += lam > grid[-1]
    return below / n_boot, above / n_boot


def choose_grid(evaluate: Callable[[float], Point], pilots: list[tuple[float, int, int]], targets: Sequence[float],
                factors: Sequence[float], lo: float, hi: float, extend: int = 2,
                evaluate_many: Callable[[list[float]], list[Point]] | None = None) -> dict[float, Point]:
    """The evaluation grid of one method: λ0(t)·factors for every target t, λ0 where the isotonic fit of
    the pilot rates crosses t; then, while more than 2.5 % of rate-only bootstrap replicates put the crossing
    below (above) the grid, a point one grid step below (above) it — at most ``extend`` per target.
    ``evaluate(scale)`` runs (or reuses) an evaluation; ``evaluate_many(scales)``, when given, runs the first
    grid (every target's λ0·factors) at once (as launcher jobs) — the same points as one by one. Depends only
    on results, so a re-run asks for the same points."""
    points: dict[float, Point] = {}
    step = max(factors) / min(factors) if max(factors) > min(factors) else 1.25

    def at(scale: float) -> None:
        scale = round_scale(min(max(scale, lo), hi))
        if scale not in points:
            points[scale] = evaluate(scale)

    centers, first = {}, []
    for t in targets:
        if pilots:
            x, f = rate_curve(*zip(*pilots))
            centers[t] = crossing(x, f, t)
            if centers[t] is None:  # the pilots do not cross t: start at the probe nearest to it
                centers[t] = float(np.exp(x[int(np.argmin(np.abs(f - t)))]))
            for factor in factors:
                scale = round_scale(min(max(centers[t] * factor, lo), hi))
                if scale not in first:
                    first.append(scale)
    if evaluate_many is not None and first:
        points.update(zip(first, evaluate_many(first)))
    for scale in first:
        at(scale)
    for t in centers:
        for _ in range(extend):
            grid = sorted(points)
            below, above = outside_grid([points[s] for s in grid], pilots, t)
            if max(below, above) <= EXTEND_ABOVE:
                break
            before = len(points)
            at(grid[0] / step if below >= above else grid[-1] * step)
            if len(points) == before:  # clamped to the range end, already there
                break
    return points


# ------------------------------------------------------------------------------------- statistics
def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error control, any dependence)."""
    p = np.asarray(pvalues, dtype=float)
    order = np.argsort(p)
    m = len(p)
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, (m - rank) * p[i])
        adjusted[i] = min(1.0, running)
    return adjusted.tolist()


def bootstrap_p(diffs: np.ndarray) -> float:
    """Two-sided bootstrap p-value of "the difference is 0": twice the smaller tail, (k+1)/(B+1)."""
    b = len(diffs)
    if b == 0:
        return 1.0
    low, high = (np.sum(diffs <= 0) + 1) / (b + 1), (np.sum(diffs >= 0) + 1) / (b + 1)
    return float(min(1.0, 2 * min(low, high)))


# --------------------------------------------------------------------------------------- analysis
class _Replicate:
    """One bootstrap replicate: seed indices (shared by every method; ``independent`` gives each method
    its own, for comparison only) and redrawn pilot counts; metric values cached."""

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
    def compute():
        scales, ks, ns = [], [], []
        idx = rep.idx(method.name)
        for p in method.points:
            scales.append(p.scale)
            ks.append(float(p.forbidden[idx].sum()))
            ns.append(float(len(idx)))
        for s, k, n in method.pilots:
            scales.append(s)
            ks.append(float(k if rep.rng is None else rep.rng.binomial(n, k / n)))
            ns.append(float(n))
        return rate_curve(scales, ks, ns)
    return rep.value(("fit", method.name), compute)


def _at_target(method: Method, target: float, metrics: dict[str, Metric], rep: _Replicate) -> tuple[float | None, dict]:
    """(λ*, {metric: value at λ*}) in one replicate; λ* None (and no values) when not identified."""
    x, f = _fit(method, rep)
    lam = crossing(x, f, target)
    grid = sorted(p.scale for p in method.points)
    if lam is None or not grid[0] <= lam <= grid[-1]:
        return None, {}
    points = sorted(method.points, key=lambda p: p.scale)
    values = {}
    for name, fn in metrics.items():
        vals = [rep.value((method.name, p.scale, name), lambda p=p: fn(p, rep.idx(method.name))) for p in points]
        values[name] = interpolate(grid, vals, lam)
    return lam, values


def _front(method: Method, metric: str, fn: Metric, rep: _Replicate) -> tuple[np.ndarray, np.ndarray]:
    """(rate, metric) at each grid point, sorted by rate."""
    pts = sorted(method.points, key=lambda p: p.scale)
    idx = rep.idx(method.name)
    rates = np.array([p.forbidden[idx].mean() for p in pts])
    vals = np.array([rep.value((method.name, p.scale, metric), lambda p=p: fn(p, idx)) for p in pts])
    order = np.argsort(rates, kind="stable")
    return rates[order], vals[order]


def _band_gap(a: Method, b: Method, metric: str, fn: Metric, band: tuple[float, float], rep: _Replicate) -> float:
    ra, va = _front(a, metric, fn, rep)
    rb, vb = _front(b, metric, fn, rep)
    rates = np.linspace(band[0], band[1], 5)
    return float(np.mean(np.interp(rates, ra, va) - np.interp(rates, rb, vb)))


def analyse(methods: list[Method], targets: Sequence[float], metrics: dict[str, Metric], reference: str,
            n_boot: int = 1000, seed: int = 0, band_factor: float = 2.0, paired: bool = True) -> dict:
    """Every method at every target, and every (method − reference) difference per metric, with paired
    bootstrap intervals, p-values and Holm-adjusted p-values (see the module docstring). ``paired=False``
    resamples each method's seeds independently — the wrong interval for shared seeds, kept to show it."""
    n = len(methods[0].points[0].forbidden)
    if any(len(p.forbidden) != n for m in methods for p in m.points):
        raise ValueError("every grid point must hold the same seeds")
    rng = np.random.default_rng(seed)
    reps = [_Replicate(np.arange(n), None)]
    for _ in range(n_boot):
        reps.append(_Replicate(rng.integers(0, n, n), np.random.default_rng(rng.integers(1 << 62)), not paired))
    by_name = {m.name: m for m in methods}
    out_methods, claims = [], []
    for t in targets:
        per = {}
        for m in methods:
            results = [_at_target(m, t, metrics, r) for r in reps]
            lams = np.array([np.nan if lam is None else lam for lam, _ in results])
            x, f = _fit(m, reps[0])
            flat = plateau(x, f, t, n)
            identified = float(np.mean(~np.isnan(lams[1:]))) if n_boot else float(not np.isnan(lams[0]))
            ok = identified >= MIN_IDENTIFIED and flat is None and not np.isnan(lams[0])
            values = {k: np.array([v.get(k, np.nan) for _, v in results]) for k in metrics}
            entry = {"target": t, "method": m.name, "grid": sorted(p.scale for p in m.points),
                     "identified": ok, "identified_fraction": identified,
                     "plateau": list(flat) if flat else None,
                     "scale_star": None if np.isnan(lams[0]) else float(lams[0]),
                     "scale_star_ci": _percentiles(lams[1:]),
                     "metrics": {k: _summary(v) for k, v in values.items()}}
            per[m.name] = (entry, values)
            out_methods.append(entry)
        ref_entry, ref_values = per[reference]
        for m in methods:
            if m.name == reference:
                continue
            entry, values = per[m.name]
            for k, fn in metrics.items():
                claim = {"target": t, "method": m.name, "reference": reference, "metric": k}
                if entry["identified"] and ref_entry["identified"]:
                    d = values[k] - ref_values[k]
                    claim.update(kind="matched", band=None, **_difference(d))
                else:
                    band = _band(by_name[m.name], by_name[reference], t, band_factor, reps[0])
                    if band is None:
                        claim.update(kind="no common band", band=None, diff=None, lo=None, hi=None, p=None,
                                     replicates=0)
                    else:
                        d = np.array([_band_gap(by_name[m.name], by_name[reference], k, fn, band, r) for r in reps])
                        claim.update(kind="band", band=list(band), **_difference(d))
                claims.append(claim)
    tested = [c for c in claims if c["p"] is not None]
    for c, p in zip(tested, holm([c["p"] for c in tested])):
        c["p_holm"] = p
        c["resolved"] = p < 0.05
    for c in claims:
        c.setdefault("p_holm", None)
        c.setdefault("resolved", False)
    return {"n_seeds": n, "n_boot": n_boot, "reference": reference, "methods": out_methods, "claims": claims,
            "n_claims": len(tested), "paired": paired}


def empty(n_seeds: int, n_boot: int, reference: str) -> dict:
    """The analysis of a comparison in which no method has a grid (no target reached)."""
    return {"n_seeds": n_seeds, "n_boot": n_boot, "reference": reference, "methods": [], "claims": [], "n_claims": 0,
            "paired": True}


def _band(a: Method, b: Method, t: float, factor: float, rep: _Replicate) -> tuple[float, float] | None:
    """Rates in [t/factor, t·factor] that both fronts span (point estimate)."""
    lo, hi = t / factor, t * factor
    for m in (a, b):
        rates = [p.forbidden.mean() for p in m.points]
        lo, hi = max(lo, min(rates)), min(hi, max(rates))
    return (float(lo), float(hi)) if hi > lo else None


def _percentiles(values: np.ndarray) -> list[float] | None:
    v = values[~np.isnan(values)]
    return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if len(v) >= 2 else None


def _summary(values: np.ndarray) -> dict:
    boot = values[1:][~np.isnan(values[1:])]
    return {"value": None if np.isnan(values[0]) else float(values[0]),
            "se": float(np.std(boot, ddof=1)) if len(boot) >= 2 else None, "ci": _percentiles(values[1:])}


def _difference(d: np.ndarray) -> dict:
    """Point estimate (replicate 0), percentile interval and p over the replicates where both sides exist."""
    boot = d[1:][~np.isnan(d[1:])]
    return {"diff": None if np.isnan(d[0]) else float(d[0]), "lo": _percentiles(d[1:])[0] if len(boot) >= 2 else None,
            "hi": _percentiles(d[1:])[1] if len(boot) >= 2 else None,
            "p": bootstrap_p(boot) if len(boot) and not np.isnan(d[0]) else None, "replicates": int(len(boot))}
