"""How well does DNG's tracked posterior p(c | x_t, …, x_T) detect the forbidden class, and why does it
decay late in the chain? (a report, not a test)

    python scripts/posterior_diagnostics.py --model gmm                     # analytic mixture, seconds
    python scripts/posterior_diagnostics.py --model mnist --n 200 --steps 50 100 250   # ≈ 35 min on 2 CPU cores (measured)

One UNguided chain per step count (every guidance scale is 0, so samples = the model's own), recording
per step and sample the three numbers every posterior update is made of: ‖δ‖², ⟨x' − μ_u, δ⟩ with
δ = μ_c − μ_u, and the step's variances. Every setting (prior, temperature, offset, variance of the
update, normaliser) is then replayed offline on the same chains, and scored against the label of
each final sample (the classifier's on MNIST; the nearest component on the mixture, where the exact
p(c | x_t) is known and printed too). Rows: AUROC and mean p of forbidden / kept samples at 25, 50,
75 and 100 % of the chain; "mean p(all)" is the calibration check — an exact posterior averages to
the forbidden share. Normalisers: "unguided" is DNG's N(x'; μ_c, σ²)/N(x'; μ_u, σ²); "mixture"
divides by p N(x'; μ_c, σ²) + (1 − p) N(x'; μ_¬c, σ²), μ_¬c = (μ_u − p μ_c)/(1 − p), the
two-hypothesis Bayes rule whose posterior cannot leave [0, 1]. "hold h" rows score the p that method=dng_hold's
weight uses (the running maximum once p reached h): whether a detected sample stays guided late in the chain.
Writes <out>/posterior_diagnostics.md and .json; last line: the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # gmm.py: the analytic mixture

from dng_cli import metrics  # noqa: E402
from dng_cli.guidance import Guidance, StepInfo  # noqa: E402
from dng_cli.sampler import randn, sample  # noqa: E402
from dng_cli.schedule import NoiseSchedule  # noqa: E402

SETTINGS = [  # (name, prior, temperature, offset, update variance, normaliser)
    ("official README (prior 0.01, τ 0.2, offset 2e-4)", 0.01, 0.2, 2e-4, "sampled", "unguided"),
    ("official CLI (prior 0.2, τ 1, offset 0)", 0.2, 1.0, 0.0, "sampled", "unguided"),
    ("prior 0.1, τ 1, offset 0", 0.1, 1.0, 0.0, "sampled", "unguided"),
    ("prior 0.1, τ 1, offset 0, update σ² = β'", 0.1, 1.0, 0.0, "large", "unguided"),
    ("prior 0.1, τ 0.5, offset 0", 0.1, 0.5, 0.0, "sampled", "unguided"),
    ("prior 0.1, τ 1, mixture normaliser", 0.1, 1.0, 0.0, "sampled", "mixture"),
]
P_MIN, P_MAX = 1e-6, 0.99


class Recorder(Guidance):
    """No guidance; records the sufficient statistics of every posterior update (first forbidden class)."""

    needs_update = True

    def __init__(self, exact=None):
        self.rows, self.exact, self.x = [], exact, []

    def __call__(self, eps_u, eps_c, step, state):
        return eps_u, eps_u.new_zeros(eps_u.shape[0])

    def update(self, state, info: StepInfo) -> None:
        delta = (info.mu_c[0] - info.mu_u).flatten(1).double()
        r = (info.x_next - info.mu_u).flatten(1).double()
        self.rows.append({"dd": (delta * delta).sum(1), "rd": (r * delta).sum(1), "var": info.variance,
                          "var_small": info.variance_small, "prec": info.span_precision,
                          "prec_small": info.span_precision_small, "span": info.timestep_span})
        if self.exact is not None:
            self.x.append((info.x_next.clone(), info.timestep_span[0]))


def replay(rows, prior, temperature, offset, update, normaliser) -> torch.Tensor:
    """[steps, B] posterior after each step (the last, noiseless step keeps the previous value)."""
    log_p = torch.full_like(rows[0]["dd"], math.log(prior))
    out = []
    for row in rows:
        suffix = {"small": "_small", "large": "_large"}.get(update, "")  # "sampled": what the chain drew with
        var, prec = row["var" + suffix], row["prec" + suffix]
        a = (-(row["dd"] - 2 * row["rd"]) * temperature) / (2 * var) + 0.5 * offset * prec
        if normaliser == "mixture":
            p = log_p.exp().clamp(max=P_MAX)
            q = p / (1 - p)
            b = -(q * q * row["dd"] + 2 * q * row["rd"]) * temperature / (2 * var)
            log_p = log_p + a - torch.logaddexp(log_p + a, torch.log1p(-p) + b)
        else:
            log_p = log_p + a
        log_p = log_p.clamp(math.log(P_MIN), math.log(P_MAX))
        out.append(log_p.exp())
    out.append(out[-1])
    return torch.stack(out)


HOLDS = (0.5, 0.2)  # dng_hold's level, and a lower one


def held(post: torch.Tensor, prior: float, hold: float) -> torch.Tensor:
    """[steps+1, B] the posterior a ``hold`` weight uses after each step: the running maximum (from the prior on)
    once it has reached ``hold``, else the tracked value (guidance.DynamicNegativeGuidance.guided_log_posterior)."""
    peak = torch.cummax(torch.cat([torch.full_like(post[:1], prior), post]), dim=0).values[1:]
    return torch.where(peak >= hold, peak, post)


def chain(eps_fn, steps, x_T, gens, exact=None, batch=128):
    schedule = NoiseSchedule.linear().respace(steps)
    large, prec_large = schedule.variances("large").tolist(), schedule.span_precision("large").tolist()
    recs, images = [], []
    for i in range(0, len(x_T), batch):
        rec = Recorder(exact)
        with torch.inference_mode():
            images.append(sample(eps_fn, schedule, rec, x_T[i:i + batch], gens[i:i + batch], progress=False).images)
        recs.append(rec)
    rows = []
    for j, row in enumerate(recs[0].rows):
        k = steps - 1 - j
        rows.append({**row, "dd": torch.cat([r.rows[j]["dd"] for r in recs]),
                     "rd": torch.cat([r.rows[j]["rd"] for r in recs]),
                     "var_large": large[k], "prec_large": prec_large[k]})
    exact_post = None
    if exact is not None:
        xs = [torch.cat([r.x[j][0] for r in recs]) for j in range(len(rows))]
        exact_post = torch.stack([*(exact(x, rows[j]["span"][0]) for j, x in enumerate(xs)), exact(xs[-1], 0)])
    return rows, torch.cat(images), exact_post


def evidence_split(rows, is_forb: torch.Tensor) -> dict:
    """Mean over forbidden / kept samples of Σ ‖δ‖²/(2σ²) per quarter of the chain: the expected decay of
    log p (τ 1) that ε_c ≠ ε_u costs under the unguided chain. For a sample that truly belongs to c an
    exact model has ε_u → ε_c (δ → 0) once p(c | x_t) → 1; what remains there is model error."""
    n = len(rows)
    out = {}
    for name, mask in (("forbidden", is_forb), ("kept", ~is_forb)):
        if not bool(mask.any()):
            continue
        q = []
        for j in range(4):
            part = rows[j * n // 4:(j + 1) * n // 4]
            q.append(float(sum((r["dd"][mask] / (2 * r["var"])).mean() for r in part)))
        out[name] = q
    return out


def score(post: torch.Tensor, is_forb: torch.Tensor) -> dict:
    d = metrics.posterior_detection(post, is_forb)
    d["mean_p_all_end"] = float(post[-1].mean())
    return d


def row_md(name, steps, d):
    f = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    keys = ("0.25", "0.5", "0.75", "1")
    return (f"| {name} | {steps} | " + " / ".join(f(d['posterior_auroc_at'][k]) for k in keys) + " | "
            + " / ".join(f(d['posterior_mean_forbidden_at'][k]) for k in keys) + " | "
            + " / ".join(f(d['posterior_mean_kept_at'][k]) for k in keys) + f" | {f(d['mean_p_all_end'])} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["gmm", "mnist"], default="gmm")
    ap.add_argument("--n", type=int, default=None, help="samples (gmm: 4000, mnist: 200)")
    ap.add_argument("--steps", type=int, nargs="+", default=[50, 100, 250, 1000])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="outputs/posterior_diagnostics")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    if args.model == "gmm":
        from gmm import GaussianMixtureEps

        n = args.n or 4000
        model = GaussianMixtureEps([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.0]], [0.1, 0.42, 0.48], std=0.4, forbidden=[0])
        eps_fn, shape = model, (2,)

        def exact(x, t):  # p(c=0 | x_t) of the mixture at original timestep t
            a = float(model.abar[t])
            v = a * model.std**2 + 1 - a
            logits = model.weights.log() - ((x.double().unsqueeze(1) - a**0.5 * model.means) ** 2).sum(-1) / (2 * v)
            return logits.softmax(-1)[:, 0]
        label = lambda images: model.component(images) == 0  # noqa: E731
    else:
        from dng_cli.models import ClassConditionalEps, load_classifier, load_ddpm
        from dng_cli.sampler import to_uint8

        n = args.n or 200
        eps_fn = ClassConditionalEps(load_ddpm("mnist"), [0], channels_last=True, max_batch=128)
        shape, exact = (1, 28, 28), None
        classifier = load_classifier("mnist")

        def label(images):
            with torch.inference_mode():
                return classifier(to_uint8(images).float() / 127.5 - 1.0).argmax(1) == 0
    lines = ["| setting | steps | AUROC at 25/50/75/100 % | mean p, forbidden | mean p, kept | mean p(all), end |",
             "|---|---|---|---|---|---|"]
    result = {"model": args.model, "n": n, "runs": {}}
    lines_decay = ["", "Expected decay of log p from ε_c ≠ ε_u, Σ ‖δ‖²/(2σ²) per quarter of the chain (nats; early → late):",
                   "", "| steps | mean over samples classified forbidden / kept |", "|---|---|"]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for steps in args.steps:
        gens = [torch.Generator().manual_seed(s) for s in range(n)]
        x_T = randn((n, *shape), gens)
        rows, images, exact_post = chain(eps_fn, steps, x_T, gens, exact)
        is_forb = label(images)
        run = {"n_forbidden": int(is_forb.sum()), "decay_nats_per_quarter": evidence_split(rows, is_forb)}
        lines_decay.append(f"| {steps} | " + " | ".join(
            f"{k}: " + " / ".join(f"{v:.2f}" for v in q) for k, q in run["decay_nats_per_quarter"].items()) + " |")
        torch.save({"dd": torch.stack([r["dd"] for r in rows]), "rd": torch.stack([r["rd"] for r in rows]),
                    "var": torch.tensor([r["var"] for r in rows]), "is_forbidden": is_forb},
                   Path(args.out) / f"stats_{args.model}_{steps}.pt")
        if exact_post is not None:
            run["exact"] = score(exact_post, is_forb)
            lines.append(row_md("exact p(c | x_t)", steps, run["exact"]))
        for name, *setting in SETTINGS:
            run[name] = score(replay(rows, *setting), is_forb)
            lines.append(row_md(name, steps, run[name]))
        for level in HOLDS:  # method=dng_hold: the p its weight uses (the tracked p is the row "prior 0.1, τ 1")
            name = f"prior 0.1, τ 1, hold {level}: the weight's p"
            run[name] = score(held(replay(rows, 0.1, 1.0, 0.0, "sampled", "unguided"), 0.1, level), is_forb)
            lines.append(row_md(name, steps, run[name]))
        result["runs"][str(steps)] = run
        print(f"{steps} steps: {int(is_forb.sum())}/{n} forbidden, {time.time() - t0:.0f} s", file=sys.stderr)
    result["wall_s"] = round(time.time() - t0, 1)
    table = "\n".join(lines + lines_decay)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"posterior_diagnostics_{args.model}.md").write_text(table + "\n")
    (out / f"posterior_diagnostics_{args.model}.json").write_text(json.dumps(result, indent=1))
    print(table)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
