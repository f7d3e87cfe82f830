"""The forbidden rate from stratified at-risk seeds: two-phase (double) sampling for stratification.

Phase 1: one unguided run over a large seed pool (N' seeds, shared by every method and scale) marks each seed
*at risk* when its unguided chain ends in a forbidden class; w = (at-risk seeds) / N'. Phase 2: at a method and
scale, guided chains run from n_A seeds drawn from the at-risk stratum and n_B from the rest; each stratum's
forbidden share r̂_A, r̂_B estimates the guided rate

    r̂ = w·r̂_A + (1 − w)·r̂_B,

unbiased for the rate over the seed population (the pool and each stratum's draw are random samples). Its
variance (Cochran, *Sampling Techniques*, 3rd ed., §12.2, two strata, phase-2 draws without replacement from the
pool's strata, which are large next to n_A, n_B):

    Var r̂ ≈ w²·r_A(1 − r_A)/n_A + (1 − w)²·r_B(1 − r_B)/n_B + w(1 − w)(r_A − r_B)²/N'.

Guidance rarely makes a seed forbidden that is not forbidden unguided, so r_B is small and most of the budget
belongs to the at-risk stratum (``neyman``: n_h ∝ W_h·S_h). Plain sampling of n seeds has r(1 − r)/n; the
ratio of the two is the variance reduction per chain on the same budget. Metrics other than the rate keep the
ordinary shared evaluation seeds: the strata only serve the rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Estimate:
    rate: float
    se: float


def rate(forbidden_at_risk, forbidden_rest, w: float, pool: int | None = None) -> Estimate:
    """r̂ and its standard error from each stratum's guided outcomes (booleans) and the pool's at-risk share ``w``
    (of ``pool`` seeds; None: w known exactly). Stratum rates in the s.e. are the observed ones (plug-in)."""
    a, b = np.asarray(forbidden_at_risk, bool), np.asarray(forbidden_rest, bool)
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"w={w} is not a share")
    if (w > 0 and len(a) == 0) or (w < 1 and len(b) == 0):
        raise ValueError("each stratum with weight needs at least one guided chain")
    r_a = float(a.mean()) if len(a) else 0.0
    r_b = float(b.mean()) if len(b) else 0.0
    return Estimate(w * r_a + (1 - w) * r_b, math.sqrt(variance(w, r_a, r_b, len(a), len(b), pool)))


def variance(w: float, r_a: float, r_b: float, n_a: int, n_b: int, pool: int | None = None) -> float:
    """The variance formula of the module docstring (a stratum with no chains contributes only with weight 0)."""
    v = 0.0
    if w > 0:
        v += w * w * r_a * (1 - r_a) / n_a
    if w < 1:
        v += (1 - w) ** 2 * r_b * (1 - r_b) / n_b
    if pool:
        v += w * (1 - w) * (r_a - r_b) ** 2 / pool
    return v


def neyman(n: int, w: float, r_a: float, r_b: float, floor: int = 1) -> tuple[int, int]:
    """(n_A, n_B) for a budget of n guided chains, n_h ∝ W_h·S_h (Neyman allocation), each at least ``floor``."""
    s_a, s_b = w * math.sqrt(r_a * (1 - r_a)), (1 - w) * math.sqrt(r_b * (1 - r_b))
    if s_a + s_b == 0:
        n_a = round(n * w)
    else:
        n_a = round(n * s_a / (s_a + s_b))
    n_a = min(max(n_a, floor), n - floor)
    return n_a, n - n_a


def plain_variance(r: float, n: int) -> float:
    return r * (1 - r) / n
