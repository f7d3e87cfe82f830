"""``dng plan <compare folder>``: the power of a compare before (more) sampling (issue 44).

From a finished compare's claims: σ₁ = s.e.·√N per claim (the per-sample spread of the band-averaged difference,
matching noise included), the N per grid point that resolves a stated effect with 80 % power at the family's
level (default: the effect the compare itself saw — optimistic, and said so), the MDE at a given N, and what that N
costs here: samples (grid points × N, the compare's own grid sizes), network evaluations, and hours at the
throughput its grid points recorded (their metrics.json ``images_per_s``). Reads only; writes nothing.
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dng_cli import UserError, matching
from dng_cli.commands.common import entry
from dng_cli.commands.compare import LABELS
from dng_cli.io import read_json_object

log = logging.getLogger(__name__)


def check_cfg(cfg: DictConfig) -> None:
    if cfg.dir is None:
        raise UserError("plan needs a finished compare folder: dng plan <dir>")
    if not (Path(cfg.dir) / "compare.json").is_file():
        raise UserError(f"plan dir {str(cfg.dir)!r} holds no compare.json: give a finished dng compare folder")
    for key in ("n", "power", "alpha"):
        v = cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0
                              or (key != "n" and v >= 1)):
            raise UserError(f"{key}={v!r} is invalid: " + ("a positive N" if key == "n" else "it must lie in (0, 1)"))
    effects = cfg.get("effects") or {}
    for k, v in (OmegaConf.to_container(effects) if not isinstance(effects, dict) else effects).items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise UserError(f"effects.{k}={v!r} is invalid: give a positive effect size")


def throughput(folder: Path, summary: dict) -> tuple[float | None, int]:
    """(median images/s over the compare's grid points, steps) as their metrics.json recorded them."""
    rates, steps = [], None
    for e in summary.get("evaluations", []):
        m = read_json_object(folder / e["folder"] / "metrics.json") or {}
        if isinstance(m.get("images_per_s"), (int, float)) and m["images_per_s"] > 0:
            rates.append(float(m["images_per_s"]))
        steps = steps or m.get("steps")
    return (statistics.median(rates) if rates else None), int(steps or 0)


def plan(summary: dict, folder: Path, n: int | None = None, effects: dict | None = None, power: float = 0.8,
         alpha: float = 0.05) -> list[dict]:
    """One row per claim: σ₁, the effect powered for (and whether it is the observed one), N for ``power``, the
    MDE and power at ``n``, and the cost of the compare at the planned N."""
    n0 = int(summary["n_seeds"])
    n = int(n or n0)
    rate, steps = throughput(folder, summary)
    points = sum(len({s for m in summary["methods"] if m["method"] == name for s in m["grid"]})
                 for name in dict.fromkeys(m["method"] for m in summary["methods"]))
    rows = []
    for c in summary["claims"]:
        if c.get("se") in (None, 0):
            continue
        sigma1 = c["se"] * n0 ** 0.5
        claims = c.get("family_size") or 1
        observed = (effects or {}).get(c["metric"]) is None
        effect = abs(c["diff"]) if observed else float(effects[c["metric"]])
        need = matching.required_n(sigma1, effect, claims, alpha, power) if effect > 0 else None
        samples = points * need if need else None
        rows.append({"target": c["target"], "claim": f"{c['method']} − {c['reference']}", "metric": c["metric"],
                     "family": c.get("family"), "claims": claims, "sigma1": sigma1, "effect": effect,
                     "observed": observed, "n_needed": need, "mde_at_n": matching.mde(sigma1 / n ** 0.5, claims, alpha, power),
                     "power_at_n": matching.power_at(sigma1, effect, n, claims, alpha) if effect > 0 else None,
                     "n": n, "grid_points": points, "samples": samples,
                     "evals": samples * steps * 2 if samples and steps else None,
                     "hours": samples / rate / 3600 if samples and rate else None, "images_per_s": rate})
    return rows


def markdown(rows: list[dict], n0: int) -> str:
    if not rows:
        return "No claim with a bootstrap interval to plan from (run the compare with bootstrap > 0).\n"
    n, rate = rows[0]["n"], rows[0]["images_per_s"]
    lines = [f"**Power plan** (σ₁ = s.e.·√N from the compare's paired bootstrap at N = {n0}; N for 80 % power at the "
             f"family's level; * = the effect the compare itself saw: optimistic, a winner's curse; cost = the "
             f"compare's {rows[0]['grid_points']} grid points × N, 2 network evaluations per sample and step"
             + (f", at the {rate:.2f} images/s its grid points recorded" if rate else "") + "):", "",
             f"| target | claim | metric | family | σ₁ | effect | N for 80 % | MDE at N = {n} | power at N = {n} | "
             f"samples | network evals | hours |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        digits = 2 if r["metric"].startswith("fid") else 3
        effect = f"{r['effect']:.{digits}f}" + ("*" if r["observed"] else "")
        power = "—" if r["power_at_n"] is None else f"{100 * r['power_at_n']:.0f} %"
        evals = f"{r['evals'] / 1e6:.1f} M" if r["evals"] else "—"
        hours = f"{r['hours']:.1f}" if r["hours"] else "—"
        lines.append(f"| {100 * r['target']:g} % | {r['claim']} | {LABELS.get(r['metric'], r['metric'])} | "
                     f"{r['family']} | {r['sigma1']:.{digits}f} | {effect} | {r['n_needed'] or '—'} | "
                     f"{r['mde_at_n']:.{digits}f} | {power} | {r['samples'] or '—'} | {evals} | {hours} |")
    return "\n".join(lines) + "\n"


def run(cfg: DictConfig, output_dir: Path) -> list[dict]:
    check_cfg(cfg)
    folder = Path(cfg.dir)
    summary = json.loads((folder / "compare.json").read_text())
    effects = cfg.get("effects")
    effects = OmegaConf.to_container(effects) if effects is not None and not isinstance(effects, dict) else effects
    rows = plan(summary, folder, cfg.get("n"), effects, float(cfg.power), float(cfg.alpha))
    print(markdown(rows, int(summary["n_seeds"])))
    return rows


main = entry("plan", run, cleanup=False, lock=False)
