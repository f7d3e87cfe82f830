"""Before/after: the s.e. of a grid point's forbidden rate from N plain evaluation seeds against stratified at-risk
seeds on the same budget of N guided chains (dng_cli/stratified.py), from committed per-seed records.

    python scripts/stratified_rate.py outputs/issue44/unguided_mnist docs/results/matched_safety/mnist_ccfg_bam

The unguided run's records mark each seed at risk (its unguided chain ends forbidden); w is their share of its
seeds. For each grid point of the compare (eval/<method>/scale=*/records.npz, the shared evaluation seeds, which the
unguided run must contain) the guided outcomes of the at-risk and the other evaluation seeds give the stratum rates
r_A, r_B. Then, for a budget of N guided chains (the compare's N): plain s.e. sqrt(r(1−r)/N); stratified s.e. with
Neyman allocation, n_A capped at the at-risk seeds a pool of ``--pool`` seeds holds (w·pool), its own variance term
included; "conservative" puts r_B at its one-sided 95 % upper bound (1 − 0.05^(1/n) when none of the n other
seeds was forbidden) — the plug-in r_B = 0 would credit the rest stratum with no variance at all. The gain is the
plain variance over the stratified one: the factor by which chains are saved for the same s.e. Prints a markdown
table and, as its LAST line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from dng_cli import stratified


def load(folder: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    with np.load(folder / "records.npz") as f:
        seeds, classes = f["seeds"], f["classes"].astype(int)
    return json.loads((folder / "metrics.json").read_text()), seeds, classes


def upper(k: int, n: int) -> float:
    """One-sided 95 % upper bound of a binomial share (Clopper–Pearson for k = 0, else Wilson)."""
    if n == 0:
        return 1.0
    if k == 0:
        return 1 - 0.05 ** (1 / n)
    p, z = k / n, 1.645
    return (p + z * z / (2 * n) + z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / (1 + z * z / n)


def design(w: float, r_a: float, r_b: float, n: int, pool: int) -> tuple[int, int, float]:
    n_a, n_b = stratified.neyman(n, w, r_a, r_b)
    cap = max(1, int(w * pool))
    if n_a > cap:
        n_a, n_b = cap, n - cap
    return n_a, n_b, stratified.variance(w, r_a, r_b, n_a, n_b, pool)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("unguided", type=Path)
    ap.add_argument("compare", type=Path)
    ap.add_argument("--pool", type=int, default=10000, help="phase-1 pool size of the design (unguided chains)")
    ap.add_argument("--target", type=float, default=0.01, help="the band [t/2, 2t] of the pooled summary")
    args = ap.parse_args()
    meta, pool_seeds, pool_classes = load(args.unguided)
    forbidden = list(meta["forbidden"])
    risk_of = dict(zip(pool_seeds.tolist(), np.isin(pool_classes, forbidden).tolist()))
    w = float(np.mean(list(risk_of.values())))
    rows, out = [], []
    for folder in sorted(args.compare.glob("eval/*/scale=*"), key=lambda p: (p.parent.name, float(p.name[6:]))):
        m, seeds, classes = load(folder)
        if list(m["forbidden"]) != forbidden:
            raise SystemExit(f"error: {folder} forbids {m['forbidden']}, the unguided run {forbidden}")
        missing = [s for s in seeds.tolist() if s not in risk_of]
        if missing:
            raise SystemExit(f"error: the unguided run lacks {len(missing)} of {folder}'s seeds (e.g. {missing[0]})")
        risk = np.array([risk_of[s] for s in seeds.tolist()])
        bad = np.isin(classes, forbidden)
        n, r = len(seeds), float(bad.mean())
        k_a, n_a_seen, k_b, n_b_seen = int(bad[risk].sum()), int(risk.sum()), int(bad[~risk].sum()), int((~risk).sum())
        r_a, r_b = k_a / max(n_a_seen, 1), k_b / max(n_b_seen, 1)
        plain = stratified.plain_variance(r, n)
        n_a, n_b, v = design(w, r_a, r_b, n, args.pool)
        na_c, nb_c, v_c = design(w, r_a, upper(k_b, n_b_seen), n, args.pool)
        row = {"method": folder.parent.name, "scale": float(folder.name[6:]), "n": n, "rate": r,
               "at_risk": [k_a, n_a_seen], "rest": [k_b, n_b_seen], "se_plain": math.sqrt(plain),
               "se_stratified": math.sqrt(v), "allocation": [n_a, n_b], "gain": plain / v if v > 0 else None,
               "se_conservative": math.sqrt(v_c), "allocation_conservative": [na_c, nb_c],
               "gain_conservative": plain / v_c if v_c > 0 else None}
        out.append(row)
        gain = "—" if row["gain"] is None else f"{row['gain']:.1f}×"
        rows.append(f"| {row['method']} | {row['scale']:g} | {100 * r:.1f} % | {k_a}/{n_a_seen} | {k_b}/{n_b_seen} "
                    f"| {100 * row['se_plain']:.2f} | {100 * row['se_stratified']:.2f} ({n_a}+{n_b}) | {gain} "
                    f"| {100 * row['se_conservative']:.2f} ({na_c}+{nb_c}) | {row['gain_conservative']:.1f}× |")
    print(f"at risk: {100 * w:.2f} % of {len(risk_of)} unguided seeds (forbidden {forbidden}); design pool "
          f"{args.pool} seeds; budget N guided chains per grid point")
    print("| method | λ | rate (N plain) | forbidden among at-risk | among the rest | s.e. plain (pp) "
          "| s.e. stratified (pp, n_A+n_B) | gain | s.e. conservative (pp) | gain conservative |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    # pooled over each method's points in the band: the share q of forbidden outcomes from seeds not at risk, and the
    # gain at r = t of a Neyman design whose strata carry (1 − q)·t and q·t (one number per method, less noisy than
    # the points' own, where one forbidden sample more or less in the rest stratum moves the gain 5-fold)
    t, pooled = args.target, {}
    for row in out:
        if t / 2 <= row["rate"] <= 2 * t:
            p = pooled.setdefault(row["method"], {"points": 0, "at_risk": 0, "rest": 0})
            p["points"] += 1
            p["at_risk"] += row["at_risk"][0]
            p["rest"] += row["rest"][0]
    print(f"\npooled over the points with rates in [{100 * t / 2:g} %, {100 * 2 * t:g} %]:")
    for method, p in pooled.items():
        q = p["rest"] / max(p["at_risk"] + p["rest"], 1)
        r_a, r_b = (1 - q) * t / w, q * t / (1 - w)
        n = out[0]["n"]
        _, _, v = design(w, r_a, r_b, n, args.pool)
        p.update(q=q, gain=stratified.plain_variance(t, n) / v, se_plain=math.sqrt(stratified.plain_variance(t, n)),
                 se_stratified=math.sqrt(v))
        print(f"- {method}: {p['points']} points, {p['rest']} of {p['at_risk'] + p['rest']} forbidden outcomes from seeds "
              f"not at risk (q = {100 * q:.0f} %): at r = {100 * t:g} %, s.e. {100 * p['se_plain']:.2f} pp plain -> "
              f"{100 * p['se_stratified']:.2f} pp stratified at N = {n}, a gain of {p['gain']:.1f}x per chain")
    print(json.dumps({"w": w, "pool_seen": len(risk_of), "pool": args.pool, "forbidden": forbidden, "target": t,
                      "pooled": pooled, "points": out}))


if __name__ == "__main__":
    main()
