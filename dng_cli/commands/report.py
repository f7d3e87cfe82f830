"""``dng report <dir>``: every metrics.json below dir -> report.csv, report.md, pareto_kl.png, pareto_fid.png."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from dng_cli import UserError, validate
from dng_cli.commands.common import atomic_write_text, entry

log = logging.getLogger(__name__)
COLUMNS = ["label", "method", "forbidden", "guidance_scale", "steps", "n_samples", "forbidden_rate", "forbidden_rate_lo",
           "forbidden_rate_hi", "kl_uniform", "kl_uniform_se", "fid", "fid_full", "fid_features", "images_per_s", "run"]


def collect(root: Path) -> list[dict]:
    rows = []
    for path in sorted(root.rglob("metrics.json")):
        try:
            m = json.loads(path.read_text())
        except json.JSONDecodeError:
            log.warning("skipping unreadable %s", path)
            continue
        lo, hi = m["forbidden_rate_ci"]
        rows.append({**m, "label": m.get("label", m["method"]), "forbidden_rate_lo": lo, "forbidden_rate_hi": hi,
                     "run": str(path.parent.relative_to(root)) or "."})
    rows.sort(key=lambda r: (r["label"], str(r.get("forbidden")), r.get("guidance_scale") or 0.0, r["run"]))
    return rows


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return str(value)


def _kl(r: dict) -> str:
    se = r.get("kl_uniform_se")  # runs written before the KL standard error existed have none
    return f"{r['kl_uniform']:.3f}" + (f" ± {se:.3f}" if se is not None else "")


def markdown(rows: list[dict]) -> str:
    head = "| method | forbidden | scale | steps | N | forbidden % (95% CI) | KL ± s.e. | FID | FID (full) | images/s |\n"
    head += "|---|---|---|---|---|---|---|---|---|---|\n"
    lines = [
        f"| {r['label']} | {_fmt(r['forbidden'])} | {_fmt(r.get('guidance_scale'))} | {r['steps']} | {r['n_samples']} "
        f"| {100 * r['forbidden_rate']:.1f} ({100 * r['forbidden_rate_lo']:.1f}–{100 * r['forbidden_rate_hi']:.1f}) "
        f"| {_kl(r)} | {_fmt(r['fid'])} | {_fmt(r['fid_full'])} | {r['images_per_s']:.1f} |"
        for r in rows
    ]
    features = sorted({r.get("fid_features", "") for r in rows})
    return head + "\n".join(lines) + f"\n\nFID features: {', '.join(features)}\n"


def run(cfg: DictConfig, output_dir: Path) -> list[dict]:
    if cfg.dir is None:
        raise UserError("report needs a folder: dng report <dir>")
    root = Path(cfg.dir)
    if not root.is_dir():
        raise UserError(f"report dir {str(root)!r} does not exist")
    rows = collect(root)
    if not rows:
        raise UserError(f"no runs below {str(root)!r}: found no metrics.json")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt(r.get(k), 6) for k in COLUMNS})
    atomic_write_text(root / "report.csv", buf.getvalue())
    atomic_write_text(root / "report.md", markdown(rows))
    from dng_cli.plots import pareto_plot

    pareto_plot(rows, "kl_uniform", "class balance KL(uniform ‖ generated)", root / "pareto_kl.png")
    pareto_plot(rows, "fid", "FID vs data without forbidden classes", root / "pareto_fid.png")
    print(markdown(rows))
    return rows


def _check(cfg: DictConfig) -> None:
    if cfg.dir is None:
        raise UserError("report needs a folder: dng report <dir>")
    if not Path(cfg.dir).is_dir():
        raise UserError(f"report dir {str(cfg.dir)!r} does not exist")


validate.VALIDATORS["report"] = _check
main = entry("report", run, cleanup=False)
