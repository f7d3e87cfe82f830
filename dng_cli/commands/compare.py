"""``dng compare``: every method at matched safety — the paper's question, with intervals that include
the matching itself (the estimand and the statistics: ``dng_cli.matching``).

1. Pilot: for every method and target, ``dng calibrate``'s bisection on the pilot seeds (probes cached in
   ``calibrate/<method>/probes/``, one pilot set per method shared by the targets).
2. Grid, placed by rate: first where the isotonic fit of the method's pilot rates puts t·``grid_rates``
   (pilots only place the grid), every point on the same ``n_samples`` evaluation seeds
   (``eval/<method>/scale=<λ>/``: ordinary evaluate folders whose ``records.npz`` holds each seed's class and
   features); then, on the evaluation points' own fit, points beyond the ends until the grid brackets the band
   [t/``band_factor``, t·``band_factor``] (``grid_extend`` per side) and inside it until no gap is wider than
   ``grid_max_ratio``. The grid depends only on finished results, so a re-run asks for the same points and an
   interrupted compare resumes from what finished. ``grid=existing`` analyses the finished points only.
3. Analysis (``dng_cli.matching``): the band-averaged matched quality of every method at every target, and
   every difference to the reference method (dng when compared), from a paired bootstrap over the evaluation
   seeds that redoes the rate fit, the crossings and the interpolation in every replicate; 95 % interval,
   max-T adjusted p within the primary family (``primary``) and the secondary one, and the MDE of every claim.
Writes compare.json, compare.csv (every column of compare.md), compare.md and compare.png.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from dng_cli import UserError, backends, calibration, matching, metrics, runs, scoring, spec, trackers, validate
from dng_cli.progress import duration
from dng_cli.commands import evaluate, report
from dng_cli.commands.calibrate import calibrate_method, check_search, run_cfg
from dng_cli.commands.common import entry
from dng_cli.io import atomic_write_text, write_json
from dng_cli.models import classify, load_model
from dng_cli.pipeline import setup_torch

log = logging.getLogger(__name__)
METRICS = ("kl_kept", "kl_uniform", "fid", "fid_inception", "kid_inception")  # what `compared` may name
LABELS = {"kl_kept": "KL kept", "kl_uniform": "KL uniform", "fid": "FID", "fid_inception": "Inception FID",
          "kid_inception": "Inception KID"}
INCEPTION_METRICS = ("fid_inception", "kid_inception")  # compared whenever metrics.fid.features=inception


def method_config(name: str) -> DictConfig:
    """configs/method/<name>.yaml as Hydra composes it (its ``defaults`` parents merged in)."""
    root = resources.files("dng_cli.configs") / "method"
    if not (root / f"{name}.yaml").is_file():
        options = sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))
        raise UserError(f"methods entry {name!r} is unknown: allowed are {', '.join(options)}")
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside the running command: its own config search path
        return compose("evaluate", overrides=[f"method={name}"]).method
    return validate.compose("evaluate", [f"method={name}"]).method


def method_of(cfg: DictConfig, name: str) -> DictConfig:
    """A compared method's config: configs/method/<name>.yaml with ``method_overrides.<name>`` merged in (e.g. a
    setting chosen on the pilot set: ``"method_overrides={ccfg:{tau:0.05}}"``); it enters every result's identity."""
    conf = method_config(name)
    extra = (cfg.get("method_overrides") or {}).get(name)
    if not extra:
        return conf
    if not isinstance(extra, DictConfig):
        raise UserError(f"method_overrides.{name}={extra!r} is invalid: give the method's settings, e.g. "
                        f"method_overrides={{{name}:{{guidance_scale:1.0}}}}")
    allowed = [k for k in conf if k != "name"]
    for key in extra:
        if key not in allowed:
            raise UserError(f"method_overrides.{name}.{key} is not a setting of method={name}: allowed are "
                            f"{', '.join(allowed)}")
    return OmegaConf.merge(conf, extra)


def overrides_of(cfg: DictConfig) -> dict:
    """``method_overrides`` as plain data ({} when none)."""
    extra = cfg.get("method_overrides")
    return OmegaConf.to_container(extra, resolve=True) if isinstance(extra, DictConfig) else {}


def check_cfg(cfg: DictConfig) -> None:
    targets, methods = list(cfg.targets), list(cfg.methods)
    if not targets or not methods:
        raise UserError("methods and targets must each name at least one entry")
    if len(set(map(str, methods))) != len(methods):
        raise UserError(f"methods={[str(m) for m in methods]} names a method twice")
    extra = cfg.get("method_overrides")
    if extra is not None and not isinstance(extra, DictConfig):
        raise UserError(f"method_overrides={extra!r} is invalid: give a mapping, e.g. method_overrides={{ccfg:{{tau:0.05}}}}")
    for name in extra or {}:
        if name not in map(str, methods):
            raise UserError(f"method_overrides names {name!r}, which is not compared: methods={[str(m) for m in methods]}")
    check_search(cfg, targets)
    rates = list(cfg.get("grid_rates") or [])
    if not rates or any(isinstance(f, bool) or not isinstance(f, (int, float)) or not f > 0 for f in rates):
        raise UserError(f"grid_rates={rates!r} is invalid: give positive multiples of the target, e.g. [0.5,1.0,2.0]")
    if str(cfg.get("grid")) not in ("auto", "existing", "extend"):
        raise UserError(f"grid={cfg.get('grid')!r} is invalid: allowed are auto (place and sample the grid), "
                        f"existing (analyse the finished grid points only) and extend (start from them, then "
                        f"bracket the band and fill its gaps)")
    for key in cfg.get("compared") or []:
        if key not in METRICS:
            raise UserError(f"compared entry {key!r} is unknown: allowed are {', '.join(METRICS)}")
    if not cfg.get("compared"):
        raise UserError("compared must name at least one metric")
    if cfg.get("primary") not in list(cfg.compared):
        raise UserError(f"primary={cfg.get('primary')!r} is invalid: it must be one of the compared metrics "
                        f"{list(cfg.compared)}")
    for name in methods:
        m = method_of(cfg, str(name))
        if "guidance_scale" not in m:
            raise UserError(f"methods entry {name!r} has no guidance_scale to calibrate")
        evaluate.check_cfg(run_cfg(cfg, m, 1.0, int(cfg.n_samples), int(cfg.seed)))


# --------------------------------------------------------------------------------- records
def scoring_spec(cfg: DictConfig) -> spec.RunSpec:
    """The run spec every grid point is scored with (the scorer does not depend on the method: any one's)."""
    first = method_of(cfg, str(cfg.methods[0]))
    return spec.resolve_run(run_cfg(cfg, first, float(first.guidance_scale), int(cfg.n_samples), int(cfg.seed)))


def load_point(folder: Path, result: dict, scored: spec.RunSpec, seeds: list[int]) -> dict:
    """The per-seed records of a finished evaluation: records.npz, or (older folders) the classifier's
    verdicts recomputed from samples.npz."""
    path = folder / scoring.RECORDS_NAME
    fp = (result.get("samples") or {}).get("fingerprint")
    if path.is_file():
        with np.load(path, allow_pickle=False) as f:
            rec = {k: f[k] for k in f.files}
        if rec["seeds"].tolist() == seeds and (fp is None or str(rec["fingerprint"]) == fp):
            return {k: v for k, v in rec.items() if k not in ("seeds", "fingerprint")}
    images, _ = runs.saved_samples(folder, result, seeds, scored.dataset.shape, fp)
    preds, feats = classify(scoring.classifier_of(scored), torch.from_numpy(images))
    return {"classes": preds.numpy(), "features": feats.float().numpy()}


def metric_functions(scored: spec.RunSpec, compared: list[str], forbidden: list[int]) -> dict[str, matching.Metric]:
    """Each compared metric as a function of (grid point, resampled seed indices)."""
    k, smoothing = scored.dataset.num_classes, scored.metrics.kl_smoothing
    scorer = scoring.Scorer(scored)
    fns: dict[str, matching.Metric] = {}

    def counts(p: matching.Point, idx: np.ndarray) -> np.ndarray:
        return np.bincount(p.records["classes"][idx].astype(np.int64), minlength=k)

    def fid(key: str, stats: dict) -> matching.Metric:
        mu, cov = metrics.gaussian(metrics.reference_stats(stats, forbidden))

        def value(p: matching.Point, idx: np.ndarray) -> float:
            return metrics.fid_to_gaussian(mu, cov, torch.from_numpy(p.records[key][idx]).double())
        return value

    def kid(reference: metrics.KidReference) -> matching.Metric:
        parts: dict[int, tuple] = {}  # per grid point: its N×N kernel and cross means, once

        def value(p: matching.Point, idx: np.ndarray) -> float:
            if id(p) not in parts:
                parts[id(p)] = (p, *reference.parts(torch.from_numpy(p.records["inception"])))
            _, k_xx, r = parts[id(p)]
            w = torch.from_numpy(np.bincount(idx, minlength=len(r)))
            return metrics.kid_from_parts(k_xx, r, reference.yy, w)
        return value

    for name in compared:
        if name == "kl_kept":
            fns[name] = lambda p, idx: metrics.kl_kept(counts(p, idx), forbidden, smoothing)
        elif name == "kl_uniform":
            fns[name] = lambda p, idx: metrics.kl_uniform(counts(p, idx), forbidden, smoothing)
        elif name == "fid":
            fns[name] = fid("features", scorer.stats)
        elif name == "fid_inception" and scorer.inception is not None:
            fns[name] = fid("inception", scorer.inception[2])
        elif name == "kid_inception" and scorer.inception is not None:
            fns[name] = kid(scorer.kid_reference)
    return fns


# ---------------------------------------------------------------------------------- tables
def _digits(metric: str) -> int:
    return 2 if metric.startswith("fid") else 4 if metric.startswith("kid") else 3


def _num(v, digits: int = 3, sign: bool = False) -> str:
    return "—" if v is None else f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def method_rows(analysis: dict, compared: list[str]) -> list[dict]:
    rows = []
    for m in analysis["methods"]:
        ci = m["scale_star_ci"] or [None, None]
        row = {"table": "method", "target": m["target"], "method": m["method"], "scale_star": m["scale_star"],
               "scale_star_lo": ci[0], "scale_star_hi": ci[1], "scale_star_clamped": m["scale_star_clamped"],
               "eval_rate": m["eval_rate"], "reached": m["reached"], "identified": m["identified"],
               "identified_fraction": m["identified_fraction"], "clamped": m["clamped"],
               "band_scales": " ".join(f"{v:.3g}" for v in m["band_scales"]),
               "grid": " ".join(f"{s:g}" for s in m["grid"])}
        for k in compared:
            s = m["metrics"].get(k) or {}
            row.update({k: s.get("value"), f"{k}_se": s.get("se"), f"{k}_at_target": (m["matched"].get(k) or {}).get("value")})
        rows.append(row)
    return rows


def claim_rows(analysis: dict) -> list[dict]:
    keys = ("target", "method", "reference", "metric", "family", "estimand", "diff", "se", "lo", "hi", "p", "p_adj",
            "resolved", "mde", "matched_diff", "clamped", "replicates")
    return [{"table": "claim", **{k: c.get(k) for k in keys}} for c in analysis["claims"]]


CLAMPED_WARN = 0.05  # a claim whose band average rests on grid ends more often than this says so


def verdict(claim: dict, n: int) -> str:
    """What a claim says: resolved, or inconclusive at this N with the effect it could have found; and whether
    its band average rests on grid ends (a grid that does not cover the band)."""
    if claim["mde"] is None:
        text = "no interval (bootstrap=0)"
    elif claim["resolved"]:
        text = "✓ resolved"
    elif claim["se"] == 0:
        text = "identical on these seeds (no replicate differs)"
    else:
        text = f"inconclusive at N = {n} (MDE {claim['mde']:.{_digits(claim['metric'])}f})"
    if (claim.get("clamped") or 0) > CLAMPED_WARN:
        text += f"; the grid does not cover the band ({100 * claim['clamped']:.0f} % held at a grid end)"
    return text


def _p(p: float | None) -> str:
    """A p-value: three decimals, or two significant digits below 0.001 (the normal tail can go far below)."""
    return "—" if p is None else f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def _claims(k: int) -> str:
    return f"{k} claim" + ("" if k == 1 else "s")


def markdown(analysis: dict, compared: list[str], not_reached: list[dict], overrides: dict | None = None) -> str:
    ref, n = analysis["reference"], analysis["n_seeds"]
    changed = "; ".join(f"{m}: " + ", ".join(f"{k} {v}" for k, v in kv.items()) for m, kv in (overrides or {}).items())
    f = analysis.get("band_factor", 2.0)
    head = ["target", "method", "λ* [95% CI]", "rate at λ* (eval seeds)", "band λ", "clamped", "grid"] + [
        f"{LABELS[k]} (band) ± s.e." for k in compared] + [f"{LABELS[k]} at target" for k in compared]
    lines = [f"**At matched safety** — estimand: band-averaged matched quality, each metric at the scale where the "
             f"method's fitted forbidden rate equals r, averaged over log-spaced r in [t/{f:g}, t·{f:g}] (N = {n} shared "
             f"evaluation seeds; ± s.e. and intervals from {analysis['n_boot']} paired bootstrap replicates that redo "
             f"the matching; pilots only placed the grid; clamped: share of replicates × band rates whose crossing fell "
             f"outside the grid and was held at its end)"
             + (f"; settings beyond the method configs: {changed}" if changed else "") + ":", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in method_rows(analysis, compared):
        ci = f" [{r['scale_star_lo']:.3g}, {r['scale_star_hi']:.3g}]" if r["scale_star_lo"] is not None else ""
        star = f"{r['scale_star']:.3g}" + (" (grid end)" if r["scale_star_clamped"] else "") + ci
        rate = f"{100 * r['eval_rate']:.2f} %" + ("" if r["reached"] else " — target not reached")
        cells = [f"{100 * r['target']:g} %", r["method"], star, rate, r["band_scales"].replace(" ", "–"),
                 f"{100 * r['clamped']:.0f} %", r["grid"]]
        cells += [_num(r[k], _digits(k)) + ("" if r[f"{k}_se"] is None else f" ± {r[f'{k}_se']:.{_digits(k)}f}")
                  for k in compared]
        cells += [_num(r[f"{k}_at_target"], _digits(k)) for k in compared]
        lines.append("| " + " | ".join(cells) + " |")
    for r in not_reached:
        lines.append(f"| {100 * r['target']:g} % | {r['method']} | not reached | {r['reason']} |" + " |" * (len(head) - 4))
    primary = analysis.get("primary")
    fam = {c["family"]: c.get("family_size") for c in analysis["claims"]}
    lines += ["", f"**Differences to {ref}** (band-averaged; primary metric {LABELS.get(primary, primary)}: "
              f"{_claims(fam.get('primary') or 0)}, the tested family; secondary: {_claims(fam.get('secondary') or 0)}, "
              f"adjusted among themselves; p: two-sided studentized paired bootstrap; p_adj: Westfall–Young max-T "
              f"step-down within the family; ✓ resolved = p_adj < 0.05; MDE: the difference this N finds with 80 % "
              f"power at the family's level; at target: the single-t matched difference, for reference):", "",
              "| target | difference | metric | family | Δ band [95% CI] | p | p_adj | verdict | Δ at target |",
              "|---|---|---|---|---|---|---|---|---|"]
    for c in claim_rows(analysis):
        digits = _digits(c["metric"])
        diff = "—" if c["diff"] is None else (f"{c['diff']:+.{digits}f}" + (
            f" [{c['lo']:+.{digits}f}, {c['hi']:+.{digits}f}]" if c["lo"] is not None else ""))
        lines.append(f"| {100 * c['target']:g} % | {c['method']} − {c['reference']} | {LABELS[c['metric']]} | "
                     f"{c['family']} | {diff} | {_p(c['p'])} | {_p(c['p_adj'])} | {verdict(c, n)} | "
                     f"{_num(c['matched_diff'], digits, sign=True)} |")
    return "\n".join(lines) + "\n"


def plot(analysis: dict, compared: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dng_cli.plots import _save_fig

    targets = sorted({m["target"] for m in analysis["methods"]}, reverse=True)
    names = list(dict.fromkeys(m["method"] for m in analysis["methods"]))
    fig, axes = plt.subplots(1, len(compared), figsize=(4.2 * len(compared), 3.8), squeeze=False)
    for ax, key in zip(axes[0], compared):
        for j, name in enumerate(names):
            pts = [(i, m) for i, t in enumerate(targets) for m in analysis["methods"]
                   if m["method"] == name and m["target"] == t and (m["metrics"].get(key) or {}).get("value") is not None]
            if pts:
                ax.errorbar([i + 0.12 * (j - (len(names) - 1) / 2) for i, _ in pts],
                            [m["metrics"][key]["value"] for _, m in pts],
                            yerr=[m["metrics"][key]["se"] or 0.0 for _, m in pts], fmt="o", capsize=3, label=name)
        ax.set_xticks(range(len(targets)), [f"{100 * t:g} %" for t in targets])
        ax.set_xlabel("target forbidden rate (matched safety)")
        ax.set_ylabel(LABELS[key])
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    _save_fig(fig, path)


# ------------------------------------------------------------------------------------------ run
def calibrate_targets(cfg: DictConfig, name: str, targets: list[float], output_dir: Path, network=None) -> dict:
    """1. One method's pilot bisection for every target, in order (one pilot set per method: each later target
    starts from the probes already run). A unit of its own: one launcher job per method. Returns
    {"calibrations": one per target, "pilots": every probe as (scale, forbidden, n)}."""
    method = method_of(cfg, name)
    known: list[calibration.Probe] = []
    cals = []
    for target in targets:
        cal = calibrate_method(cfg, method, target, output_dir / "calibrate" / f"{name}-{target:g}", network,
                               label=name, probes_dir=output_dir / "calibrate" / name / "probes", known=known)
        cals.append(cal)
        known = [calibration.Probe(p["scale"], p["forbidden"], p["n"]) for p in cal["probes"]] + [
            p for p in known if p.scale not in {q["scale"] for q in cal["probes"]}]
    return {"calibrations": cals, "pilots": [(p.scale, p.forbidden, p.n) for p in known]}


def evaluate_point(cfg: DictConfig, name: str, scale: float, output_dir: Path, network=None) -> dict:
    """2. One grid point on the shared evaluation seeds (a unit of its own: one launcher job)."""
    folder = output_dir / "eval" / name / f"scale={scale:g}"
    return evaluate.run(run_cfg(cfg, method_of(cfg, name), scale, int(cfg.n_samples), int(cfg.seed), label=name),
                        folder, network)


def evals_per_second(network, cfg: DictConfig) -> float | None:
    """The denoiser's throughput here on the compare's backend (``sampler.backend``, decided by ``one_backend``),
    from two timed forwards of one sampler batch (after a warm-up; a graph's export is cached for the sampling)."""
    unet = network[0] if isinstance(network, tuple) else network
    try:
        b, c, size = int(cfg.sampler.batch_size), int(cfg.dataset.channels), int(cfg.dataset.image_size)
        device = next(unet.parameters()).device
        backend = str(cfg.sampler.get("backend", "torch"))  # resolved by one_backend: never auto here
        net = unet if backend == "torch" else backends.network(unet, backend)[0]  # as models.Network runs it
        x, t = torch.randn(b, c, size, size, device=device), torch.full((b,), 500, device=device, dtype=torch.long)
        labels = torch.zeros(b, dtype=torch.long, device=device) if unet.config.get("num_class_embeds") else None
        with torch.inference_mode():
            net(x, t, class_labels=labels)
            start = time.perf_counter()
            for _ in range(2):
                net(x, t, class_labels=labels)
        return 2 * b / (time.perf_counter() - start)
    except Exception:  # a network this estimate does not know how to call: no hours, the plan still prints
        return None


def plan_line(cfg: DictConfig, names: list[str], targets: list[float], rate: float | None) -> tuple[str, int]:
    """What the compare will cost, printed before its first sample: (the line, grid points expected)."""
    m, k = len(names), len(targets)
    n, pilot, steps = int(cfg.n_samples), int(cfg.pilot_n), int(cfg.sampler.steps)
    probes = m * int(cfg.max_probes)
    first = m * k * len(cfg.grid_rates)
    points = first + 2 * m * k  # bracketing and gap filling: about two more per method and target
    samples = probes * pilot + points * n
    evals = samples * steps * 2  # ε_u and ε_c per sample and step
    hours = (f", ≈ {evals / rate / 3600:.1f} h at the {rate:.0f} network evals/s measured here "
             f"({cfg.sampler.get('backend', 'torch')})" if rate else "")
    return (f"plan: {m} method(s) × {k} target(s) at N = {n}: pilot ≤ {probes} probes × {pilot} samples, grid ≈ "
            f"{points} points × {n} (first wave {first}, then bracketing and gap filling) = ≈ {samples} samples, "
            f"{evals / 1e6:.1f} M network evaluations{hours} (finished units in the folder are reused; "
            f"`dng plan <folder>` afterwards says what N the claims need)", points)


def finished_scales(cfg: DictConfig, name: str, output_dir: Path) -> list[float]:
    """``grid=existing``: the scales of ``eval/<name>/scale=<λ>/`` folders holding a finished result of this config
    (others are skipped with a warning; nothing is sampled)."""
    scales = []
    for folder in sorted((output_dir / "eval" / name).glob("scale=*")):
        try:
            scale = float(folder.name.split("=", 1)[1])
            with runs.only_finished():
                evaluate_point(cfg, name, scale, output_dir)
        except (ValueError, runs.Unfinished):
            log.warning("grid=existing: %s holds no finished result of this config: skipped", folder)
            continue
        scales.append(scale)
    return sorted(scales)


def one_precision(cfg: DictConfig, launcher: bool = False) -> DictConfig:
    """``sampler.precision=auto`` decided once for the whole compare: bf16 only if it would be bf16 for every
    compared method (each cleared by the paired table, on native-bf16 hardware), else fp32 for all, so that no
    comparison mixes precisions. Decided where the compare starts (a launcher's jobs get the decided value), so
    with a launcher it is fp32: the submitting host cannot tell the nodes' hardware (a login node with bf16 in
    front of nodes without it would have them emulate bf16 at 6-17x the cost); set bf16 explicitly there."""
    if str(cfg.sampler.get("precision", "fp32")) != "auto":
        return cfg
    each = {spec.precision_for(cfg.sampler, str(method_of(cfg, str(m)).name)) for m in cfg.methods}
    cfg = cfg.copy()
    cfg.sampler.precision = "bf16" if each == {"bf16"} and not launcher else "fp32"
    log.info("sampler.precision=auto -> %s for every method of this compare%s", cfg.sampler.precision,
             " (its units run as launcher jobs: auto is fp32, pass sampler.precision=bf16 for bf16)" if launcher else "")
    return cfg


def one_backend(cfg: DictConfig, launcher: bool = False) -> DictConfig:
    """``sampler.backend=auto`` decided once for the whole compare, as the precision is: the backend is part of a
    result's identity unless torch-identical (docs/performance.md), so every grid point of every method uses the
    same one. Decided here (``backends.resolve``: this machine's cached benchmark); with a launcher torch, as the
    submitting host cannot measure the nodes — pass ``sampler.backend=onnxruntime`` explicitly there."""
    if str(cfg.sampler.get("backend", "torch")) != "auto":
        return cfg
    from dng_cli import backends
    from dng_cli.spec import auto_device

    cfg = cfg.copy()
    cfg.sampler.backend = "torch" if launcher else backends.resolve(
        "auto", str(cfg.sampler.precision), auto_device(str(cfg.sampler.get("device", "cpu"))),
        bool(cfg.sampler.get("compile", False)))
    log.info("sampler.backend=auto -> %s for every method of this compare%s", cfg.sampler.backend,
             " (its units run as launcher jobs: auto is torch)" if launcher else "")
    return cfg


def run(cfg: DictConfig, output_dir: Path) -> dict:
    """The compare (``compared_run``) as the parent run of logger=… trackers: its grid points evaluated in this
    process are its child runs, its claims its metrics, compare.md/png its artifacts."""
    logger = trackers.config_of(cfg)
    with trackers.parent_run(logger, "compare", Path(output_dir), trackers.flatten(spec.plain(cfg)),
                             {"command": "compare", "folder": str(Path(output_dir).resolve())}) as parent:
        summary = compared_run(cfg, output_dir)
        if parent is not None:
            parent.metrics({f"{c['metric']}.{c['method']}-{c['reference']}.t{c['target']:g}.{k}": float(c[k])
                            for c in summary.get("claims", []) for k in ("diff", "se", "lo", "hi", "p", "p_adj", "mde")
                            if c.get(k) is not None})
            parent.image("compare", Path(output_dir) / "compare.png")
            parent.artifact(Path(output_dir) / "compare.md")
    return summary


def compared_run(cfg: DictConfig, output_dir: Path) -> dict:
    check_cfg(cfg)
    from dng_cli import fanout

    jobs = fanout.runner(output_dir)  # launcher=local|slurm: the units below run as its jobs
    cfg = one_backend(one_precision(cfg, launcher=jobs is not None), launcher=jobs is not None)
    network = None
    existing = str(cfg.grid) == "existing"
    if jobs is None and not existing:
        device = setup_torch(cfg.sampler.device, cfg.sampler.get("num_threads"))
        network = load_model(spec.model_spec(cfg.model), device)
    output_dir = Path(output_dir).resolve()
    names = [str(m) for m in cfg.methods]
    targets = [float(t) for t in cfg.targets]
    reference = "dng" if "dng" in names else names[-1]
    started = time.time()
    line, planned = plan_line(cfg, names, targets, evals_per_second(network, cfg) if network is not None else None)
    if not existing:
        log.info("%s", line)
    lo, hi = float(cfg.scale_min), float(cfg.scale_max)
    n, seed = int(cfg.n_samples), int(cfg.seed)
    seeds = [seed + i for i in range(n)]
    inception = cfg.metrics.fid.features == "inception"
    compared = [k for k in cfg.compared if k not in INCEPTION_METRICS or inception] + (
        [k for k in INCEPTION_METRICS if k not in cfg.compared] if inception else [])
    forbidden = spec.forbidden_classes(cfg, int(cfg.dataset.num_classes))
    scored = scoring_spec(cfg)  # resolved once: what every grid point is scored with
    data = fanout.absolute_paths(spec.plain(cfg))  # what a job gets: it may start in another directory
    if existing:  # nothing is sampled: every unit is read back from its finished result
        with runs.only_finished():
            try:
                cal_lists = [calibrate_targets(cfg, name, targets, output_dir, network) for name in names]
            except runs.Unfinished as err:
                raise UserError(f"grid=existing: {err} has no finished result of this config (its pilot probes); "
                                f"run the compare without grid=existing to sample it") from None
    elif jobs is None:
        cal_lists = [calibrate_targets(cfg, name, targets, output_dir, network) for name in names]
    else:
        cal_lists = jobs.map(fanout.unit, [(calibrate_targets, data, name, targets, output_dir) for name in names],
                             "compare calibration", ready=fanout.finished)
    not_reached, calibrations, evaluated = [], {}, {}
    for name, cals in zip(names, cal_lists):
        for target, cal in zip(targets, cals["calibrations"]):
            calibrations[f"{name}-{target:g}"] = cal
            if cal["scale_star"] is None:
                not_reached.append({"target": target, "method": name, "reason": cal["reason"]})
                log.warning("%s cannot reach forbidden <= %g: %s", name, target, cal["reason"])

    def points_of(name: str, scales: list[float]) -> list[matching.Point]:
        if runs.only_finished_asked():
            results = [evaluate_point(cfg, name, s, output_dir) for s in scales]
        elif jobs is None:
            results = [evaluate_point(cfg, name, s, output_dir, network) for s in scales]
        else:
            results = jobs.map(fanout.unit, [(evaluate_point, data, name, s, output_dir) for s in scales],
                               f"compare {name} evaluation", ready=fanout.finished)
        points = []
        for scale, result in zip(scales, results):
            rec = load_point(output_dir / "eval" / name / f"scale={scale:g}", result, scored, seeds)
            evaluated[(name, scale)] = result
            points.append(matching.Point(scale, np.isin(rec["classes"], forbidden), rec))
        if not existing:
            speeds = [float(r["images_per_s"]) for r in evaluated.values() if r.get("images_per_s")]
            left = max(planned - len(evaluated), 0)
            eta = (f", ETA ≈ {duration(left * int(cfg.n_samples) / float(np.median(speeds)))} for the ≈ {left} left "
                   f"at the {float(np.median(speeds)):.2f} images/s its points recorded" if speeds and left else "")
            log.info("compare progress: %d grid point(s) finished of ≈ %d planned, %.2f h since the start%s",
                     len(evaluated), planned, (time.time() - started) / 3600, eta)
        return points

    def grid_of(name: str, cals: dict) -> matching.Method | None:
        reached = [t for t in targets if not any(r["method"] == name and r["target"] == t for r in not_reached)]
        pilots = [tuple(p) for p in cals["pilots"]]
        initial = None
        if existing or str(cfg.grid) == "extend":
            scales = finished_scales(cfg, name, output_dir)
            with runs.only_finished():
                initial = dict(zip(scales, points_of(name, scales)))
        if existing:
            points = initial
        else:
            points = matching.choose_grid(lambda s: points_of(name, [s])[0], pilots, reached,
                                          [float(f) for f in cfg.grid_rates], lo, hi, int(cfg.grid_extend),
                                          evaluate_many=lambda ss: points_of(name, ss),
                                          band_factor=float(cfg.band_factor), max_ratio=float(cfg.grid_max_ratio),
                                          initial=initial)
        return matching.Method(name, [points[s] for s in sorted(points)], pilots) if points else None

    if jobs is None or existing:
        grids = [grid_of(name, cals) for name, cals in zip(names, cal_lists)]
    else:  # every method's grid at once: each waits only for its own jobs
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(names)) as pool:
            grids = list(pool.map(grid_of, names, cal_lists))
    methods = [m for m in grids if m is not None]
    if methods and reference not in [m.name for m in methods]:
        reference = methods[-1].name
    fns = metric_functions(scored, compared, forbidden)
    compared = [k for k in compared if k in fns]
    analysis = matching.analyse(methods, targets, fns, reference, int(cfg.bootstrap), int(cfg.bootstrap_seed),
                                float(cfg.band_factor), primary=str(cfg.primary)) if methods else matching.empty(
        n, int(cfg.bootstrap), reference)
    summary = {**analysis, "compared": compared, "not_reached": not_reached, "targets": targets,
               "method_overrides": overrides_of(cfg),
               "calibration": {k: {"scale_star": v["scale_star"], "reason": v["reason"], "probes": v["probes"]}
                               for k, v in calibrations.items()},
               "evaluations": [{"method": name, "scale": scale, "folder": str(Path("eval") / name / f"scale={scale:g}"),
                                **{k: r.get(k) for k in ("forbidden_rate", "forbidden_rate_ci", "kl_kept", "kl_uniform",
                                                         "fid", "fid_inception", "kid_inception", "n_samples", "fingerprint")}}
                               for (name, scale), r in sorted(evaluated.items())]}
    write_json(output_dir / "compare.json", summary)
    rows = method_rows(analysis, compared) + claim_rows(analysis)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns)
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if r.get(k) is None else r[k] for k in columns})
    atomic_write_text(output_dir / "compare.csv", buf.getvalue())
    md = markdown(analysis, compared, not_reached, overrides_of(cfg))
    md += "\n" + report.histogram_markdown([(f"{name} λ={scale:g}", r) for (name, scale), r in sorted(evaluated.items())])
    atomic_write_text(output_dir / "compare.md", md)
    plot(analysis, compared, output_dir / "compare.png")
    print(md)
    return summary


main = entry("compare", run)
