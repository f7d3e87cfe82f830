"""Few-step fidelity: DNG and NP at 10, 25, 50, 100, 250, 1000 respaced steps on fixed seeds.

    python scripts/bench_steps.py                                # 64 samples, full grid: ~35 min on 2 CPU cores
    python scripts/bench_steps.py --n 256 --compile              # more samples, torch.compile'd network
    python scripts/bench_steps.py --n 32 --steps 10,25,50,100    # smaller

Runs `dng evaluate` (same seeds for every point, so only the step count changes; one loaded network
for all points) and writes outputs/bench_steps/<method>-<steps>/metrics.json, then a table,
bench_steps.md and bench_steps.png. Target: 50 steps within 10% of the 1000-step metrics. With n
samples every metric carries sampling noise too (the table prints the Wilson interval of the
forbidden rate and the bootstrap s.e. of KL; the same seeds at every step count make the comparison
paired, not independent). Re-running with the same --out reuses finished points (evaluate's
skip_existing) and only rebuilds the table and plot.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dng_cli import metrics
from dng_cli.commands import evaluate
from dng_cli.validate import compose


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--steps", default="10,25,50,100,250,1000")
    ap.add_argument("--methods", default="dng_fewstep,np")
    ap.add_argument("--np-scale", type=float, default=1.0)
    ap.add_argument("--dng-scale", type=float, default=5.0)
    ap.add_argument("--out", default="outputs/bench_steps")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--compile", action="store_true", help="sampler.compile=true (compiled once, before timing)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="extra overrides for every point, e.g. sampler.variance=large")
    args = ap.parse_args()
    import time

    import torch

    from dng_cli import pipeline, spec
    from dng_cli.models import load_model
    from dng_cli.pipeline import setup_torch
    from dng_cli.sampler import generate

    out = Path(args.out)
    steps = [int(s) for s in args.steps.split(",")]
    common = [f"n_samples={args.n}", f"sampler.batch_size={args.batch}", "sampler.progress=false",
              f"sampler.compile={str(args.compile).lower()}", *args.set]
    base = compose("evaluate", common)
    network = load_model(spec.model_spec(base.model), setup_torch(base.sampler.device, base.sampler.get("num_threads")))
    compile_s = None
    if args.compile:  # compile before any timed run: every point then reuses the compiled graph
        t0 = time.time()
        gen = pipeline.build(spec.resolve_run(compose("evaluate", common + ["method=np", "sampler.steps=1"]), scored=False),
                             torch.device("cpu"), network)
        generate(gen, list(range(min(args.n, args.batch))))
        compile_s = time.time() - t0
        print(f"compiled in {compile_s:.0f} s", flush=True)
    rows = []
    for method in args.methods.split(","):
        scale = args.dng_scale if method.startswith("dng") else args.np_scale
        for k in steps:
            scale_override = [] if method == "none" else [f"method.guidance_scale={scale}"]
            cfg = compose("evaluate", common + [f"method={method}", *scale_override, f"sampler.steps={k}"])
            m = {**evaluate.run(cfg, out / f"{method}-{k}", network), "label": method}
            if m.get("kl_uniform_se") is None:  # a finished run written before evaluate recorded it
                m["kl_uniform_se"] = metrics.kl_uniform_se(m["histogram_counts"], m["forbidden"],
                                                            float(cfg.metrics.kl_smoothing))
            rows.append(m)
            print(f"{method:>4} {k:5d} steps: forbidden {100 * m['forbidden_rate']:5.2f}% KL {m['kl_uniform']:.4f} "
                  f"FID {m['fid']:.3f} wall {m['wall_time_s']:.0f}s", flush=True)
    lines = ["| method | steps | N | forbidden % (95% CI) | KL ± s.e. | FID | wall s | Δ vs max steps (forbidden pp, KL %, FID %) |",
             "|---|---|---|---|---|---|---|---|"]
    refs = {}  # per method: its row with the most steps, the reference every other row is compared with
    for r in rows:
        if r["steps"] > refs.get(r["label"], {"steps": -1})["steps"]:
            refs[r["label"]] = r
    for r in rows:
        ref = refs[r["label"]]
        dk = 100 * (r["kl_uniform"] - ref["kl_uniform"]) / ref["kl_uniform"]
        df = 100 * (r["fid"] - ref["fid"]) / ref["fid"]
        dp = 100 * (r["forbidden_rate"] - ref["forbidden_rate"])
        lines.append(f"| {r['label']} | {r['steps']} | {r['n_samples']} | {100 * r['forbidden_rate']:.1f} "
                     f"({100 * r['forbidden_rate_ci'][0]:.1f}–{100 * r['forbidden_rate_ci'][1]:.1f}) | "
                     f"{r['kl_uniform']:.4f} ± {r['kl_uniform_se']:.3f} | {r['fid']:.3f} | {r['wall_time_s']:.0f} | {dp:+.1f} pp, {dk:+.0f}%, {df:+.0f}% |")
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
        for ax, key, label in zip(axes, ("forbidden_rate", "kl_uniform", "fid"), ("forbidden rate", "KL (± s.e.)", "FID")):
            yerr = [r["kl_uniform_se"] for r in pts] if key == "kl_uniform" else None
            ax.errorbar(x, [r[key] for r in pts], yerr=yerr, marker="o", capsize=3, label=method)
            ax.set_xscale("log")
            ax.set_xlabel("sampling steps")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    axes[0].legend()
    fig.savefig(out / "bench_steps.png", dpi=120, bbox_inches="tight")
    verdict = {}
    for method, ref in refs.items():
        pts = {r["steps"]: r for r in rows if r["label"] == method}
        if 50 not in pts or len(pts) < 2:
            continue
        a = pts[50]
        verdict[method] = {key: abs(a[key] - ref[key]) / max(abs(ref[key]), 1e-12) <= 0.10 for key in ("kl_uniform", "fid")}
        # KL of N samples is noisy (its s.e. is in the table): is the 50-vs-max gap inside 2 s.e.?
        verdict[method]["kl_within_2se"] = (abs(a["kl_uniform"] - ref["kl_uniform"])
                                            <= 2 * (a["kl_uniform_se"] ** 2 + ref["kl_uniform_se"] ** 2) ** 0.5)
        verdict[method]["forbidden_rate_ci_overlap"] = (a["forbidden_rate_ci"][0] <= ref["forbidden_rate_ci"][1]
                                                       and ref["forbidden_rate_ci"][0] <= a["forbidden_rate_ci"][1])
    print(json.dumps({"n_samples": args.n, "compile_s": compile_s, "within_10pct_at_50": verdict,
                      "rows": [{k: r[k] for k in ("label", "steps", "forbidden_rate", "kl_uniform", "kl_uniform_se", "fid",
                                                  "wall_time_s")} for r in rows]}))


if __name__ == "__main__":
    main()
