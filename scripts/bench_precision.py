"""Raw network throughput per precision and memory format (issue 29's table): the shipped UNet's forward alone,
no sampler, ``--batch`` images per call split into calls of at most ``--max-batch`` (as `dng sample` does),
best of ``--repeats`` runs of ``--seconds`` each. Also prints whether this CPU computes bf16 natively (the check
`sampler.precision=auto` uses) and, as its LAST line, one JSON object with every case's evals/s.

    python scripts/bench_precision.py                    # mnist UNet, 2 threads, batch 256, 2 x 4 s per case
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dng_cli.models import Network, load_ddpm
from dng_cli.spec import native_bf16


def rate(net: Network, batch: int, seconds: float) -> float:
    c = net.unet.config
    x = torch.randn(batch, c.in_channels, c.sample_size, c.sample_size)
    t = torch.full((batch,), 500)
    labels = torch.zeros(batch, dtype=torch.long)
    with torch.no_grad():
        net(x, t, labels)  # warm-up (oneDNN primitive creation)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            net(x, t, labels)
            n += batch
        return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mnist")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--max-batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    unet = load_ddpm(args.model)
    out = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": native_bf16(torch.device("cpu")),
           "threads": args.threads, "batch": args.batch, "max_batch": args.max_batch, "evals_per_s": {}}
    print(f"CPU capability {out['cpu_capability']}, native bf16: {out['native_bf16']}")
    print("| precision | memory format | network evals/s |\n|---|---|---|")
    for precision in ("fp32", "bf16"):
        for channels_last in (False, True):
            net = Network(unet, channels_last=channels_last, max_batch=args.max_batch, precision=precision)
            best = max(rate(net, args.batch, args.seconds) for _ in range(args.repeats))
            fmt = "channels_last" if channels_last else "contiguous"
            out["evals_per_s"][f"{precision}/{fmt}"] = round(best, 1)
            print(f"| {precision} | {fmt} | {best:.0f} |", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
