"""python scripts/posterior_noise.py [N] [THREADS] — how much error in the network outputs DNG's posterior tolerates.

A detector run (DNG, λ 0, the shipped MNIST model, 50 steps) on seeds 0…N-1, with ε_u and ε_c each multiplied by
(1 + rel·z), z ~ N(0, 1) per element, independently, for rel in 0, 1e-3, 1e-2: the posterior's AUROC as a detector
of the classifier's final verdict, and how far the final log-posteriors move from rel = 0.
README, "Sampler speed → On a GPU": N = 300 gave AUROC 0.747 / 0.726 / 0.598, correlation - / 0.997 / 0.831."""
import dataclasses
import sys

import torch
from hydra import compose, initialize_config_module
from dng_cli import metrics, pipeline, spec
from dng_cli.sampler import generate_all, to_uint8
from dng_cli.models import load_classifier, classify

torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
with initialize_config_module("dng_cli.configs", version_base="1.3"):
    cfg = compose("evaluate", ["method=dng", "method.guidance_scale=0", "sampler.progress=false"])
clf = load_classifier("mnist")
for rel in (0.0, 1e-3, 1e-2):
    gen = pipeline.build(spec.resolve_run(cfg, scored=False), torch.device("cpu"))
    base = gen.eps_fn
    g = torch.Generator().manual_seed(123)
    def noisy(x, t, base=base, rel=rel):
        u, c = base(x, t)
        if rel:
            u = u * (1 + rel * torch.randn(u.shape, generator=g))
            c = c * (1 + rel * torch.randn(c.shape, generator=g))
        return u, c
    gen = dataclasses.replace(gen, eps_fn=noisy)
    out = generate_all(gen, list(range(n)), 100, progress=False)
    preds, _ = classify(clf, to_uint8(out.images))
    lp = out.posterior[-1].clamp_min(1e-12).log()
    det = metrics.posterior_detection(out.posterior, metrics.is_forbidden(preds, [0]))
    print(f"rel {rel:g}: zeros {int((preds == 0).sum())}/{n}, auroc {det.get('posterior_auroc')}, "
          f"mean log p_final {lp.mean():.3f}", flush=True)
    if rel == 0.0:
        ref = lp
    else:
        print(f"   |Δ log p_final| median {(lp - ref).abs().median():.4f}, max {(lp - ref).abs().max():.3f}, corr {torch.corrcoef(torch.stack([lp.flatten(), ref.flatten()]))[0,1]:.4f}", flush=True)
