"""From a run spec (``dng_cli.spec``) to samples: the ``sampler.SamplingSetup`` (``build``), every seed's sample
drawn or read back from the batches of an interrupted attempt (``draw``), and the torch device a run uses.

Shared by ``dng sample``, ``dng evaluate`` and the compare/calibrate loops; everything here takes a resolved
``spec.RunSpec``. Sample i always starts from x_T drawn by its own generator seeded ``seed + i`` and draws every
later noise from it too (``sampler.generate``), so a sample does not depend on the batch size or on which other
samples are drawn, and methods are compared on identical noise.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from dng_cli import UserError, io, spec
from dng_cli.models import load_model, make_eps_fn
from dng_cli.sampler import SamplingSetup, as_epsilon, generate_all, to_uint8

log = logging.getLogger(__name__)


def build(run: spec.RunSpec, device: torch.device, network=None, label: int | None = None) -> SamplingSetup:
    """A ``SamplingSetup`` for a run spec; ``network``: an already loaded model (``models.load_model``) to reuse."""
    guidance = run.guidance()
    network = network if network is not None else load_model(run.model, device)
    s = run.sampler
    eps_fn = make_eps_fn(network, run.model, run.forbidden, guidance, label, s.channels_last, s.compile, s.max_batch,
                         s.precision, s.backend)
    backend = eps_fn.backend
    eps_fn = as_epsilon(eps_fn, run.schedule, run.model.prediction_type)
    return SamplingSetup(eps_fn, run.schedule, guidance, run.dataset.shape, device, s.variance, backend)


def setup_torch(device: str = "cpu", num_threads: int | None = None) -> torch.device:
    """The device, with the thread count every backend uses: ``num_threads`` (sampler.num_threads), else
    ``OMP_NUM_THREADS`` (torch reads it itself), else SLURM's ``--cpus-per-task`` for a job that SLURM started
    (no more threads than the job's cores when several share a node), else torch's default."""
    slurm = os.environ.get("SLURM_CPUS_PER_TASK")
    if not num_threads and not os.environ.get("OMP_NUM_THREADS") and slurm and slurm.isdigit() and int(slurm) > 0:
        num_threads = int(slurm)
    if num_threads:
        torch.set_num_threads(int(num_threads))
    device = spec.auto_device(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={device!r} is unavailable: no CUDA device here (use device=cpu)")
    return torch.device(device)


def device_name(device: torch.device) -> str:
    """The device actually used, as recorded with a result ("cpu", "cuda:0"; never "auto")."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def hardware() -> str:
    import platform

    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}"
    return f"cpu:{platform.processor() or platform.machine()} x{os.cpu_count()} threads={torch.get_num_threads()}"


@dataclass
class Drawn:
    """A run's samples, all seeds, on the CPU: uint8 images, the posterior/scale trajectories [steps, N(, K)], the
    sampling seconds of the kept samples over all attempts, and where and how they were drawn."""

    images: torch.Tensor
    posterior: torch.Tensor
    scale: torch.Tensor
    seconds: float
    sampled_on: str
    backend: str
    tracks_posterior: bool


def draw(run: spec.RunSpec, device: torch.device, partial, network=None) -> Drawn:
    """Every seed of ``run``: the batches ``partial`` (``runs.PartialBatches``) holds are read back, the missing
    ones drawn and saved there batch by batch, so a killed run resumes where it stopped."""
    gen = build(run, device, network)
    seeds = run.seeds
    done = partial.load(seeds)
    todo = [s for s in seeds if s not in done]
    if done:
        log.info("%s: resuming: %d of %d samples were drawn before, drawing the other %d", partial.dir.parent, len(done),
                 len(seeds), len(todo))
    io.pause_for_tests("evaluate")

    def keep(batch_seeds, out, seconds):
        partial.save(batch_seeds, to_uint8(out.images).numpy(), out.posterior.numpy(), out.scale.numpy(), seconds)

    if todo:
        generate_all(gen, todo, run.sampler.batch_size, progress=run.sampler.progress, on_batch=keep)
    batches = partial.load(seeds)
    return Drawn(torch.from_numpy(np.stack([batches[s][0] for s in seeds])),
                 torch.from_numpy(np.stack([batches[s][1] for s in seeds], 1)),
                 torch.from_numpy(np.stack([batches[s][2] for s in seeds], 1)),
                 sum(batches[s][3] for s in seeds), device_name(gen.device), gen.backend,
                 gen.guidance.tracks_posterior)
