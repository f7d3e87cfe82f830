"""Write FID reference statistics (per-class float64 accumulators of classifier features) for a split.

    python scripts/make_fid_stats.py --dataset mnist --split test          # -> dng_cli/assets/mnist/fid/
    python scripts/make_fid_stats.py --dataset mnist --split test --out DIR

The file name is the one `dng evaluate` looks up: <dataset>-<split>-classifier-<weights sha256[:12]>.npz.
Per-class accumulators give the full split and the split without any set of classes exactly.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dng_cli import metrics
from dng_cli.data import load_tensors
from dng_cli.models import load_classifier
from dng_cli.spec import SHIPPED, resolve
from dng_cli.sampler import to_uint8


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--classifier", default=None, help="a classifier folder or shipped name (default: the dataset's)")
    p.add_argument("--root", default="data")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    args.classifier = args.classifier or args.dataset
    clf_path = resolve(args.classifier, "classifier")
    net = metrics.ClassifierFeatures(load_classifier(args.classifier))
    images, labels = load_tensors(args.dataset, args.root, args.split)
    stats = metrics.per_class_stats(net, to_uint8(images), labels, int(labels.max()) + 1)
    out = Path(args.out) if args.out else SHIPPED[args.dataset] / "fid"
    path = out / f"{args.dataset}-{args.split}-{metrics.features_key('classifier', clf_path)}.npz"
    metrics.save_stats(path, stats)
    ref = metrics.reference_stats(stats)
    print(f"wrote {path} ({int(ref[2])} images, {stats['sum'].shape[1]} features)")
    # sanity: the test split against itself
    with torch.inference_mode():
        f = torch.cat([net(to_uint8(images[i:i + 1000])) for i in range(0, len(images), 1000)])
    print(f"FID(split, split) = {metrics.fid_from_features(f, ref):.2e}")


if __name__ == "__main__":
    main()
