"""Contrastive CFG's τ for a class-conditional model, chosen on the PILOT seeds by a stated rule (issue 28; a report,
not a test):

    python scripts/ccfg_tau.py --dataset mnist            # ≈ 3.5 min on 2 idle CPU cores (300 chains, 50 steps)
    python scripts/ccfg_tau.py --dataset fashion_mnist

CCFG scales NP's direction per sample and step by w(τ) = 2σ(−τ̂‖ε_c − ε_u‖²) (τ̂ = τ·16384/D, ``method=ccfg``):
≈ 1 where the sample already looks like the forbidden class c (ε_c ≈ ε_u), → 0 where it does not. τ is the
distance scale of that switch; their 0.2 was set for SD latents. The rule: run the model's own (unguided) chains
from the pilot seeds (``pilot_seed`` … + n − 1, disjoint from every evaluation seed), record ‖ε_c − ε_u‖² at each
step, label each chain by the classifier's class of its final sample, and pick the τ on a factor-2 grid that
maximises the gap in the step-averaged weight between chains that end in c and chains that end elsewhere:

    τ* = argmax_τ  mean_{b ends in c} W_b(τ) − mean_{b ends elsewhere} W_b(τ),   W_b(τ) = mean_steps w(τ)

(τ → 0: w ≡ 1 for all, NP; τ → ∞: w ≡ 0 for all, no guidance; the gap is 0 at both ends.) The weight then separates
the two groups as well as a single τ can, measured in the weight itself, before any guided run. A bootstrap over the
chains gives the spread of τ*. Writes <out>/ccfg_tau_<dataset>.json; last line: the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from dng_cli.guidance import CCFG_TAU_DIMS, Guidance
from dng_cli.sampler import randn, sample
from dng_cli.schedule import NoiseSchedule

FORBIDDEN = {"mnist": 0, "fashion_mnist": 6}  # each dataset's default forbidden class (configs/dataset)
SHAPE = (1, 28, 28)  # both shipped models' samples


class Recorder(Guidance):
    """No guidance; records ‖ε_c − ε_u‖² (summed over a sample's values) at every step."""

    def __init__(self):
        self.dd = []

    def __call__(self, eps_u, eps_c, step, state):
        self.dd.append((eps_c[0] - eps_u).flatten(1).double().pow(2).sum(1))
        return eps_u, eps_u.new_zeros(eps_u.shape[0])


def gap(weights_mean: torch.Tensor, in_c: torch.Tensor) -> float:
    return float(weights_mean[in_c].mean() - weights_mean[~in_c].mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=sorted(FORBIDDEN), default="mnist")
    ap.add_argument("--n", type=int, default=300, help="pilot chains (compare's pilot_n)")
    ap.add_argument("--pilot-seed", type=int, default=1000000, help="compare's pilot_seed")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--out", default="outputs/ccfg_tau")
    args = ap.parse_args()
    from dng_cli.models import ClassConditionalEps, classify, load_classifier, load_ddpm
    from dng_cli.sampler import to_uint8

    t0 = time.time()
    c = FORBIDDEN[args.dataset]
    eps_fn = ClassConditionalEps(load_ddpm(args.dataset), [c], channels_last=True, max_batch=256)
    schedule = NoiseSchedule.linear().respace(args.steps)
    seeds = list(range(args.pilot_seed, args.pilot_seed + args.n))
    dd, images = [], []
    for i in range(0, args.n, 100):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i:i + 100]]
        rec = Recorder()
        with torch.inference_mode():
            images.append(sample(eps_fn, schedule, rec, randn((len(gens), *SHAPE), gens), gens,
                                 progress=False).images)
        dd.append(torch.stack(rec.dd))  # [steps, b]
    dd, images = torch.cat(dd, 1), torch.cat(images)
    classes, _ = classify(load_classifier(args.dataset), to_uint8(images))
    in_c = classes == c
    dims = SHAPE[0] * SHAPE[1] * SHAPE[2]  # D of τ̂ = τ·16384/D
    taus = [0.2 * 2.0 ** k for k in range(-10, 11)]

    def mean_weight(tau: float) -> torch.Tensor:  # [b]: W_b(τ)
        return (2 * torch.sigmoid(-tau * CCFG_TAU_DIMS / dims * dd)).mean(0)

    W = {tau: mean_weight(tau) for tau in taus}
    gaps = {tau: gap(W[tau], in_c) for tau in taus}
    best = max(taus, key=gaps.get)
    g = torch.Generator().manual_seed(0)
    picks = []
    for _ in range(args.bootstrap):
        idx = torch.randint(0, args.n, (args.n,), generator=g)
        if 0 < int(in_c[idx].sum()) < args.n:
            picks.append(max(taus, key=lambda t: gap(W[t][idx], in_c[idx])))
    picks.sort()
    lo, hi = picks[int(0.025 * len(picks))], picks[int(0.975 * len(picks)) - 1]
    q = lambda x, p: float(torch.quantile(x.float(), p))  # noqa: E731
    result = {
        "dataset": args.dataset, "forbidden": c, "n": args.n, "pilot_seed": args.pilot_seed, "steps": args.steps,
        "ending_in_c": int(in_c.sum()), "tau_star": best, "tau_hat_star": best * CCFG_TAU_DIMS / dims,
        "tau_star_bootstrap_95": [lo, hi], "bootstrap": len(picks),
        "tau_default": 0.2, "gap_at_default": gaps[0.2],
        "gap": {f"{t:g}": round(v, 4) for t, v in gaps.items()},
        "mean_weight_in_c": {f"{t:g}": round(float(W[t][in_c].mean()), 4) for t in taus},
        "mean_weight_elsewhere": {f"{t:g}": round(float(W[t][~in_c].mean()), 4) for t in taus},
        "dd_median_in_c": q(dd[:, in_c].mean(0), 0.5), "dd_median_elsewhere": q(dd[:, ~in_c].mean(0), 0.5),
        "seconds": round(time.time() - t0, 1),
    }
    lines = [f"CCFG τ on {args.dataset} (forbidden {c}): {args.n} unguided pilot chains, {args.steps} steps, "
             f"{result['ending_in_c']} end in c",
             "| τ | τ̂ | mean W, ends in c | mean W, elsewhere | gap |", "|---|---|---|---|---|"]
    for t in taus:
        mark = " **τ\\***" if t == best else (" (default)" if t == 0.2 else "")
        lines.append(f"| {t:g}{mark} | {t * CCFG_TAU_DIMS / dims:.3g} | {float(W[t][in_c].mean()):.3f} | "
                     f"{float(W[t][~in_c].mean()):.3f} | {gaps[t]:.3f} |")
    lines.append(f"τ* = {best:g} (τ̂ {result['tau_hat_star']:.3g}); bootstrap 95 % [{lo:g}, {hi:g}] over "
                 f"{len(picks)} resamples of the chains; the default 0.2 gives gap {gaps[0.2]:.3f} against "
                 f"{gaps[best]:.3f}")
    print("\n".join(lines), file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"ccfg_tau_{args.dataset}.md").write_text("\n".join(lines) + "\n")
    (out / f"ccfg_tau_{args.dataset}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
