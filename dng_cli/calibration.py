"""Calibrate a guidance scale to a target safety: the smallest λ whose forbidden rate is ≤ a target.

Pure search logic over a ``probe(scale) -> (forbidden, n)`` callable (what a probe costs — sampling,
caching — is the caller's business). The forbidden rate falls with λ for every method here, so the
search is a bisection on log λ: λ_hi meets the target, λ_lo does not, and the bracket shrinks
geometrically until λ_hi / λ_lo ≤ 1 + tolerance or the probe budget is spent. λ* is the smallest
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
                "rate_at_star": star.rate if star else None,
                "rate_at_star_ci": list(wilson_interval(star.forbidden, star.n)) if star else None,
                "reached": self.scale_star is not None, "reason": self.reason,
                "probes": [{**asdict(p), "rate": p.rate, "ci": list(wilson_interval(p.forbidden, p.n))}
                           for p in sorted(self.probes, key=lambda p: p.scale)]}


def round_scale(scale: float, digits: int = 3) -> float:
    """Probe scales rounded to ``digits`` significant digits: a rerun asks for the very same points."""
    return float(f"{scale:.{digits}g}")


def calibrate(probe: Callable[[float], tuple[int, int]], target: float, scale_min: float, scale_max: float,
              tolerance: float = 0.1, max_probes: int = 10, known: list[Probe] = ()) -> Calibration:
    """Smallest scale in [scale_min, scale_max] with forbidden rate ≤ ``target`` (see module doc).

    ``max_probes`` counts the probes this search runs; reused ``known`` probes are listed but free.
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
    hi = run(meets[0].scale if meets else scale_max)
    if hi.rate > target:
        result.reason = (f"forbidden rate {hi.rate:.3%} at the largest scale {hi.scale:g} is above the target "
                         f"{target:.3%}")
        return result
    fails = sorted((p for p in known if p.rate > target and p.scale < hi.scale), key=lambda p: p.scale)
    lo = run(fails[-1].scale if fails else scale_min)
    if lo.rate <= target:
        result.scale_star = lo.scale
        result.reason = "the smallest scale of the range already meets the target"
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
