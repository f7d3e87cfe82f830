"""Few-step fidelity: DNG and NP at 10, 25, 50, 100, 250, 1000 respaced steps on fixed seeds.

    python scripts/bench_steps.py --n 256                       # full grid (long on a CPU)
    python scripts/bench_steps.py --n 64 --steps 10,25,50,100   # smaller

Runs `dng evaluate` (same seeds for every point, so only the step count changes) and writes
outputs/bench_steps/<method>-<steps>/metrics.json, then a table, bench_steps.md and bench_steps.png.
Target: 50 steps within 10% of the 1000-step metrics (with n samples the forbidden rate and FID
carry sampling noise too: the table prints the Wilson interval).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dng_cli.commands import evaluate
from dng_cli.validate import compose


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--steps", default="10,25,50,100,250,1000")
    ap.add_argument("--methods", default="dng_fewstep,np")
    ap.add_argument("--np-scale", type=float, default=1.0)
    ap.add_argument("--dng-scale", type=float, default=5.0)
    ap.add_argument("--out", default="outputs/bench_steps")
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    out = Path(args.out)
    steps = [int(s) for s in args.steps.split(",")]
    rows = []
    for method in args.methods.split(","):
        scale = args.dng_scale if method.startswith("dng") else args.np_scale
        for k in steps:
            cfg = compose("evaluate", [f"method={method}", f"method.guidance_scale={scale}", f"n_samples={args.n}",
                                       f"sampler.steps={k}", f"sampler.batch_size={args.batch}", "sampler.progress=false"])
            m = {**evaluate.run(cfg, out / f"{method}-{k}"), "label": method}
            rows.append(m)
            print(f"{method:>4} {k:5d} steps: forbidden {100 * m['forbidden_rate']:5.2f}% KL {m['kl_uniform']:.4f} "
                  f"FID {m['fid']:.3f} wall {m['wall_time_s']:.0f}s", flush=True)
    lines = ["| method | steps | N | forbidden % (95% CI) | KL | FID | wall s | Δ vs max steps (forbidden pp, KL %, FID %) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = max((x for x in rows if x["label"] == r["label"]), key=lambda x: x["steps"])
        dk = 100 * (r["kl_uniform"] - ref["kl_uniform"]) / ref["kl_uniform"]
        df = 100 * (r["fid"] - ref["fid"]) / ref["fid"]
        dp = 100 * (r["forbidden_rate"] - ref["forbidden_rate"])
        lines.append(f"| {r['label']} | {r['steps']} | {r['n_samples']} | {100 * r['forbidden_rate']:.1f} "
                     f"({100 * r['forbidden_rate_ci'][0]:.1f}–{100 * r['forbidden_rate_ci'][1]:.1f}) | "
                     f"{r['kl_uniform']:.4f} | {r['fid']:.3f} | {r['wall_time_s']:.0f} | {dp:+.1f} pp, {dk:+.0f}%, {df:+.0f}% |")
    table = "\n".join(lines) + "\n"
    (out / "bench_steps.md").write_text(table)
    print(table)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for method in args.methods.split(","):
        pts = sorted((r for r in rows if r["label"] == method), key=lambda r: r["steps"])
        x = [r["steps"] for r in pts]
        for ax, key, label in zip(axes, ("forbidden_rate", "kl_uniform", "fid"), ("forbidden rate", "KL", "FID")):
            ax.plot(x, [r[key] for r in pts], marker="o", label=method)
            ax.set_xscale("log")
            ax.set_xlabel("sampling steps")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    axes[0].legend()
    fig.savefig(out / "bench_steps.png", dpi=120, bbox_inches="tight")
    print(json.dumps({"rows": [{k: r[k] for k in ("label", "steps", "forbidden_rate", "kl_uniform", "fid",
                                                  "wall_time_s")} for r in rows]}))


if __name__ == "__main__":
    main()
