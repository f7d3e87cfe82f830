"""Two methods of one `dng compare` folder, seed by seed, at every scale both were evaluated at (a report, not a test):

    python scripts/same_seeds.py docs/results/matched_safety/mnist_hold dng_hold dng

Every grid point's ``records.npz`` holds each evaluation seed's class and classifier features; with the same seeds a
sample whose features are equal (max |difference| ≤ 1e-4) is the same image up to float noise. Per shared scale:
how many of the N samples differ, how many change class, and each method's forbidden count. Issue 28 uses it to say
where ``method=dng_hold`` is ``method=dng`` and where it is not. Last line: the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="a dng compare folder (its eval/<method>/scale=<λ>/records.npz)")
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--forbidden", type=int, nargs="+", default=[0])
    args = ap.parse_args(argv)
    scales = {}
    for m in (args.a, args.b):
        scales[m] = {p.parent.name.removeprefix("scale="): p for p in (args.folder / "eval" / m).glob("scale=*/records.npz")}
    shared = sorted(set(scales[args.a]) & set(scales[args.b]), key=float)
    if not shared:
        sys.exit(f"same_seeds.py: {args.folder} has no scale evaluated for both {args.a} and {args.b}")
    rows = []
    for s in shared:
        ra, rb = (np.load(scales[m][s]) for m in (args.a, args.b))
        if not np.array_equal(ra["seeds"], rb["seeds"]):
            sys.exit(f"same_seeds.py: scale {s}: {args.a} and {args.b} were evaluated on different seeds")
        differ = np.abs(ra["features"] - rb["features"]).max(axis=1) > 1e-4
        rows.append({"scale": float(s), "n": int(len(differ)), "differ": int(differ.sum()),
                     "class_changed": int((ra["classes"] != rb["classes"]).sum()),
                     f"forbidden_{args.a}": int(np.isin(ra["classes"], args.forbidden).sum()),
                     f"forbidden_{args.b}": int(np.isin(rb["classes"], args.forbidden).sum())})
    print(f"| λ | N | samples that differ | class changed | forbidden {args.a} | forbidden {args.b} |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scale']:g} | {r['n']} | {r['differ']} | {r['class_changed']} | {r[f'forbidden_{args.a}']} | "
              f"{r[f'forbidden_{args.b}']} |")
    out = {"folder": str(args.folder), "a": args.a, "b": args.b, "rows": rows}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
