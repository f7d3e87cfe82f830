"""fp32 against bf16 (or any two runs of the same seeds), paired per seed: what a precision change does to a result.

    python scripts/precision_pairs.py outputs/issue29/mnist_dng_fp32 outputs/issue29/mnist_dng_bf16
    python scripts/precision_pairs.py --table docs/results/precision     # the published table from its files

Both folders are finished `dng evaluate` runs (records.npz: every seed's class and classifier features) on the same
seeds. Prints, and writes as the LAST line one JSON object: the fraction of samples whose class changes; each
run's forbidden rate and McNemar's exact two-sided p on the forbidden indicator (discordant pairs); the paired
bootstrap difference (b − a) of KL kept, KL uniform and FID with its 95 % interval (1000 replicates resampling the
seeds, the same for both runs); and, for DNG, each run's posterior AUROC and mean final p.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np


def mcnemar_p(a: np.ndarray, b: np.ndarray) -> float:
    """Exact two-sided McNemar p on paired booleans: the discordant pairs under Binomial(n01 + n10, 1/2)."""
    n01, n10 = int(np.sum(a & ~b)), int(np.sum(~a & b))
    n = n01 + n10
    if n == 0:
        return 1.0
    k = min(n01, n10)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def load(folder: Path) -> tuple[dict, dict]:
    with np.load(folder / "records.npz") as f:
        records = {k: f[k] for k in ("seeds", "classes", "features")}
    return json.loads((folder / "metrics.json").read_text()), records


def unchanged(pair: dict) -> bool:
    """The clearing rule, fixed before the table was run: McNemar p >= 0.05 on the forbidden indicator and the
    paired 95 % intervals of KL kept and FID both contain 0 (uncorrected: stricter than a Holm-corrected rule)."""
    return pair["mcnemar_p"] >= 0.05 and all(pair[f"{m}_diff"][1] <= 0 <= pair[f"{m}_diff"][2]
                                             for m in ("kl_kept", "fid"))


def cleared(folder: Path, pairs: str = "pairs.json") -> set[str]:
    """The methods with a row for every dataset of ``folder`` (``<dataset>_<method>/pairs.json``; the dataset is
    the folder name's prefix) and every row unchanged: a method not measured on a dataset is not cleared."""
    verdicts: dict[str, dict[str, bool]] = {}
    for f in sorted(folder.glob(f"*/{pairs}")):
        pair = json.loads(f.read_text())
        dataset = f.parent.name[: -len(pair["method"]) - 1]
        verdicts.setdefault(pair["method"], {})[dataset] = unchanged(pair)
    datasets = {d for v in verdicts.values() for d in v}
    return {m for m, v in verdicts.items() if set(v) == datasets and all(v.values())}


def table(folder: Path, a: str = "fp32", b: str = "bf16", pairs: str = "pairs.json") -> str:
    """One markdown row per ``<dataset>_<method>/<pairs>`` under ``folder``, the scale from its ``a`` run (the
    precision table: fp32 against bf16; the backend table: ``--names torch onnxruntime --pairs pairs-onnxruntime.json``)."""
    head = (f"| dataset | method | λ | N | class changed | forbidden {a} → {b} (McNemar p) | KL kept {b} − {a} "
            f"| FID {b} − {a} | DNG AUROC {a} / {b} | images/s {a} / {b} | unchanged |")
    rows = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for f in sorted(folder.glob(f"*/{pairs}")):
        pair = json.loads(f.read_text())
        cfg = json.loads((f.parent / a / "metrics.json").read_text())["config"]
        auroc = pair["posterior_auroc"]
        k, fid = pair["kl_kept_diff"], pair["fid_diff"]
        rows.append(
            f"| {cfg['dataset']['name']} | {pair['method']} | {cfg['method']['guidance_scale']:.4g} | {pair['n']} "
            f"| {100 * pair['class_changed']:.1f} % | {100 * pair['forbidden_rate'][0]:.1f} % → "
            f"{100 * pair['forbidden_rate'][1]:.1f} % ({pair['mcnemar_p']:.2f}) "
            f"| {k[0]:+.4f} [{k[1]:+.4f}, {k[2]:+.4f}] | {fid[0]:+.3f} [{fid[1]:+.3f}, {fid[2]:+.3f}] "
            f"| {'—' if auroc[0] is None else f'{auroc[0]:.3f} / {auroc[1]:.3f}'} "
            f"| {pair['images_per_s'][0]:.1f} / {pair['images_per_s'][1]:.1f} | {'yes' if unchanged(pair) else 'no'} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path, nargs="?", help="the reference run (fp32)")
    ap.add_argument("b", type=Path, nargs="?", help="the other run (bf16)")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--table", type=Path, help="print the markdown table of every <dataset>_<method>/pairs.json here")
    ap.add_argument("--names", nargs=2, default=["fp32", "bf16"], help="--table: the two runs' folder names")
    ap.add_argument("--pairs", default="pairs.json", help="--table: the pair files' name")
    args = ap.parse_args()
    if args.table is not None:
        print(table(args.table, *args.names, args.pairs))
        print(json.dumps({"cleared": sorted(cleared(args.table, args.pairs))}))
        return
    if args.a is None or args.b is None:
        raise SystemExit("error: give two run folders (fp32, bf16) or --table FOLDER")
    import torch
    from omegaconf import OmegaConf

    from dng_cli import metrics

    (ma, ra), (mb, rb) = load(args.a), load(args.b)
    if not np.array_equal(ra["seeds"], rb["seeds"]):
        raise SystemExit("error: the two runs have other seeds: nothing to pair")
    cfg = OmegaConf.create(ma["config"])
    forbidden, k = list(ma["forbidden"]), int(cfg.dataset.num_classes)
    smoothing = float(cfg.metrics.kl_smoothing)
    stats_path = next(Path(metrics.__file__).parent.glob(f"assets/{cfg.dataset.name}/fid/*-{ma['fid_features']}.npz"))
    stats = metrics.load_stats(stats_path)
    ca, cb = ra["classes"].astype(int), rb["classes"].astype(int)
    fa, fb = np.isin(ca, forbidden), np.isin(cb, forbidden)

    without = metrics.reference_stats(stats, forbidden)  # fid_scores' "fid", without its bootstrap s.e.s

    def scores(classes: np.ndarray, feats: np.ndarray) -> np.ndarray:
        counts = np.bincount(classes, minlength=k)
        return np.array([metrics.kl_kept(counts, forbidden, smoothing), metrics.kl_uniform(counts, forbidden, smoothing),
                         metrics.fid_from_features(torch.from_numpy(feats), without)])

    point = scores(cb, rb["features"]) - scores(ca, ra["features"])
    rng = np.random.default_rng(0)
    reps = []
    for _ in range(args.bootstrap):
        idx = rng.integers(0, len(ca), len(ca))
        reps.append(scores(cb[idx], rb["features"][idx]) - scores(ca[idx], ra["features"][idx]))
    lo, hi = np.percentile(np.array(reps), [2.5, 97.5], axis=0)
    names = ("kl_kept", "kl_uniform", "fid")
    out = {
        "a": str(args.a), "b": str(args.b), "n": int(len(ca)), "method": ma["method"],
        "class_changed": float(np.mean(ca != cb)),
        "forbidden_rate": [float(fa.mean()), float(fb.mean())], "mcnemar_p": mcnemar_p(fa, fb),
        "discordant": [int(np.sum(fa & ~fb)), int(np.sum(~fa & fb))],
        **{f"{m}_diff": [float(point[i]), float(lo[i]), float(hi[i])] for i, m in enumerate(names)},
        **{f"{m}": [ma[m], mb[m]] for m in ("kl_kept", "kl_uniform", "fid")},
        "posterior_auroc": [ma.get("posterior_auroc"), mb.get("posterior_auroc")],
        "mean_final_posterior": [ma.get("mean_final_posterior"), mb.get("mean_final_posterior")],
        "precision": [ma.get("precision", "fp32"), mb.get("precision", "fp32")],
        "images_per_s": [ma["images_per_s"], mb["images_per_s"]],
    }
    print(f"{out['method']}, N = {out['n']}: class changed {100 * out['class_changed']:.1f} %; forbidden "
          f"{100 * fa.mean():.2f} % -> {100 * fb.mean():.2f} % (McNemar p {out['mcnemar_p']:.3f}, discordant "
          f"{out['discordant']}); " + "; ".join(f"{m} diff {point[i]:+.4f} [{lo[i]:+.4f}, {hi[i]:+.4f}]"
                                                for i, m in enumerate(names)))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
