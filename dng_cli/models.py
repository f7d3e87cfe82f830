"""Networks and their loaders: diffusers UNet2DModel DDPMs, the classifier, and eps_fn adapters.

Checkpoints are ``save_pretrained`` folders (safetensors + JSON); nothing is ever unpickled.
``load_ddpm("mnist")`` / ``load_classifier("mnist")`` return the assets shipped in the package.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from dng_cli import UserError

ASSETS = Path(__file__).resolve().parent / "assets"
SHIPPED = {p.name: p for p in sorted(ASSETS.iterdir()) if p.is_dir()}  # assets/<name>/{ddpm,classifier,fid}


# ----------------------------------------------------------------------------------------- UNet
def build_unet(arch: dict[str, Any], seed: int | None = None):
    """A fresh diffusers UNet2DModel from an architecture dict (the model config's ``unet`` block)."""
    from diffusers import UNet2DModel

    arch = dict(arch)
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        if key in arch:
            arch[key] = tuple(arch[key])
    if seed is not None:
        torch.manual_seed(seed)
    return UNet2DModel(**arch)


def resolve(name_or_path: str | Path, kind: str) -> Path:
    """The folder of a shipped asset by name ("mnist") and kind ("ddpm", "classifier"), or the path itself."""
    name = str(name_or_path)
    if name in SHIPPED:
        return SHIPPED[name] / kind
    return Path(name).expanduser()


def load_ddpm(name_or_path: str | Path):
    """A UNet2DModel from a ``save_pretrained`` folder, or a shipped one by name ("mnist")."""
    from diffusers import UNet2DModel
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    path = resolve(name_or_path, "ddpm")
    if not (path / "config.json").is_file():
        raise UserError(f"model path {str(path)!r} is not a checkpoint folder: expected config.json and "
                        f"diffusion_pytorch_model.safetensors (a save_pretrained folder) or a shipped name ({', '.join(SHIPPED)})")
    try:
        unet = UNet2DModel.from_pretrained(str(path), use_safetensors=True, local_files_only=True,
                                           low_cpu_mem_usage=False)
    except Exception as err:  # corrupt weights or config
        raise UserError(f"model path {str(path)!r} could not be loaded as a UNet2DModel: {type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}") from None
    return unet.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------- classifier
class Classifier(nn.Module):
    """A small CNN on images in [-1, 1]; ``features`` (penultimate layer) is the FID feature space."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.config = dict(in_channels=in_channels, num_classes=num_classes, width=width, feature_dim=feature_dim)
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(4 * w, feature_dim), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(feature_dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def save_pretrained(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path / "model.safetensors"))
        (path / "config.json").write_text(json.dumps(self.config, indent=2))


def load_classifier(name_or_path: str | Path) -> Classifier:
    """The classifier from a folder with config.json + model.safetensors, or a shipped one ("mnist").

    Takes images in [-1, 1] ``[B, C, H, W]`` and returns logits; eval mode, no gradients.
    """
    from safetensors.torch import load_file

    path = resolve(name_or_path, "classifier")
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise UserError(f"classifier path {str(path)!r} is not a classifier folder: expected config.json and "
                        f"model.safetensors, or a shipped name ({', '.join(SHIPPED)})")
    try:
        model = Classifier(**json.loads((path / "config.json").read_text()))
        model.load_state_dict(load_file(str(path / "model.safetensors")))
    except Exception as err:
        raise UserError(f"classifier path {str(path)!r} could not be loaded: {type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}") from None
    return model.eval().requires_grad_(False)


@torch.inference_mode()
def classify(classifier: Classifier, images: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted classes, penultimate features) of images: uint8 [0, 255] or floats in [-1, 1]."""
    preds, feats = [], []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        x = x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x.float()
        f = classifier.features(x)
        feats.append(f)
        preds.append(classifier.head(f).argmax(1))
    return torch.cat(preds), torch.cat(feats)


# ------------------------------------------------------------------------------------- eps_fns
class Network:
    """One UNet as the sampler calls it: memory format, optional ``torch.compile`` and micro-batches.

    ``max_batch`` splits a call into chunks of at most that many images (on a CPU a forward of 256
    28x28 images is slower per image than two of 128: cache size); with ``compile`` every chunk is
    padded to ``max_batch`` rows so the compiled graph sees one shape and never recompiles.
    """

    def __init__(self, unet, channels_last: bool = False, compile: bool = False, max_batch: int | None = None):
        if max_batch is not None and int(max_batch) <= 0:
            raise UserError(f"max_batch={max_batch} is invalid: it must be a positive integer or null")
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.unet = unet.to(memory_format=self.memory_format)
        self.max_batch = int(max_batch) if max_batch else None
        self.compiled = bool(compile)
        self.forward = torch.compile(self.unet, dynamic=False) if compile else self.unet

    def __call__(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        n, m = x.shape[0], self.max_batch
        if m is None or (n <= m and not self.compiled):
            return self._run(x, t, class_labels)
        outs = []
        for i in range(0, n, m):
            xs, ts = x[i:i + m], t[i:i + m]
            ls = class_labels[i:i + m] if class_labels is not None else None
            pad = m - xs.shape[0] if self.compiled else 0
            if pad:
                xs = torch.cat([xs, xs[:1].expand(pad, *xs.shape[1:])])
                ts = torch.cat([ts, ts[:1].expand(pad)])
                ls = torch.cat([ls, ls[:1].expand(pad)]) if ls is not None else None
            outs.append(self._run(xs, ts, ls)[:m - pad])
        return torch.cat(outs)

    def _run(self, x, t, class_labels):
        x = x.contiguous(memory_format=self.memory_format)
        return self.forward(x, t, class_labels=class_labels, return_dict=False)[0].contiguous()


class ClassConditionalEps:
    """eps_fn of one class-conditional UNet2DModel (last class index = null label).

    Per call ONE batched forward of ``[x; x; …]`` (1 + K copies) with labels ``[null; c_1; …; c_K]``
    (split into chunks of ``max_batch`` when set). ``label`` replaces the null label of the
    "unconditional" part (class-conditional sampling). ``channels_last`` runs the network in NHWC
    memory format and ``compile`` through ``torch.compile`` (see scripts/bench_sampler.py for what
    each buys on a given machine).
    """

    def __init__(self, unet, forbidden: Sequence[int] = (), label: int | None = None, channels_last: bool = False,
                 compile: bool = False, max_batch: int | None = None):
        num_embeds = getattr(unet.config, "num_class_embeds", None)
        if not num_embeds:
            raise UserError("model has no class embedding (num_class_embeds is empty): use model kind 'pair' "
                            "for unconditional checkpoints")
        self.net = Network(unet, channels_last, compile, max_batch)
        self.unet = self.net.unet
        self.num_classes = int(num_embeds) - 1
        self.null_label = self.num_classes
        for c in list(forbidden) + ([label] if label is not None else []):
            if not (isinstance(c, int) and 0 <= c < self.num_classes):
                raise UserError(f"class {c!r} is out of range: the model knows classes 0..{self.num_classes - 1}")
        self.forbidden = list(forbidden)
        self.label = self.null_label if label is None else int(label)
        self._labels: dict[tuple[int, torch.device], torch.Tensor] = {}

    def labels(self, batch: int, device: torch.device) -> torch.Tensor:
        key = (batch, device)
        if key not in self._labels:
            ids = torch.tensor([self.label] + self.forbidden, device=device)
            self._labels[key] = ids.repeat_interleave(batch)
        return self._labels[key]

    def __call__(self, x: torch.Tensor, t: torch.Tensor):
        k = 1 + len(self.forbidden)
        xx = x if k == 1 else x.repeat(k, *([1] * (x.dim() - 1)))
        out = self.net(xx, t.repeat(k), self.labels(x.shape[0], x.device))
        out = out.reshape(k, *x.shape)
        return out[0], (out[1:] if k > 1 else None)


class PairEps:
    """eps_fn of separate networks (the paper's CIFAR-10 setting): an unconditional model for ε_u and
    one model trained on each forbidden class only for ε_c."""

    def __init__(self, unconditional, forbidden_models: Sequence = (), channels_last: bool = False,
                 compile: bool = False, max_batch: int | None = None):
        self.unconditional = Network(unconditional, channels_last, compile, max_batch)
        self.forbidden_models = [Network(m, channels_last, compile, max_batch) for m in forbidden_models]

    def __call__(self, x: torch.Tensor, t: torch.Tensor):
        eps_u = self.unconditional(x, t)
        if not self.forbidden_models:
            return eps_u, None
        return eps_u, torch.stack([m(x, t) for m in self.forbidden_models])
