"""``dng report <dir>``: every metrics.json below dir -> report.csv, report.md, report.html (one self-contained
page: dng_cli/html_report.py), pareto_kl.png, pareto_fid.png."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from dng_cli import UserError, runs
from dng_cli.io import read_json_object
from dng_cli.commands.common import entry
from dng_cli.io import atomic_write_text

log = logging.getLogger(__name__)
COLUMNS = ["label", "method", "forbidden", "guidance_scale", "steps", "n_samples", "forbidden_rate", "forbidden_rate_lo",
           "forbidden_rate_hi", "kl_kept", "kl_kept_se", "kl_uniform", "kl_uniform_se", "fid", "fid_se", "fid_full", "fid_features",
           "fid_inception", "fid_inception_se", "fid_inception_full", "kid_inception", "kid_inception_se", "images_per_s",
           "histogram", "run"]


REQUIRED = ("method", "forbidden", "forbidden_rate", "forbidden_rate_ci", "kl_uniform", "steps", "n_samples")


NUMBERS = ("forbidden_rate", "kl_uniform")  # required numbers
OPTIONAL_NUMBERS = ("guidance_scale", "kl_uniform_se", "kl_kept", "kl_kept_se", "fid", "fid_se", "fid_full",
                    "fid_inception", "fid_inception_se", "fid_inception_full", "kid_inception", "kid_inception_se",
                    "images_per_s")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def malformed(m: dict) -> str | None:
    """Why a metrics.json cannot be tabulated (a wrong type, a null, a rate outside its interval), or None."""
    missing = [k for k in REQUIRED if k not in m]
    if missing:
        return f"no {missing[0]} (not a dng evaluate result)"
    for key in NUMBERS:
        if not _number(m[key]):
            return f"{key} is {m[key]!r}, not a number"
    for key in ("steps", "n_samples"):
        if not isinstance(m[key], int) or isinstance(m[key], bool) or m[key] < 1:
            return f"{key} is {m[key]!r}, not a positive integer"
    for key in OPTIONAL_NUMBERS:
        if m.get(key) is not None and not _number(m[key]):
            return f"{key} is {m[key]!r}, not a number"
    ci = m["forbidden_rate_ci"]
    if not (isinstance(ci, list) and len(ci) == 2 and all(_number(v) for v in ci)):
        return "malformed forbidden_rate_ci"
    if not 0.0 <= ci[0] <= m["forbidden_rate"] <= ci[1] <= 1.0:
        return f"forbidden_rate {m['forbidden_rate']!r} lies outside its interval {ci!r}"
    if not isinstance(m["forbidden"], list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in m["forbidden"]):
        return f"forbidden is {m['forbidden']!r}, not a list of class indices"
    hist = m.get("histogram")
    if hist is not None and not (isinstance(hist, list) and all(_number(h) for h in hist)):
        return "malformed histogram"
    if not isinstance(m.get("label", m["method"]), str) or not isinstance(m["method"], str):
        return "method or label is not a string"
    if m.get("config") is not None and not isinstance(m["config"], dict):
        return "config is not an object"
    return None


def collect(root: Path) -> list[dict]:
    rows, seen = [], {}
    for path in sorted(root.rglob("metrics.json")):
        m = read_json_object(path) if path.is_file() else None
        if m is None:
            if not path.is_file():
                log.warning("skipping %s: not a file", path)
            continue
        why = malformed(m)
        if why is not None:
            log.warning("skipping %s: %s", path, why)
            continue
        lo, hi = m["forbidden_rate_ci"]
        run = str(path.parent.relative_to(root)) or "."
        copy = seen.get(m.get("fingerprint")) if m.get("fingerprint") else None
        if copy is not None:  # a copied run folder: the same result, counted once
            log.warning("skipping %s: the same result (fingerprint %s) as %s", path, m["fingerprint"], copy)
            continue
        seen[m.get("fingerprint")] = run
        config = m.get("config") or {}
        model = config.get("model") or {}
        rows.append({**m, "label": m.get("label", m["method"]), "forbidden_rate_lo": lo, "forbidden_rate_hi": hi,
                     "run": run, "model": str(model.get("name") or Path(str(model.get("path") or "?")).name),
                     "dataset": str((config.get("dataset") or {}).get("name") or "?")})
    rows.sort(key=lambda r: (r["label"], str(r.get("forbidden")), r.get("guidance_scale") or 0.0, r["run"]))
    return rows


def front_key(r: dict) -> tuple:
    """What two runs must share to lie on one safety–quality front: everything in their results' identity but
    the guidance scale — model, dataset, classifier, N, seeds, steps, method settings and the weights' hashes
    (a calibration's probes on pilot seeds and a compare's grid on evaluation seeds are two fronts)."""
    config = r.get("config")
    if not isinstance(config, dict):  # a result written before configs were recorded
        ident = {"forbidden": r.get("forbidden"), "steps": r.get("steps"), "n_samples": r.get("n_samples")}
    else:
        ident = runs.result_config(config)
        ident.pop("method.guidance_scale", None)
        ident.update({f"weights.{k}": v for k, v in (r.get("weights") or {}).items()})
    ident["label"] = r["label"]
    return tuple(sorted((k, json.dumps(v, sort_keys=True, default=str)) for k, v in ident.items()))


NAMING = ("model.name", "dataset.name", "n_samples", "seed", "sampler.steps", "weights.ddpm", "weights.classifier")


def fronts(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """The rows split into fronts (``front_key``), each named by its label and, where one label has several
    fronts, by the settings that tell them apart (e.g. "dng [model.name=tiny_random, n_samples=8]")."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(front_key(r), []).append(r)
    by_label: dict[str, list[tuple]] = {}
    for key, pts in groups.items():
        by_label.setdefault(pts[0]["label"], []).append(key)
    out = []
    for label, keys in by_label.items():
        if len(keys) == 1:
            out.append((label, groups[keys[0]]))
            continue
        differing = sorted({k for key in keys for k, v in key if any(dict(o).get(k) != v for o in keys)})
        log.warning("runs labelled %s lie on %d fronts that differ in %s: one front each, never mixed", label,
                    len(keys), ", ".join(differing))
        first = [k for k in NAMING if k in differing] + [k for k in differing if k not in NAMING]
        for n in range(1, len(first) + 1):  # the fewest keys, in NAMING's order, that tell the fronts apart
            if len({tuple(dict(key).get(k) for k in first[:n]) for key in keys}) == len(keys):
                break
        differing = first[:n]
        for key in keys:
            d = dict(key)
            out.append((f"{label} [" + ", ".join(f"{k}={json.loads(d[k]) if k in d else '—'}" for k in differing) + "]",
                        groups[key]))
    return out


def unfinished(root: Path) -> list[tuple[str, str]]:
    """Job folders below root without a result: (folder, why) — its error.txt line, or "no metrics.json"
    for a job that started (Hydra config written) but never finished."""
    out = []
    jobs = {p.parent.parent for p in root.rglob("config.yaml")
            if p.parent.name == ".hydra" or p.parent.name.startswith(".hydra_pending")}
    for job in sorted(jobs | {p.parent for p in root.rglob("error.txt")}):
        if (job / "metrics.json").is_file():
            continue
        err = job / "error.txt"
        why = err.read_text(errors="replace").strip().splitlines()[0] if err.is_file() else "no metrics.json (unfinished)"
        out.append((str(job.relative_to(root)) or ".", why))
    return out


def matched(rows: list[dict], targets: list[float]) -> list[dict]:
    """Each front's KL and FID at each target forbidden rate, interpolated linearly (in the rate) between the two
    points of the front, ordered by scale, where the rate first falls to the target (fronts: ``fronts``)."""
    out = []
    for label, pts in sorted(fronts(rows), key=lambda kv: kv[0]):
        pts = sorted(pts, key=lambda r: r.get("guidance_scale") or 0.0)
        forbidden, steps = str(pts[0].get("forbidden")), pts[0].get("steps")
        for t in targets:
            row = {"label": label, "forbidden": forbidden, "steps": steps, "target": t, "kl_uniform": None, "fid": None,
                   "how": "", "model": pts[0].get("model", "?"), "dataset": pts[0].get("dataset", "?"),
                   "n_samples": pts[0].get("n_samples")}
            if pts[0]["forbidden_rate"] <= t:
                row.update(kl_uniform=pts[0]["kl_uniform"], fid=pts[0].get("fid"), scale=pts[0].get("guidance_scale"),
                           how=f"first point already at {100 * pts[0]['forbidden_rate']:.2f} %")
            else:
                for a, b in zip(pts, pts[1:]):
                    if a["forbidden_rate"] > t >= b["forbidden_rate"]:
                        w = (a["forbidden_rate"] - t) / (a["forbidden_rate"] - b["forbidden_rate"])
                        lerp = lambda k: None if a.get(k) is None or b.get(k) is None else (1 - w) * a[k] + w * b[k]  # noqa: E731
                        row.update(kl_uniform=lerp("kl_uniform"), fid=lerp("fid"),
                                   how=f"between scales {_fmt(a.get('guidance_scale'))} and {_fmt(b.get('guidance_scale'))}")
                        break
                else:
                    row["how"] = f"not reached (lowest {100 * min(p['forbidden_rate'] for p in pts):.2f} %)"
            out.append(row)
    return out


def matched_markdown(rows: list[dict]) -> str:
    lines = ["**Matched safety, interpolated** on each method's own front (linear in the forbidden rate between "
             "the two sweep points around the target; no new samples — `dng compare` measures it directly):", "",
             "| target | method | model | dataset | forbidden | steps | N | KL | FID | from |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {100 * r['target']:g} % | {r['label']} | {r.get('model', '?')} | {r.get('dataset', '?')} | "
                     f"{r['forbidden']} | {r['steps']} | {r.get('n_samples', '')} | {_fmt(r['kl_uniform'], 3)} "
                     f"| {_fmt(r['fid'], 3)} | {r['how']} |")
    return "\n".join(lines) + "\n"


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return str(value)


def _kl(r: dict, key: str = "kl_uniform") -> str:
    if r.get(key) is None:  # kl_kept: runs written before it existed
        return ""
    se = r.get(f"{key}_se")  # runs written before the KL standard error existed have none
    return f"{r[key]:.3f}" + (f" ± {se:.3f}" if se is not None else "")


def _fid(r: dict, key: str = "fid") -> str:
    se = r.get(f"{key}_se")
    return _fmt(r.get(key)) + (f" ± {se:.2g}" if se is not None else "")


def class_names(m: dict, n: int) -> list[str]:
    """The dataset's class names recorded in a run's config (indices for runs without them)."""
    names = ((m.get("config") or {}).get("dataset") or {}).get("class_names")
    return [str(c) for c in names] if names and len(names) == n else [str(i) for i in range(n)]


def histogram_markdown(entries: list[tuple[str, dict]]) -> str:
    """Each run's class histogram as a table, one per dataset: which kept classes absorb the mass
    removed from the forbidden ones (bold), which KL alone does not say."""
    groups: dict[tuple[str, ...], list[tuple[str, dict]]] = {}
    for label, m in entries:
        if m.get("histogram"):
            groups.setdefault(tuple(class_names(m, len(m["histogram"]))), []).append((label, m))
    if not groups:
        return ""
    tables = []
    for names, items in groups.items():
        lines = ["| run | N | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for label, m in items:
            forbidden = {int(c) for c in m.get("forbidden") or []}
            cells = [f"**{100 * h:.1f}**" if c in forbidden else f"{100 * h:.1f}" for c, h in enumerate(m["histogram"])]
            lines.append(f"| {label} | {m.get('n_samples', '')} | " + " | ".join(cells) + " |")
        tables.append("\n".join(lines))
    return ("**Class histogram** (% of the samples the classifier assigns to each class; forbidden classes in "
            "bold) — where the removed mass goes:\n\n" + "\n\n".join(tables) + "\n")


def _kid(r: dict) -> str:
    """Inception KID ± its s.e. (×10³, as KIDs are usually quoted); "—" for a run scored before KID existed."""
    v, se = r.get("kid_inception"), r.get("kid_inception_se")
    return "—" if v is None else f"{1e3 * v:.2f}" + (f" ± {1e3 * se:.2f}" if se is not None else "") + " ×10⁻³"


def markdown(rows: list[dict], failed: list[tuple[str, str]] = ()) -> str:
    inception = any(r.get("fid_inception") is not None for r in rows)  # runs with metrics.fid.features=inception
    kid = any(r.get("kid_inception") is not None for r in rows)  # ... scored since KID exists
    kept = any(r.get("kl_kept") is not None for r in rows)  # runs that measured balance over the kept classes
    mixed = len({(r.get("model"), r.get("dataset")) for r in rows}) > 1  # else one line under the table says which
    head = ("| method |" + (" model | dataset |" if mixed else "") + " forbidden | scale | steps | N | forbidden % (95% CI) |"
            + (" KL kept ± s.e. |" if kept else "")
            + " KL ± s.e. | FID ± s.e. | FID (full) |"
            + (" Inception FID ± s.e. | Inception FID (full) |" if inception else "")
            + (" Inception KID ± s.e. |" if kid else "") + " images/s |\n")
    head += ("|---|" + ("---|---|" if mixed else "") + "---|---|---|---|---|" + ("---|" if kept else "") + "---|---|---|" + ("---|---|" if inception else "")
             + ("---|" if kid else "") + "---|\n")
    lines = [
        f"| {r['label']} |" + (f" {r.get('model', '?')} | {r.get('dataset', '?')} |" if mixed else "")
        + f" {_fmt(r['forbidden'])} | {_fmt(r.get('guidance_scale'))} | {r['steps']} | {r['n_samples']} "
        f"| {100 * r['forbidden_rate']:.1f} ({100 * r['forbidden_rate_lo']:.1f}–{100 * r['forbidden_rate_hi']:.1f}) |"
        + (f" {_kl(r, 'kl_kept')} |" if kept else "")
        + f" {_kl(r)} | {_fid(r)} | {_fmt(r.get('fid_full'))} |"
        + (f" {_fid(r, 'fid_inception')} | {_fmt(r.get('fid_inception_full'))} |" if inception else "")
        + (f" {_kid(r)} |" if kid else "")
        + (f" {r['images_per_s']:.1f} |" if r.get('images_per_s') is not None else " |")
        for r in rows
    ]
    features = sorted({r.get("fid_features", "") for r in rows})
    text = head + "\n".join(lines) + f"\n\nFID features: {', '.join(features)}\n"
    if not mixed and rows:
        text += f"Every run: model {rows[0].get('model', '?')}, dataset {rows[0].get('dataset', '?')}.\n"
    if failed:
        text += f"\n**Failed or unfinished jobs ({len(failed)})** — not in the table:\n\n"
        text += "\n".join(f"- `{job}`: {why}" for job, why in failed) + "\n"
    return text


def run(cfg: DictConfig, output_dir: Path) -> list[dict]:
    check_cfg(cfg)
    root = Path(cfg.dir)
    rows = collect(root)
    failed = unfinished(root)
    if not rows:
        raise UserError(f"no runs below {str(root)!r}: found no metrics.json" +
                        (f" ({len(failed)} failed or unfinished jobs)" if failed else ""))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt(r.get(k), 6) for k in COLUMNS})
    text = markdown(rows, failed)
    hist = histogram_markdown([(f"{r['label']} {_fmt(r.get('guidance_scale'))}", r) for r in rows])
    text += "\n" + hist if hist else ""
    targets = [float(t) for t in cfg.get("targets") or []]
    if targets:
        text += "\n" + matched_markdown(matched(rows, targets))
    from dng_cli.plots import pareto_plot

    pareto_plot(rows, "kl_uniform", "class balance KL(uniform ‖ generated)", root / "pareto_kl.png")
    pareto_plot(rows, "fid", "FID vs data without forbidden classes", root / "pareto_fid.png")
    from dng_cli.html_report import page

    # the tables last, once everything they describe was made: never a partial report.csv/md/html
    atomic_write_text(root / "report.csv", buf.getvalue())
    atomic_write_text(root / "report.md", text)
    atomic_write_text(root / "report.html", page(root, rows, failed))
    print(text)
    if failed:
        log.warning("%d job(s) below %s failed or did not finish: listed in report.md", len(failed), root)
    return rows


def check_cfg(cfg: DictConfig) -> None:
    if cfg.dir is None:
        raise UserError("report needs a folder: dng report <dir>")
    if Path(cfg.dir).is_file():
        raise UserError(f"report dir {str(cfg.dir)!r} is a file: give the folder that holds the runs, e.g. "
                        f"dng report {str(Path(cfg.dir).parent)!r}")
    if not Path(cfg.dir).is_dir():
        raise UserError(f"report dir {str(cfg.dir)!r} does not exist")


main = entry("report", run, cleanup=False, lock=False)
