"""``dng sd``: negative guidance on Stable Diffusion (Rombach et al. 2022), as in the DNG paper's Sec. 6.

Per step ONE batched UNet forward of ``[z; z; z]`` with the text embeddings of ``""``, the prompt and
the negative prompt gives ε_∅, ε_p, ε_n. The prompt with its classifier-free guidance plays the
unconditional part and the negative prompt the forbidden class:

    ε_u = ε_∅ + w (ε_p - ε_∅)          (w = cfg_scale)
    ε_c = ε_n
    ε̃  = ε_u - λ_t (ε_c - ε_u)         (NP: λ_t = λ; DNG: λ_t = λ p/(1-p); SLD: Eqs. 3-8)

Sampling is DDPM ancestral on the latent with the model's own β schedule (respaced), so DNG's
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
from omegaconf import DictConfig

from dng_cli import UserError, pipeline
from dng_cli.commands.common import atomic_save, atomic_write_text, entry, setup_torch
from dng_cli.sampler import randn, sample
from dng_cli.schedule import NoiseSchedule

log = logging.getLogger(__name__)


@dataclass
class StableDiffusion:
    tokenizer: object
    text_encoder: object
    unet: object
    vae: object
    betas: torch.Tensor
    scaling_factor: float


def _scheduler_betas(config: dict) -> torch.Tensor:
    kind, start, end, T = (config.get("beta_schedule", "scaled_linear"), config.get("beta_start", 0.00085),
                           config.get("beta_end", 0.012), config.get("num_train_timesteps", 1000))
    if kind == "scaled_linear":
        return torch.linspace(start**0.5, end**0.5, T, dtype=torch.float64) ** 2
    if kind == "linear":
        return torch.linspace(start, end, T, dtype=torch.float64)
    raise UserError(f"scheduler beta_schedule={kind!r} is not supported: allowed are scaled_linear, linear")


def tiny_random(seed: int = 0) -> StableDiffusion:
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
                           _scheduler_betas({}), float(vae.config.scaling_factor))


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
                               vae.eval(), _scheduler_betas(sched), float(vae.config.scaling_factor))
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
    """eps_fn for SD: ε_u = CFG-guided prompt prediction, ε_c = negative-prompt prediction (one forward)."""

    def __init__(self, unet, embeddings: torch.Tensor, cfg_scale: float):
        self.unet, self.embeddings, self.cfg_scale = unet, embeddings, cfg_scale  # embeddings: [3, L, D]
        self._cache: dict[int, torch.Tensor] = {}

    def __call__(self, z: torch.Tensor, t: torch.Tensor):
        b = z.shape[0]
        if b not in self._cache:
            self._cache[b] = self.embeddings.repeat_interleave(b, 0)
        out = self.unet(z.repeat(3, 1, 1, 1), t.repeat(3), encoder_hidden_states=self._cache[b], return_dict=False)[0]
        e0, ep, en = out.chunk(3)
        return e0 + self.cfg_scale * (ep - e0), en


def check_cfg(cfg: DictConfig) -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserError('dng sd needs the transformers package: pip install -e ".[sd]"') from None
    if cfg.sd_model != "tiny_random" and not Path(str(cfg.sd_model)).is_dir():
        raise UserError(f"sd_model={str(cfg.sd_model)!r} is not a folder: give a local diffusers Stable Diffusion "
                        f"folder or tiny_random")
    if not str(cfg.prompt).strip():
        raise UserError("prompt is empty: pass prompt=\"...\"")
    pipeline.build_guidance(cfg.method)
    if cfg.method.name == "none":
        return
    if not str(cfg.negative_prompt).strip():
        raise UserError(f"negative_prompt is empty: method={cfg.method.name} needs the concept to remove")
    for key in ("n_samples", "steps", "batch_size"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] <= 0:
            raise UserError(f"{key}={cfg[key]!r} is invalid: it must be a positive integer")


def run(cfg: DictConfig, output_dir: Path) -> dict:
    check_cfg(cfg)
    device = setup_torch(cfg.device, cfg.get("num_threads"))
    sd = tiny_random(int(cfg.seed)) if cfg.sd_model == "tiny_random" else load(str(cfg.sd_model))
    for m in (sd.text_encoder, sd.unet, sd.vae):
        m.to(device).requires_grad_(False)
    emb = encode(sd, ["", str(cfg.prompt), str(cfg.negative_prompt)], device)
    eps_fn = PromptEps(sd.unet, emb, float(cfg.cfg_scale))
    schedule = NoiseSchedule.from_betas(sd.betas).respace(int(cfg.steps))
    guidance = pipeline.build_guidance(cfg.method)
    size = int(sd.unet.config.sample_size)
    shape = (int(sd.unet.config.in_channels), size, size)
    seeds = [int(cfg.seed) + i for i in range(int(cfg.n_samples))]
    t0 = time.time()
    images, posts, scales = [], [], []
    for i in range(0, len(seeds), int(cfg.batch_size)):
        gens = [torch.Generator(device=device).manual_seed(s) for s in seeds[i:i + int(cfg.batch_size)]]
        with torch.inference_mode():
            out = sample(eps_fn, schedule, guidance, randn((len(gens), *shape), gens, device=device), gens,
                         progress=bool(cfg.progress), variance=cfg.variance)
            images.append(sd.vae.decode(out.images / sd.scaling_factor, return_dict=False)[0].cpu())
        posts.append(out.posterior.cpu())
        scales.append(out.scale.cpu())
    wall = time.time() - t0
    uint8 = pipeline.to_uint8(torch.cat(images))
    posterior, scale = torch.cat(posts, 1), torch.cat(scales, 1)
    output_dir.mkdir(parents=True, exist_ok=True)
    from dng_cli.plots import trajectory_csv
    from dng_cli.plots import guidance_plot, save_grid

    save_grid(uint8, output_dir / "samples.png")
    atomic_save(output_dir / "samples.npz", lambda tmp: np.savez_compressed(
        open(tmp, "wb"), images=uint8.numpy(), seeds=np.asarray(seeds)))
    atomic_write_text(output_dir / "trajectory.csv", trajectory_csv(out.timesteps, posterior, scale))
    guidance_plot(out.timesteps, scale, posterior, output_dir / "guidance.png",
                  title=f"{cfg.method.name}: '{cfg.prompt}' without '{cfg.negative_prompt}'")
    log.info("%d images in %.1fs -> %s", len(seeds), wall, output_dir)
    return {"images": uint8, "posterior": posterior, "scale": scale, "wall_time_s": wall}


main = entry("sd", run)
