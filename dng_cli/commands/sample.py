"""``dng sample``: guided samples with their per-step posterior and guidance-scale trajectories.

Writes in the run dir: samples.png (grid), samples.npz (uint8 images + the seed of each),
trajectory.csv (per step: timestep, mean and quantiles of posterior and scale), guidance.png.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from dng_cli import metrics, pipeline, runs
from dng_cli.models import classify
from dng_cli.commands.common import atomic_write_text, entry, setup_torch

log = logging.getLogger(__name__)


def final_verdict(cfg: DictConfig, images: torch.Tensor) -> torch.Tensor | None:
    """Is each final image classified as a forbidden class? None when the model config names no classifier."""
    if OmegaConf.is_missing(cfg.model, "classifier") or cfg.model.get("classifier") is None:
        return None
    preds, _ = classify(pipeline.run_classifier(cfg), images)
    return metrics.is_forbidden(preds, pipeline.forbidden_classes(cfg, int(cfg.dataset.num_classes)))


def run(cfg: DictConfig, output_dir: Path) -> dict:
    pipeline.check_run_cfg(cfg)
    device = setup_torch(cfg.sampler.device, cfg.sampler.get("num_threads"))
    gen = pipeline.build(cfg, device)
    seeds = [int(cfg.sampler.seed) + i for i in range(int(cfg.n_samples))]
    t0 = time.time()
    out = pipeline.generate_all(gen, seeds, int(cfg.sampler.batch_size), progress=bool(cfg.sampler.progress))
    wall = time.time() - t0
    images = pipeline.to_uint8(out.images)
    output_dir.mkdir(parents=True, exist_ok=True)
    from dng_cli.plots import guidance_plot, save_grid, trajectory_csv

    save_grid(images, output_dir / "samples.png")
    runs.save_samples(output_dir / runs.SAMPLES_NAME, images.numpy(), seeds,
                      runs.samples_fingerprint(pipeline.result_identity(cfg, classifier=False)),
                      pipeline.device_name(gen.device), "sample")
    atomic_write_text(output_dir / "trajectory.csv", trajectory_csv(out.timesteps, out.posterior, out.scale))
    guidance_plot(out.timesteps, out.scale, out.posterior, output_dir / "guidance.png",
                  title=f"{cfg.method.name}, forbidden {pipeline.forbidden_names(cfg, list(cfg.forbidden))}, {len(gen.schedule)} steps",
                  is_forbidden=final_verdict(cfg, images))
    log.info("%d samples in %.1fs (%.1f images/s) -> %s", len(seeds), wall, len(seeds) / wall, output_dir)
    return {"images": images, "output": out, "wall_time_s": wall}


check_cfg = pipeline.check_run_cfg
main = entry("sample", run)
