"""Sampler benchmark: images/s of none, NP, SLD and DNG against the raw network time and against a
reference-style loop (the official implementation's structure: two separate network calls per step,
posterior updated in linear space with exp).

    python scripts/bench_sampler.py            # batch 128, 50 steps, 3 interleaved repeats
    python scripts/bench_sampler.py --quick    # batch 128, 6 steps, 2 repeats (< 5 min on 2 CPU cores)
    python scripts/bench_sampler.py --device cuda --batch 1000 --max-batch 0   # on a GPU, one call per step

Our sampler runs as `dng sample` does by default (channels_last, network calls of at most
--max-batch images); "+compile" cases run the same with `sampler.compile=true` (torch.compile; its
one-time compile is timed separately and not in the per-run times). Prints a table, then as its LAST
line one JSON object with the time ratios dng_over_np, np_over_raw, dng_over_raw (eager, like for
like), speedup_vs_reference (reference loop over our fastest DNG configuration) and
speedup_vs_reference_eager.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from dng_cli.guidance import DynamicNegativeGuidance, NegativePrompting, NoGuidance, SafeLatentDiffusion
from dng_cli.models import ClassConditionalEps, load_ddpm
from dng_cli.sampler import sample
from dng_cli.schedule import NoiseSchedule


def raw_network(net, x, schedule, copies: int) -> None:
    """The same network calls as the sampler (copies·B images per step through the same ``Network``), nothing else."""
    b = x.shape[0]
    xx = x.repeat(copies, 1, 1, 1)
    labels = torch.tensor([10] + [0] * (copies - 1), device=x.device).repeat_interleave(b)
    for t in schedule.timesteps.flip(0).tolist():
        net(xx, torch.full((copies * b,), t, device=x.device), labels)


def reference_loop(unet, x, schedule, lam=5.0, prior=0.01, temp=0.2, offset=2e-4, p_min=1e-6, p_max=0.8):
    """The official implementation's structure: eps_u and eps_c from two calls, p kept in linear space."""
    b, dev = x.shape[0], x.device
    null, forb = torch.full((b,), 10, device=dev), torch.full((b,), 0, device=dev)
    p = torch.full((b,), prior, device=dev)
    abar = schedule.alphas_cumprod.float().to(dev)
    betas = schedule.betas.float().to(dev)
    abar_prev = torch.cat([torch.ones(1, device=dev), abar[:-1]])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    for k in reversed(range(len(schedule))):
        t = torch.full((b,), int(schedule.timesteps[k]), device=dev)
        eps_u = unet(x, t, class_labels=null).sample
        eps_c = unet(x, t, class_labels=forb).sample
        w = (lam * p / (1 - p)).view(-1, 1, 1, 1)
        eps = eps_u - w * (eps_c - eps_u)
        coef = betas[k] / torch.sqrt(1 - abar[k])
        mean = (x - coef * eps) / torch.sqrt(1 - betas[k])
        if k > 0:
            x_next = mean + torch.sqrt(betas[k]) * torch.randn_like(x)
            mu_u = (x - coef * eps_u) / torch.sqrt(1 - betas[k])
            mu_c = (x - coef * eps_c) / torch.sqrt(1 - betas[k])
            d = ((x_next - mu_c) ** 2).sum((1, 2, 3)) - ((x_next - mu_u) ** 2).sum((1, 2, 3))
            p = torch.clamp(p * torch.exp(-temp * d / (2 * post_var[k]) + offset), p_min, p_max)
        else:
            x_next = mean
        x = x_next
    return x


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work, so a CUDA timing measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bookkeeping_ms(guidance, x_T, schedule, gens, with_conditional: bool, repeats: int = 5) -> float:
    """Milliseconds per step the sampler spends OUTSIDE the network (noise, guidance, posterior, means):
    the same ``sample`` call with an eps_fn that returns precomputed tensors. Deterministic enough to
    compare methods where whole-run timings are dominated by the network's run-to-run noise."""
    g = torch.Generator().manual_seed(1)
    eps_u = torch.randn(x_T.shape, generator=g).to(x_T.device)
    eps_c = torch.randn((1, *x_T.shape), generator=g).to(x_T.device) if with_conditional else None
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            t0 = time.perf_counter()
            sample(lambda x, t: (eps_u, eps_c), schedule, guidance, x_T, gens(), False)
            synchronize(x_T.device)
            best = min(best, time.perf_counter() - t0)
    return 1000 * best / len(schedule)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mnist")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                    help="network precision of our sampler's cases (sampler.precision; the reference loop stays fp32)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]; the noise is drawn on the CPU as in `dng sample`")
    ap.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                    help="run our sampler in NCHW (the reference loop always is)")
    ap.add_argument("--max-batch", type=int, default=128, help="images per network call (0: one call of 2B)")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile cases")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.repeats = 6, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {args.device}: no CUDA device is available")
    unet = load_ddpm(args.model).to(device)
    unet_ref = load_ddpm(args.model).to(device)  # plain NCHW copy for the reference loop
    speed = dict(channels_last=args.channels_last, max_batch=args.max_batch or None, precision=args.precision)
    schedule = NoiseSchedule.linear().respace(args.steps)
    x_T = torch.randn(args.batch, 1, 28, 28, generator=torch.Generator().manual_seed(0)).to(device)
    eps_u_only = ClassConditionalEps(unet, [], **speed)
    eps_pair = ClassConditionalEps(unet, [0], **speed)
    net = eps_pair.net
    def gens():  # one generator per sample, as `dng sample` / `dng evaluate` draw
        return [torch.Generator().manual_seed(i) for i in range(args.batch)]

    cases = {
        "raw 1x": lambda: raw_network(net, x_T, schedule, 1),
        "raw 2x": lambda: raw_network(net, x_T, schedule, 2),
        "none": lambda: sample(eps_u_only, schedule, NoGuidance(), x_T, gens(), False),
        "np": lambda: sample(eps_pair, schedule, NegativePrompting(1.0), x_T, gens(), False),
        "sld": lambda: sample(eps_pair, schedule, SafeLatentDiffusion(1.0), x_T, gens(), False),
        "dng": lambda: sample(eps_pair, schedule, DynamicNegativeGuidance(), x_T, gens(), False),
        "reference": lambda: reference_loop(unet_ref, x_T, schedule),
    }
    compile_s = None
    if args.compile:
        eps_pair_c = ClassConditionalEps(load_ddpm(args.model).to(device), [0], compile=True, **speed)
        net_c = eps_pair_c.net
        t0 = time.perf_counter()
        with torch.inference_mode():  # the one-time compile (and first call)
            raw_network(net_c, x_T, NoiseSchedule.linear().respace(1), 2)
        compile_s = time.perf_counter() - t0
        cases.update({
            "raw 2x +compile": lambda: raw_network(net_c, x_T, schedule, 2),
            "np +compile": lambda: sample(eps_pair_c, schedule, NegativePrompting(1.0), x_T, gens(), False),
            "dng +compile": lambda: sample(eps_pair_c, schedule, DynamicNegativeGuidance(), x_T, gens(), False),
        })
    times: dict[str, list[float]] = {k: [] for k in cases}
    with torch.inference_mode():
        raw_network(net, x_T[:8], NoiseSchedule.linear().respace(2), 2)  # warm-up
    for _ in range(args.repeats):  # interleaved: every case once per round
        for name, fn in cases.items():
            ctx = torch.no_grad() if name == "reference" else torch.inference_mode()
            with ctx:
                t0 = time.perf_counter()
                fn()
                synchronize(device)
                times[name].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    book = {"none": bookkeeping_ms(NoGuidance(), x_T, schedule, gens, False),
            "np": bookkeeping_ms(NegativePrompting(1.0), x_T, schedule, gens, True),
            "sld": bookkeeping_ms(SafeLatentDiffusion(1.0), x_T, schedule, gens, True),
            "dng": bookkeeping_ms(DynamicNegativeGuidance(), x_T, schedule, gens, True)}
    net_ms = 1000 * best["raw 2x"] / args.steps
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"machine: {machine}, {os.cpu_count()} CPUs, torch {torch.__version__}, device {device}, "
          f"threads {torch.get_num_threads()}, channels_last {args.channels_last}, precision {args.precision}, "
          f"max_batch {args.max_batch}, "
          f"batch {args.batch}, steps {args.steps}, repeats {args.repeats} (min)"
          + (f", compile {compile_s:.0f} s once" if compile_s is not None else ""))
    print(f"{'case':<10} {'seconds':>9} {'images/s':>9} {'net evals/s':>12}")
    for name, t in best.items():
        evals = (1 if name in ("raw 1x", "none") else 2) * args.batch * args.steps
        print(f"{name:<10} {t:9.3f} {args.batch / t:9.2f} {evals / t:12.1f}")
    print("outside the network, ms per step: " + ", ".join(f"{k} {v:.2f}" for k, v in book.items())
          + f"  (network, 2 x {args.batch} images: {net_ms:.0f} ms per step)")
    result = {
        "dng_over_np": best["dng"] / best["np"],
        "np_over_raw": best["np"] / best["raw 2x"],
        "dng_over_raw": best["dng"] / best["raw 2x"],
        "sld_over_raw": best["sld"] / best["raw 2x"],
        "none_over_raw": best["none"] / best["raw 1x"],
        "speedup_vs_reference": best["reference"] / min(best["dng"], best.get("dng +compile", float("inf"))),
        "speedup_vs_reference_eager": best["reference"] / best["dng"],
        "dng_over_np_compiled": best["dng +compile"] / best["np +compile"] if args.compile else None,
        "dng_over_raw_compiled": best["dng +compile"] / best["raw 2x +compile"] if args.compile else None,
        "compile_s": compile_s, "max_batch": args.max_batch,
        "bookkeeping_ms_per_step": book,
        "dng_over_np_bookkeeping": (net_ms + book["dng"]) / (net_ms + book["np"]),
        "dng_over_raw_bookkeeping": (net_ms + book["dng"]) / net_ms,
        "images_per_s": {k: args.batch / v for k, v in best.items()},
        "device": str(device), "precision": args.precision, "batch": args.batch, "steps": args.steps, "channels_last": args.channels_last, "repeats": args.repeats, "threads": torch.get_num_threads(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
