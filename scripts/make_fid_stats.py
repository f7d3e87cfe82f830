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

from dng_cli import metrics, scoring
from dng_cli.models import load_classifier
from dng_cli.sampler import to_uint8
from dng_cli.spec import SHIPPED, dataset_spec, resolve
from dng_cli.validate import compose


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist", help="a dataset config (configs/dataset/<name>.yaml)")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--classifier", default=None, help="a classifier folder or shipped name (default: the dataset's)")
    p.add_argument("--root", default="data")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.classifier = args.classifier or args.dataset
    dataset = dataset_spec(compose("evaluate", [f"dataset={args.dataset}", f"dataset.root={args.root}"]).dataset)
    net = metrics.ClassifierFeatures(load_classifier(args.classifier))
    key = metrics.features_key("classifier", resolve(args.classifier, "classifier"))
    out = Path(args.out) if args.out else SHIPPED[args.dataset] / "fid"
    # the producer `dng evaluate` uses for a reference it has to compute (scoring.fid_reference), forced to recompute
    stats = scoring.fid_reference(dataset, args.split, out, net, key, rebuild=True)
    path = out / scoring.reference_name(dataset.name, args.split, key)
    ref = metrics.reference_stats(stats)
    print(f"wrote {path} ({int(ref[2])} images, {stats['sum'].shape[1]} features)")
    from dng_cli.data import load_dataset

    images, _ = load_dataset(dataset, args.split)
    with torch.inference_mode():  # sanity: the split against itself
        f = torch.cat([net(to_uint8(images[i:i + 1000])) for i in range(0, len(images), 1000)])
    print(f"FID(split, split) = {metrics.fid_from_features(f, ref):.2e}")
    return path


if __name__ == "__main__":
    main()
