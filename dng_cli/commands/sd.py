"""``dng sd``: negative guidance on Stable Diffusion (Rombach et al. 2022), as in the DNG paper's Sec. 6.

Per step ONE batched UNet forward of ``[z; z; z]`` with the text embeddings of ``""``, the prompt and
the negative prompt gives ε_∅, ε_p, ε_n. The prompt with its classifier-free guidance plays the
unconditional part and the negative prompt the forbidden class:

    ε_u = ε_∅ + w (ε_p - ε_∅)          (w = cfg_scale)
    ε_c = ε_n
    ε̃  = ε_u - λ_t (ε_c - ε_u)         (NP: λ_t = λ; DNG: λ_t = λ p/(1-p); SLD: Eqs. 3-8)

Methods defined on the raw branches (``method=negative_prompt``: diffusers' replaced-branch negative
prompt; ``method=sld_weak|medium|strong|max``: diffusers' ``StableDiffusionPipelineSafe``) get
ε_∅ and [ε_p, ε_n] instead (their ``Guidance.inputs`` name the prompt branches).

Sampling is DDPM ancestral on the latent with the model's own β schedule and prediction type (read
from its scheduler/scheduler_config.json; v- and x₀-predictions are converted to ε), respaced: the
chain equals diffusers' ``DDPMScheduler(timestep_spacing="linspace", clip_sample=False)``, and DNG's
Gaussian transition ratio — and hence its posterior — is exact for the chain we sample. Other
schedulers (DDIM with η=0, DPM-Solver, Euler) take deterministic or non-Gaussian steps: the
posterior update then needs a stand-in variance and is only an approximation; we do not offer them.
Writes samples.png, samples.npz, trajectory.csv and guidance.png (λ_t and p over the reverse process).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from dng_cli import UserError
from dng_cli.commands.common import entry
from dng_cli.guidance import METHODS, build_guidance
from dng_cli.io import atomic_savez, atomic_write_text
from dng_cli.pipeline import setup_torch
from dng_cli.sampler import SamplingSetup, as_epsilon, generate_all, to_uint8
from dng_cli.schedule import NoiseSchedule, check_prediction_type
from dng_cli.spec import plain, respaced
from dng_cli.spec import check_types

log = logging.getLogger(__name__)


@dataclass
class StableDiffusion:
    tokenizer: object
    text_encoder: object
    unet: object
    vae: object
    scheduler_config: dict  # diffusers scheduler config: the β schedule and prediction_type
    scaling_factor: float


# Stable Diffusion 1.x/2.x's β schedule (diffusers' scheduler_config.json of those checkpoints)
SD_SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def tiny_random(seed: int = 0, prediction_type: str = "epsilon") -> StableDiffusion:
    """A tiny randomly initialised SD (UNet, VAE, CLIP text encoder + character tokenizer): offline tests."""
    import json
    import tempfile

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    # GPT-2/CLIP byte-level alphabet: printable bytes keep their character, the rest map above 255
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        tokenizer = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                                                bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=4, attention_head_dim=2)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
                        latent_channels=4, norm_num_groups=4, sample_size=16)
    return StableDiffusion(tokenizer, text_encoder.eval(), unet.eval(), vae.eval(),
                           {**SD_SCHEDULER, "prediction_type": prediction_type}, float(vae.config.scaling_factor))


def load(path: str) -> StableDiffusion:
    """Components of a local diffusers Stable Diffusion folder (tokenizer/, text_encoder/, unet/, vae/, scheduler/)."""
    import json

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    root = Path(path)
    for sub in ("tokenizer", "text_encoder", "unet", "vae", "scheduler"):
        if not (root / sub).is_dir():
            raise UserError(f"sd_model={path!r} is not a diffusers Stable Diffusion folder: {sub}/ is missing "
                            f"(or use sd_model=tiny_random)")
    try:
        vae = AutoencoderKL.from_pretrained(root / "vae", local_files_only=True)
        sched = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
        return StableDiffusion(CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True),
                               CLIPTextModel.from_pretrained(root / "text_encoder", local_files_only=True).eval(),
                               UNet2DConditionModel.from_pretrained(root / "unet", local_files_only=True).eval(),
                               vae.eval(), sched, float(vae.config.scaling_factor))
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"sd_model={path!r} could not be loaded: {type(err).__name__}: {str(err).splitlines()[0]}") from None


@torch.inference_mode()
def encode(sd: StableDiffusion, prompts: list[str], device) -> torch.Tensor:
    ids = sd.tokenizer(prompts, padding="max_length", max_length=sd.tokenizer.model_max_length, truncation=True,
                       return_tensors="pt").input_ids.to(device)
    return sd.text_encoder(ids)[0]


class PromptEps:
    """eps_fn for SD, one batched UNet forward of [z; z; z] with the embeddings of "", prompt, negative.

    Default: ε_u = ε_∅ + w (ε_p - ε_∅) (the prompt with classifier-free guidance), ε_c = ε_n.
    ``branches=True`` (methods whose ``inputs`` are the prompt branches): ε_u = ε_∅, ε_c = [ε_p, ε_n]."""

    def __init__(self, unet, embeddings: torch.Tensor, cfg_scale: float, branches: bool = False):
        self.unet, self.embeddings, self.cfg_scale = unet, embeddings, cfg_scale  # embeddings: [3, L, D]
        self.branches = branches
        self._cache: dict[int, torch.Tensor] = {}

    def __call__(self, z: torch.Tensor, t: torch.Tensor):
        b = z.shape[0]
        if b not in self._cache:
            self._cache[b] = self.embeddings.repeat_interleave(b, 0)
        out = self.unet(z.repeat(3, 1, 1, 1), t.repeat(3), encoder_hidden_states=self._cache[b], return_dict=False)[0]
        e0, ep, en = out.chunk(3)
        if self.branches:
            return e0, torch.stack([ep, en])
        return e0 + self.cfg_scale * (ep - e0), en


def setup(sd: StableDiffusion, cfg: DictConfig, device: torch.device) -> SamplingSetup:
    """The SD model as a ``sampler.SamplingSetup``: the same ``sampler.generate`` path as ``dng sample``."""
    method = OmegaConf.to_container(cfg.method, resolve=True)
    guidance_cls = METHODS.get(method.get("name"))
    if guidance_cls is not None and "prompt" in guidance_cls.inputs:
        method["cfg_scale"] = float(cfg.cfg_scale)
    guidance = build_guidance(method)
    emb = encode(sd, ["", str(cfg.prompt), str(cfg.negative_prompt)], device)
    schedule = respaced(NoiseSchedule.from_scheduler(sd.scheduler_config), cfg.sampler)
    eps_fn = as_epsilon(PromptEps(sd.unet, emb, float(cfg.cfg_scale), branches="prompt" in guidance.inputs), schedule,
                        str(sd.scheduler_config.get("prediction_type", "epsilon")))
    size = int(sd.unet.config.sample_size)
    return SamplingSetup(eps_fn, schedule, guidance, (int(sd.unet.config.in_channels), size, size), device,
                                  str(cfg.sampler.variance))


def check_cfg(cfg: DictConfig) -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserError('dng sd needs the transformers package: pip install -e ".[sd]"') from None
    if cfg.sd_model != "tiny_random" and not Path(str(cfg.sd_model)).is_dir():
        raise UserError(f"sd_model={str(cfg.sd_model)!r} is not a folder: give a local diffusers Stable Diffusion "
                        f"folder or tiny_random")
    if str(cfg.sampler.get("precision", "fp32")) not in ("fp32", "auto"):  # auto: fp32, the only precision here
        raise UserError(f"sampler.precision={cfg.sampler.precision} is not supported by dng sd (it runs the SD UNet in "
                        f"fp32): use sampler.precision=fp32 or auto")
    if str(cfg.sampler.get("backend", "auto")) not in ("torch", "auto"):  # auto: torch, the only backend here
        raise UserError(f"sampler.backend={cfg.sampler.backend} is not supported by dng sd (it runs the SD UNet on "
                        f"torch): use sampler.backend=torch or auto")
    if not str(cfg.prompt).strip():
        raise UserError("prompt is empty: pass prompt=\"...\"")
    respaced(NoiseSchedule.from_scheduler(SD_SCHEDULER), cfg.sampler)  # steps, variance
    build_guidance(plain(cfg.method))
    if cfg.method.name == "none":
        return
    if not str(cfg.negative_prompt).strip():
        raise UserError(f"negative_prompt is empty: method={cfg.method.name} needs the concept to remove")
    check_types(cfg)  # n_samples, sampler.steps, sampler.batch_size, cfg_scale: the declared type/range table


def run(cfg: DictConfig, output_dir: Path) -> dict:
    check_cfg(cfg)
    device = setup_torch(cfg.sampler.device, cfg.sampler.get("num_threads"))
    sd = tiny_random(int(cfg.seed)) if cfg.sd_model == "tiny_random" else load(str(cfg.sd_model))
    check_prediction_type(str(sd.scheduler_config.get("prediction_type", "epsilon")))
    for m in (sd.text_encoder, sd.unet, sd.vae):
        m.to(device).requires_grad_(False)
    gen = setup(sd, cfg, device)
    seeds = [int(cfg.seed) + i for i in range(int(cfg.n_samples))]
    batch = int(cfg.sampler.batch_size)
    t0 = time.time()
    out = generate_all(gen, seeds, batch, progress=bool(cfg.sampler.progress))
    with torch.inference_mode():
        images = [sd.vae.decode(out.images[i:i + batch].to(device) / sd.scaling_factor, return_dict=False)[0].cpu()
                  for i in range(0, len(seeds), batch)]
    wall = time.time() - t0
    uint8 = to_uint8(torch.cat(images))
    output_dir.mkdir(parents=True, exist_ok=True)
    from dng_cli.plots import guidance_plot, save_grid, trajectory_csv

    save_grid(uint8, output_dir / "samples.png")
    atomic_savez(output_dir / "samples.npz", compressed=True, images=uint8.numpy(), latents=out.images.numpy(),
                 seeds=np.asarray(seeds))
    atomic_write_text(output_dir / "trajectory.csv", trajectory_csv(out.timesteps, out.posterior, out.scale))
    guidance_plot(out.timesteps, out.scale, out.posterior, output_dir / "guidance.png",
                  title=f"{cfg.method.name}: '{cfg.prompt}' without '{cfg.negative_prompt}'",
                  labels=[f"image {i} (seed {s})" for i, s in enumerate(seeds)] if len(seeds) <= 8 else None)
    log.info("%d images in %.1fs -> %s", len(seeds), wall, output_dir)
    return {"images": uint8, "latents": out.images, "posterior": out.posterior, "scale": out.scale, "wall_time_s": wall}


main = entry("sd", run)
