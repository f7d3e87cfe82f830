"""Network evaluations per second of each inference backend (``sampler.backend``) and batch size, in one run.

The shipped UNet's forward alone (fp32; torch in NHWC as the sampler runs it), each backend through the same
``Network`` wrapper the sampler uses, interleaved rounds of ``--seconds`` per case, the median per case; for each
batch the ratio to eager torch, and the share of this CPU's fp32 peak (network FLOPs counted by
torch.utils.flop_counter; peak = cores × clock × ``--flops-per-cycle``, 32 for two 256-bit FMA pipes per core,
an assumption this script cannot check). Prints a markdown table and, as its LAST line, one JSON object.

    python scripts/bench_backends.py                     # mnist UNet, 2 threads, batches 64 128 256 512
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from dng_cli import backends
from dng_cli.models import Network, load_ddpm


def flops_per_eval(unet, x, t, c) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(x[:1], t[:1], class_labels=None if c is None else c[:1], return_dict=False)
    return float(counter.get_total_flops())


def clock_ghz() -> float | None:
    try:
        mhz = [float(line.split(":")[1]) for line in open("/proc/cpuinfo") if line.startswith("cpu MHz")]
    except OSError:
        return None
    return max(mhz) / 1000 if mhz else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mnist")
    ap.add_argument("--backends", nargs="+", default=["torch", "onnxruntime", "openvino"])
    ap.add_argument("--batches", nargs="+", type=int, default=[64, 128, 256, 512])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--flops-per-cycle", type=float, default=32.0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    unet = load_ddpm(args.model)
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    names = [b for b in args.backends if backends.available(b)]
    t_build = {}
    nets = {}
    for b in names:
        t0 = time.perf_counter()
        net = Network(load_ddpm(args.model), channels_last=b == "torch", backend=b)
        t_build[b] = time.perf_counter() - t0
        if net.backend != b:
            continue  # export failed: the warning said why
        nets[b] = net
    g = torch.Generator().manual_seed(0)
    rates: dict[tuple[str, int], list[float]] = {}
    gflop = None
    with torch.inference_mode():
        for batch in args.batches:
            x = torch.randn(batch, cfg.in_channels, size, size, generator=g)
            t = torch.randint(0, 1000, (batch,), generator=g)
            c = torch.randint(0, int(cfg.num_class_embeds), (batch,), generator=g) if cfg.num_class_embeds else None
            if gflop is None:
                gflop = flops_per_eval(unet, x, t, c) / 1e9
            for net in nets.values():
                net(x, t, c)  # warm-up
            for _ in range(args.rounds):
                for b, net in nets.items():
                    n, t0 = 0, time.perf_counter()
                    while time.perf_counter() - t0 < args.seconds or n == 0:
                        net(x, t, c)
                        n += batch
                    rates.setdefault((b, batch), []).append(n / (time.perf_counter() - t0))
    ghz = clock_ghz()
    peak = os.cpu_count() and ghz and min(args.threads, os.cpu_count()) * ghz * args.flops_per_cycle  # GFLOP/s
    rows, out = [], {}
    for batch in args.batches:
        eager = np.median(rates.get(("torch", batch), [np.nan]))
        for b in nets:
            r = float(np.median(rates[(b, batch)]))
            share = r * gflop / peak if peak else None
            out.setdefault(b, {})[batch] = {"evals_per_s": round(r, 1), "ratio": round(r / eager, 3),
                                            "peak_share": None if share is None else round(share, 3)}
            rows.append(f"| {b} | {batch} | {r:.0f} | {r / eager:.2f}× | "
                        f"{'—' if share is None else f'{100 * share:.0f} %'} |")
    print(f"shipped '{args.model}' UNet: {gflop:.3f} GFLOP per evaluation; {args.threads} threads; peak "
          f"{peak:.0f} GFLOP/s assumed ({ghz:.2f} GHz × {args.flops_per_cycle:g} FLOP/cycle × {args.threads} cores)"
          if peak else f"{gflop:.3f} GFLOP per evaluation")
    print("| backend | batch | evals/s | vs eager | share of peak |\n|---|---|---|---|---|")
    print("\n".join(rows))
    print(json.dumps({"gflop_per_eval": gflop, "threads": args.threads, "peak_gflops": peak, "results": out,
                      "setup_s": {b: round(v, 2) for b, v in t_build.items()},
                      "versions": {b: backends.version(b) for b in names}}))


if __name__ == "__main__":
    main()
