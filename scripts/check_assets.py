"""Report on the shipped assets of one dataset (a report, not a test).

    dng data mnist && python scripts/check_assets.py               # full: ~10 min on 2 CPU cores
    python scripts/check_assets.py --per-class 20 --unguided 300   # smaller
    python scripts/check_assets.py --dataset fashion_mnist --ddpm outputs/train/fashion_ddpm/ema --classifier ...

Prints: classifier test accuracy; class-conditional samples at 50 steps (the default σ² = β̃) classified as their label
(MNIST target >= 95%, Fashion-MNIST >= 85%); unguided (null label) samples: class-histogram KL to uniform (target <= 0.03) and FID
vs the test split; network throughput at batch 128 (target >= 150 image-evaluations/s).
Last line: one JSON object with all numbers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from dng_cli import metrics
from dng_cli.data import load_tensors
from dng_cli.models import ClassConditionalEps, classify, load_classifier, load_ddpm
from dng_cli.spec import SHIPPED, resolve
from dng_cli.sampler import to_uint8
from dng_cli.sampler import randn, sample
from dng_cli.schedule import NoiseSchedule


TARGETS = {"mnist": {"classifier": 0.99, "conditional": 0.95}, "fashion_mnist": {"classifier": 0.92, "conditional": 0.85}}


def draw(unet, schedule, label, seeds, steps, batch=128, device="cpu"):
    out = []
    schedule = schedule.respace(steps)
    eps_fn = ClassConditionalEps(unet, [], label=label, channels_last=True, max_batch=batch)  # as `dng sample`
    for i in range(0, len(seeds), batch):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i:i + batch]]  # CPU noise, moved to the device
        with torch.inference_mode():
            x_T = randn((len(gens), 1, 28, 28), gens, device=device)
            out.append(sample(eps_fn, schedule, None, x_T, gens, progress=False).images.cpu())
    return to_uint8(torch.cat(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--unguided", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--root", default="data")
    ap.add_argument("--dataset", default="mnist", choices=sorted(TARGETS))
    ap.add_argument("--ddpm", default=None, help="a DDPM folder (e.g. a training run's ema/); default: the shipped one")
    ap.add_argument("--classifier", default=None, help="a classifier folder; default: the shipped one")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu | cuda (samples then differ from the CPU's: CUDA generators)")
    ap.add_argument("--batch", type=int, default=128, help="samples per network call")
    args = ap.parse_args()
    names = list(OmegaConf.load(Path(__file__).parents[1] / "configs" / "dataset" / f"{args.dataset}.yaml").class_names)
    if args.threads:
        torch.set_num_threads(args.threads)
    ddpm = args.ddpm or args.dataset
    unet, clf = load_ddpm(ddpm).to(args.device), load_classifier(args.classifier or args.dataset)
    config = resolve(ddpm, "ddpm") / "scheduler_config.json"  # the model's own chain
    schedule = NoiseSchedule.from_scheduler(json.loads(config.read_text()) if config.is_file() else {})
    report: dict = {"dataset": args.dataset}
    targets = TARGETS[args.dataset]

    x, y = load_tensors(args.dataset, args.root, "test")
    preds, _ = classify(clf, to_uint8(x))
    report["classifier_test_accuracy"] = (preds == y).double().mean().item()
    confusion = torch.zeros(10, 10, dtype=torch.long)
    confusion.index_put_((y, preds), torch.ones_like(y), accumulate=True)
    report["classifier_per_class_accuracy"] = (confusion.diag() / confusion.sum(1)).tolist()
    off = confusion.clone().fill_diagonal_(0)
    # share of the other classes' test images the classifier calls c: the floor of the "forbidden rate" that
    # removing class c can reach as this classifier measures it, even with every sample of c gone
    report["classifier_false_positive_rate"] = (off.sum(0) / (len(y) - confusion.sum(1))).tolist()
    top = off.flatten().topk(5)
    report["classifier_top_confusions"] = [  # [true, predicted, share of the true class's test images]
        [int(i) // 10, int(i) % 10, round(int(n) / int(confusion[int(i) // 10].sum()), 4)] for n, i in zip(*top)]

    t0 = time.time()
    per_class = []
    for c in range(10):
        imgs = draw(unet, schedule, c, list(range(1000 * c, 1000 * c + args.per_class)), args.steps,
                    args.batch, args.device)
        per_class.append((classify(clf, imgs)[0] == c).double().mean().item())
    report["conditional_accuracy"] = sum(per_class) / 10
    report["conditional_per_class_accuracy"] = per_class
    report["conditional_samples"] = 10 * args.per_class

    imgs = draw(unet, schedule, None, list(range(args.unguided)), args.steps, args.batch, args.device)
    preds, feats = classify(clf, imgs)
    counts = metrics.class_histogram(preds, 10)
    stats = metrics.load_stats(next((SHIPPED[args.dataset] / "fid").glob(f"{args.dataset}-test-classifier-*.npz")))
    report["unguided_kl_uniform"] = metrics.kl_uniform(counts, [])
    report["unguided_kl_uniform_se"] = metrics.kl_uniform_se(counts, [])
    report["unguided_histogram"] = [c / len(preds) for c in counts]
    report["unguided_fid_vs_test"] = metrics.fid_from_features(feats, metrics.reference_stats(stats))
    report["unguided_samples"] = args.unguided
    report["sampling_wall_s"] = round(time.time() - t0, 1)

    t = torch.full((128,), 500, device=args.device)
    lab = torch.full((128,), 10, device=args.device)
    for fmt, key in ((torch.channels_last, "network_image_evals_per_s"),
                     (torch.contiguous_format, "network_image_evals_per_s_nchw")):
        unet = unet.to(memory_format=fmt)
        xb = torch.randn(128, 1, 28, 28, device=args.device).contiguous(memory_format=fmt)
        with torch.inference_mode():
            unet(xb, t, class_labels=lab)
            t0 = time.perf_counter()
            for _ in range(10):
                unet(xb, t, class_labels=lab)
            if args.device != "cpu":
                torch.cuda.synchronize()
            report[key] = 10 * 128 / (time.perf_counter() - t0)
    report["ddpm_params"] = sum(p.numel() for p in unet.parameters())
    report["steps"] = args.steps
    report["threads"] = torch.get_num_threads()
    report["device"] = args.device

    print(f"classifier test accuracy      {100 * report['classifier_test_accuracy']:.2f}%  (target >= {100 * targets['classifier']:.0f}%)")
    print("classifier confuses           " + ", ".join(
        f"{names[t]}->{names[q]} {100 * r:.1f}%" for t, q, r in report["classifier_top_confusions"]))
    print("classifier false positives    " + ", ".join(  # the floor of a measured forbidden rate
        f"{names[c]} {100 * r:.1f}%" for c, r in enumerate(report["classifier_false_positive_rate"])))
    print(f"conditional accuracy @{args.steps} st.  {100 * report['conditional_accuracy']:.1f}%  (target >= {100 * targets['conditional']:.0f}%, "
          f"{report['conditional_samples']} samples)")
    print("  per class                   " + ", ".join(
        f"{names[c]} {100 * a:.0f}%" for c, a in enumerate(report["conditional_per_class_accuracy"])))
    print(f"unguided KL to uniform        {report['unguided_kl_uniform']:.4f} ± {report['unguided_kl_uniform_se']:.4f}  "
          f"(target <= 0.03, {args.unguided} samples)")
    print("  histogram                   " + ", ".join(
        f"{names[c]} {100 * h:.1f}%" for c, h in enumerate(report["unguided_histogram"])))
    print(f"unguided FID vs test split    {report['unguided_fid_vs_test']:.3f}  (classifier features)")
    print(f"network throughput            {report['network_image_evals_per_s']:.0f} image-evals/s at batch 128 "
          f"channels_last, {report['network_image_evals_per_s_nchw']:.0f} NCHW (target >= 150; {report['threads']} threads, {args.device})")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
