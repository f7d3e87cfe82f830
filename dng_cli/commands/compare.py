"""``dng compare``: every method at matched safety — the paper's question with resolving statistics.

For each target forbidden rate and each method: calibrate the guidance scale on a pilot set
(``dng calibrate``'s search, probes cached), then evaluate the method at its λ* with ``n_samples``
fresh samples (seeds 0…n-1, the same for every method; pilot seeds are disjoint). Writes in the run
dir ``calibrate/<method>-<target>/``, ``eval/<method>-<target>/`` (ordinary evaluate folders) and
``compare.json``, ``compare.csv``, ``compare.md``, ``compare.png``: forbidden % (Wilson CI), KL ± s.e.,
FID ± s.e. per method, and each method's difference to DNG with a 95 % interval
(±1.96·√(s.e.₁² + s.e.₂²); the methods share their seeds, so their errors correlate positively and
this interval is conservative).
"""

from __future__ import annotations

import csv
import io
import logging
import math
from importlib import resources
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dng_cli import UserError, calibration, pipeline
from dng_cli.commands import evaluate, report
from dng_cli.commands.calibrate import calibrate_method, check_search, run_cfg
from dng_cli.commands.common import atomic_write_text, entry, setup_torch, write_json

log = logging.getLogger(__name__)
Z95 = 1.959963984540054
COMPARED = ("kl_uniform", "fid", "fid_inception")  # differences to the reference (fid_inception when enabled)


def method_config(name: str) -> DictConfig:
    """configs/method/<name>.yaml with its same-group ``defaults`` parents merged in."""
    root = resources.files("dng_cli.configs") / "method"
    if not (root / f"{name}.yaml").is_file():
        options = sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))
        raise UserError(f"methods entry {name!r} is unknown: allowed are {', '.join(options)}")
    conf = OmegaConf.create((root / f"{name}.yaml").read_text())
    parents = [d for d in conf.pop("defaults", []) if d != "_self_"]
    return OmegaConf.merge(*(method_config(p) for p in parents), conf) if parents else conf


def check_cfg(cfg: DictConfig) -> None:
    targets, methods = list(cfg.targets), list(cfg.methods)
    if not targets or not methods:
        raise UserError("methods and targets must each name at least one entry")
    check_search(cfg, targets)
    for name in methods:
        m = method_config(str(name))
        if "guidance_scale" not in m:
            raise UserError(f"methods entry {name!r} has no guidance_scale to calibrate")
        evaluate.check_cfg(run_cfg(cfg, m, 1.0, int(cfg.n_samples), int(cfg.seed)))


def difference(a: dict, b: dict, key: str) -> dict | None:
    """a[key] - b[key] with a 95 % interval from their standard errors (None if either lacks one)."""
    if a.get(key) is None or b.get(key) is None or a.get(f"{key}_se") is None or b.get(f"{key}_se") is None:
        return None
    d = a[key] - b[key]
    half = Z95 * math.hypot(a[f"{key}_se"], b[f"{key}_se"])
    return {"diff": d, "lo": d - half, "hi": d + half, "resolved": not (d - half <= 0.0 <= d + half)}


def table(rows: list[dict], reference: str) -> str:
    inception = any((r.get("metrics") or {}).get("fid_inception") is not None for r in rows)
    head = ["target", "method", "λ*", "N", "forbidden % (95% CI)", "KL ± s.e.", "FID ± s.e."]
    head += ["Inception FID ± s.e."] if inception else []
    head += [f"KL − {reference} [95% CI]", f"FID − {reference} [95% CI]"]
    head += [f"Inception FID − {reference} [95% CI]"] if inception else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.get("scale_star") is None:
            lines.append(f"| {100 * r['target']:g} % | {r['method']} | not reached | | {r['reason']} |" + " |" * (len(head) - 5))
            continue
        m = r["metrics"]
        lo, hi = m["forbidden_rate_ci"]

        def diff(key: str) -> str:
            d = r.get(f"{key}_vs_reference")
            if d is None:
                return "—"
            return f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]" + (" ✓" if d["resolved"] else "")

        def est(key: str, digits: int) -> str:
            return "—" if m.get(key) is None else f"{m[key]:.{digits}f} ± {m[f'{key}_se']:.{digits}f}"

        cells = [f"{100 * r['target']:g} %", r["method"], f"{r['scale_star']:g}", str(m["n_samples"]),
                 f"{100 * m['forbidden_rate']:.2f} ({100 * lo:.2f}–{100 * hi:.2f})", est("kl_uniform", 3), est("fid", 2)]
        cells += [est("fid_inception", 2)] if inception else []
        cells += [diff("kl_uniform"), diff("fid")] + ([diff("fid_inception")] if inception else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n✓: the 95 % interval of the difference excludes 0 (resolved).\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dng_cli.plots import _save_fig

    done = [r for r in rows if r.get("scale_star") is not None]
    targets = sorted({r["target"] for r in done}, reverse=True)
    methods = list(dict.fromkeys(r["method"] for r in done))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in ((axes[0], "kl_uniform", "KL(uniform ‖ generated)"), (axes[1], "fid", "FID")):
        for j, method in enumerate(methods):
            pts = [(i, r) for i, t in enumerate(targets) for r in done if r["method"] == method and r["target"] == t]
            if pts:
                ax.errorbar([i + 0.12 * (j - (len(methods) - 1) / 2) for i, _ in pts],
                            [r["metrics"][key] for _, r in pts], yerr=[r["metrics"][f"{key}_se"] for _, r in pts],
                            fmt="o", capsize=3, label=method)
        ax.set_xticks(range(len(targets)), [f"{100 * t:g} %" for t in targets])
        ax.set_xlabel("target forbidden rate (matched safety)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    _save_fig(fig, path)


def run(cfg: DictConfig, output_dir: Path) -> dict:
    check_cfg(cfg)
    device = setup_torch(cfg.sampler.device, cfg.sampler.get("num_threads"))
    network = pipeline.load_model(cfg.model, device)
    methods = [str(m) for m in cfg.methods]
    reference = "dng" if "dng" in methods else methods[-1]
    rows = []
    known: dict[str, list[calibration.Probe]] = {name: [] for name in methods}  # one pilot set per method
    for target in [float(t) for t in cfg.targets]:
        for name in methods:
            method = method_config(name)
            tag = f"{name}-{target:g}"
            cal = calibrate_method(cfg, method, target, output_dir / "calibrate" / tag, network, label=name,
                                   probes_dir=output_dir / "calibrate" / name / "probes", known=known[name])
            known[name] = [calibration.Probe(p["scale"], p["forbidden"], p["n"]) for p in cal["probes"]] + [
                p for p in known[name] if p.scale not in {q["scale"] for q in cal["probes"]}]
            row = {"target": target, "method": name, "scale_star": cal["scale_star"], "reason": cal["reason"],
                   "calibration": cal}
            if cal["scale_star"] is not None:
                row["metrics"] = evaluate.run(run_cfg(cfg, method, cal["scale_star"], int(cfg.n_samples), int(cfg.seed),
                                                      label=name), output_dir / "eval" / tag, network)
            else:
                log.warning("%s cannot reach forbidden <= %g: %s", name, target, cal["reason"])
            rows.append(row)
        ref = next((r for r in rows if r["target"] == target and r["method"] == reference and "metrics" in r), None)
        for r in rows:
            if r["target"] == target and "metrics" in r and ref is not None and r is not ref:
                for key in COMPARED:
                    r[f"{key}_vs_reference"] = difference(r["metrics"], ref["metrics"], key)
    summary = {"reference": reference, "rows": [{k: v for k, v in r.items() if k != "calibration"} for r in rows]}
    for r in summary["rows"]:
        if "metrics" in r:
            r["metrics"] = {k: v for k, v in r["metrics"].items() if k != "config"}
    write_json(output_dir / "compare.json", summary)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["target", "method", "scale_star", "n_samples", "forbidden_rate", "forbidden_rate_lo", "forbidden_rate_hi",
                "kl_uniform", "kl_uniform_se", "fid", "fid_se", f"kl_minus_{reference}", "lo", "hi",
                f"fid_minus_{reference}", "lo", "hi"])
    for r in rows:
        m = r.get("metrics") or {}
        dk, df = r.get("kl_uniform_vs_reference") or {}, r.get("fid_vs_reference") or {}
        w.writerow([r["target"], r["method"], r["scale_star"], m.get("n_samples"), m.get("forbidden_rate"),
                    *(m.get("forbidden_rate_ci") or [None, None]), m.get("kl_uniform"), m.get("kl_uniform_se"),
                    m.get("fid"), m.get("fid_se"), dk.get("diff"), dk.get("lo"), dk.get("hi"),
                    df.get("diff"), df.get("lo"), df.get("hi")])
    atomic_write_text(output_dir / "compare.csv", buf.getvalue())
    md = table(rows, reference)
    md += "\n" + report.histogram_markdown([(f"{100 * r['target']:g} % {r['method']} λ*={r['scale_star']:g}", r["metrics"])
                                            for r in rows if "metrics" in r])
    atomic_write_text(output_dir / "compare.md", md)
    plot(rows, output_dir / "compare.png")
    print(md)
    return summary


main = entry("compare", run)
