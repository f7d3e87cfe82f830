"""``dng sample``: guided samples with their per-step posterior and guidance-scale trajectories.

Writes in the run dir: samples.png (grid), samples.npz (uint8 images + the seed of each),
trajectory.csv (per step: timestep, mean and quantiles of posterior and scale), guidance.png.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from dng_cli import metrics, pipeline, runs, scoring, spec, trackers
from dng_cli.commands.common import entry
from dng_cli.io import atomic_write_text
from dng_cli.models import classify
from dng_cli.sampler import generate_all, to_uint8

log = logging.getLogger(__name__)


def final_verdict(run: spec.RunSpec, images: torch.Tensor) -> torch.Tensor | None:
    """Is each final image classified as a forbidden class? None when the model config names no classifier."""
    if run.model.classifier is None:
        return None
    preds, _ = classify(scoring.classifier_of(run), images)
    return metrics.is_forbidden(preds, list(run.forbidden))


def check_cfg(cfg: DictConfig) -> spec.RunSpec:
    """Every check that needs nothing heavy; the run spec the rest of the run uses."""
    return spec.resolve_run(cfg, scored=False)


def run(cfg: DictConfig, output_dir: Path) -> dict:
    run_spec = check_cfg(cfg)  # the config, resolved once
    device = pipeline.setup_torch(run_spec.sampler.device, run_spec.sampler.num_threads)
    gen = pipeline.build(run_spec, device)
    seeds = run_spec.seeds
    t0 = time.time()
    out = generate_all(gen, seeds, run_spec.sampler.batch_size, progress=run_spec.sampler.progress)
    wall = time.time() - t0
    images = to_uint8(out.images)
    output_dir.mkdir(parents=True, exist_ok=True)
    from dng_cli.plots import guidance_plot, save_grid, trajectory_csv

    save_grid(images, output_dir / "samples.png")
    runs.save_samples(output_dir / runs.SAMPLES_NAME, images.numpy(), seeds, runs.samples_fingerprint(dict(run_spec.identity)),
                      pipeline.device_name(gen.device), "sample", backend=np.asarray(gen.backend))
    atomic_write_text(output_dir / "trajectory.csv", trajectory_csv(out.timesteps, out.posterior, out.scale))
    guidance_plot(out.timesteps, out.scale, out.posterior, output_dir / "guidance.png",
                  title=f"{run_spec.method_name}, forbidden {run_spec.dataset.names_of(run_spec.forbidden)}, {len(gen.schedule)} steps",
                  is_forbidden=final_verdict(run_spec, images))
    log.info("%d samples in %.1fs (%.1f images/s) -> %s", len(seeds), wall, len(seeds) / wall, output_dir)
    post = out.posterior.sum(-1) if out.posterior.dim() == 3 else out.posterior
    trackers.log_result(trackers.config_of(run_spec.config), "sample", output_dir,
                        {"config": run_spec.plain_config(), "fingerprint": runs.samples_fingerprint(dict(run_spec.identity)),
                         "label": run_spec.label, "n_samples": len(seeds), "wall_time_s": wall,
                         "images_per_s": len(seeds) / wall, "mean_guidance_scale": float(out.scale.mean())},
                        images={"samples": output_dir / "samples.png", "guidance": output_dir / "guidance.png"},
                        series={"guidance_scale_mean": out.scale.mean(1).tolist(), "posterior_mean": post.mean(1).tolist()})
    return {"images": images, "output": out, "wall_time_s": wall}


main = entry("sample", run)
