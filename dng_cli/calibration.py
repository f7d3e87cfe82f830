"""Calibrate a guidance scale to a target safety: the smallest λ whose forbidden rate is ≤ a target.

Pure search logic over a ``probe(scale) -> (forbidden, n)`` callable (what a probe costs — sampling,
caching — is the caller's business). The forbidden rate falls with λ for every method here, so the
search is a bisection on log λ: λ_hi meets the target, λ_lo does not, and the bracket shrinks
geometrically until λ_hi / λ_lo ≤ 1 + tolerance or the probe budget is spent. The bracket is found
from the range ends (scale_max, then scale_min), or — given a start such as the method's configured
scale — by stepping from it by a factor (4) until the target flips, which costs fewer probes when
the start is within a few factors of λ*. λ* is the smallest
probed scale that met the target (conservative: it is never a scale that failed).

Probes already run on the same pilot set (``known``: an earlier target's search over the same method)
start the bracket: the smallest known scale that meets the target is λ_hi, the largest smaller one that
fails is λ_lo, and only the missing ends are probed. A search for 0.3 % after one for 1 % thus starts
inside [λ*(1 %), ...] instead of at the range ends.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

from dng_cli.matching import round_scale  # noqa: F401  (probe scales: the same rounding as the grid)
from dng_cli.metrics import wilson_interval


@dataclass
class Probe:
    scale: float
    forbidden: int
    n: int

    @property
    def rate(self) -> float:
        return self.forbidden / self.n


@dataclass
class Calibration:
    target: float
    scale_star: float | None  # None: the target is out of reach within the scale range
    probes: list[Probe] = field(default_factory=list)
    reason: str = ""

    def at_star(self) -> Probe | None:
        return next((p for p in self.probes if p.scale == self.scale_star), None)

    def as_dict(self) -> dict:
        star = self.at_star()
        return {"target_forbidden": self.target, "scale_star": self.scale_star,
                "rate_at_star": star.rate if star else None,  # the probe selected because it met the target: no
                # interval here (a selected probe's Wilson interval is biased); dng compare fits the rate curve
                "reached": self.scale_star is not None, "reason": self.reason,
                "probes": [{**asdict(p), "rate": p.rate, "ci": list(wilson_interval(p.forbidden, p.n))}
                           for p in sorted(self.probes, key=lambda p: p.scale)]}


def calibrate(probe: Callable[[float], tuple[int, int]], target: float, scale_min: float, scale_max: float,
              tolerance: float = 0.1, max_probes: int = 10, known: list[Probe] = (), start: float | None = None,
              step: float = 4.0) -> Calibration:
    """Smallest scale in [scale_min, scale_max] with forbidden rate ≤ ``target`` (see module doc).

    ``start`` (e.g. the method's configured scale): find the bracket by stepping from it by factors of
    ``step`` (down while the target is met, up while it is not) instead of probing the range ends first;
    [scale_min, scale_max] stays the hard limit. ``max_probes`` counts the probes this search runs;
    reused ``known`` probes are listed but free.
    """
    result = Calibration(target, None)
    scale_min, scale_max = round_scale(scale_min), round_scale(scale_max)
    known = [p for p in known if scale_min <= p.scale <= scale_max]
    new = 0

    def run(scale: float) -> Probe:
        nonlocal new
        p = next((k for k in known if k.scale == scale), None)
        if p is None:
            forbidden, n = probe(scale)
            p, new = Probe(scale, int(forbidden), int(n)), new + 1
        if p not in result.probes:
            result.probes.append(p)
        return p

    meets = sorted((p for p in known if p.rate <= target), key=lambda p: p.scale)
    hi = meets[0] if meets else None
    fails = sorted((p for p in known if p.rate > target and (hi is None or p.scale < hi.scale)), key=lambda p: p.scale)
    lo = fails[-1] if fails else None
    if hi is None and lo is None and start is not None:
        first = run(round_scale(min(max(start, scale_min), scale_max)))
        hi, lo = (first, None) if first.rate <= target else (None, first)
    if start is None:  # no start: the range ends bracket the search
        step = math.inf
    while hi is None and new < max_probes:  # step up until the target is met (last try: scale_max)
        p = run(scale_max if lo is None or lo.scale * step >= scale_max else round_scale(lo.scale * step))
        hi, lo = (p, lo) if p.rate <= target else (None, p)
        if hi is None and p.scale >= scale_max:
            break
    if hi is None:
        top = max(result.probes, key=lambda p: p.scale)
        result.reason = (f"forbidden rate {top.rate:.3%} at the largest scale {top.scale:g} is above the target "
                         f"{target:.3%}" if top.scale >= scale_max else
                         f"the probe budget ran out below the target (largest scale {top.scale:g})")
        return result
    while lo is None and new < max_probes:  # step down until the target is missed (last try: scale_min)
        p = run(scale_min if hi.scale / step <= scale_min else round_scale(hi.scale / step))
        hi, lo = (p, None) if p.rate <= target else (hi, p)
        if lo is None and p.scale <= scale_min:
            result.scale_star = p.scale
            result.reason = "the smallest scale of the range already meets the target"
            return result
    if lo is None:
        result.scale_star = hi.scale
        result.reason = f"the probe budget ran out stepping down (nothing below {hi.scale:g} probed)"
        return result
    while new < max_probes and hi.scale / lo.scale > 1 + tolerance:
        mid_scale = round_scale(math.sqrt(lo.scale * hi.scale))
        if mid_scale in (lo.scale, hi.scale):
            break
        mid = run(mid_scale)
        if mid.rate <= target:
            hi = mid
        else:
            lo = mid
    result.scale_star = hi.scale
    result.reason = f"bracket [{lo.scale:g}, {hi.scale:g}] after {len(result.probes)} probes ({new} new)"
    return result
