"""Networks and their loaders: diffusers UNet2DModel DDPMs, the classifier, and eps_fn adapters.

Checkpoints are ``save_pretrained`` folders (config.json + safetensors, or a ``.bin``/``.pt`` state dict read
with ``torch.load(weights_only=True)``); nothing is ever unpickled. ``load_ddpm("mnist")`` /
``load_classifier("mnist")`` return the assets shipped in the package. A classifier may also be a TorchScript
file or any ``_target_`` module (e.g. a torchvision model) with its input transform (``ExternalClassifier``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from dng_cli import UserError, one_line
from dng_cli.spec import (SHIPPED, UNET_WEIGHTS, ModelSpec, classifier_source, null_label_index, resolve, thawed,
                          unet_weights_file)


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


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, or of a torch state dict loaded with ``weights_only=True`` (no code runs);
    a checkpoint dict that holds its weights under "state_dict"/"model"/"ema" is unwrapped."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict) and len(state) <= 4:
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("it is not a state dict of tensors")
    return state


def load_ddpm(name_or_path: str | Path):
    """A UNet2DModel from a diffusers folder (config.json + weights, see ``unet_weights_file``), or a shipped
    one by name ("mnist")."""
    path = resolve(name_or_path, "ddpm")
    if not (path / "config.json").is_file():
        raise UserError(f"model path {str(path)!r} is not a checkpoint folder: expected config.json and "
                        f"diffusion_pytorch_model.safetensors (a save_pretrained folder) or a shipped name ({', '.join(SHIPPED)})")
    return load_unet(path, unet_weights_file(path))


def load_unet(path: Path, weights: Path):
    """A UNet2DModel from a diffusers folder and its weights file (as ``spec.ModelSpec`` resolved them)."""
    from diffusers import UNet2DModel
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    try:
        if weights.name == UNET_WEIGHTS[0]:
            unet = UNet2DModel.from_pretrained(str(path), use_safetensors=True, local_files_only=True,
                                               low_cpu_mem_usage=False)
        else:
            unet = UNet2DModel.from_config(UNet2DModel.load_config(str(path)))
            missing, unexpected = unet.load_state_dict(load_state_dict(weights), strict=False)
            if missing or unexpected:
                raise ValueError(f"{len(missing)} missing keys (e.g. {missing[:1]}), {len(unexpected)} unexpected "
                                 f"(e.g. {unexpected[:1]}) in {weights.name}")
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


class ExternalClassifier(nn.Module):
    """A classifier of your own — a TorchScript file or any ``_target_`` module — behind the interface of
    ``Classifier``: ``features`` takes images in [-1, 1] and applies its input transform (channels, resize,
    the input range, mean/std); its output logits are the FID features unless the module has its own
    ``features``/``head`` pair."""

    def __init__(self, net: nn.Module, transform: dict | None = None):
        super().__init__()
        self.net = net.eval()
        t = dict(transform or {})
        unknown = set(t) - {"channels", "size", "range", "mean", "std"}
        if unknown:
            raise UserError(f"model.classifier.transform has unknown keys {sorted(unknown)}: allowed are channels, "
                            f"size, range, mean, std")
        self.channels, self.size = t.get("channels"), t.get("size")
        lo, hi = t.get("range") or (-1.0, 1.0)
        self.lo, self.hi = float(lo), float(hi)
        self.mean = torch.tensor(t["mean"], dtype=torch.float32).view(1, -1, 1, 1) if t.get("mean") is not None else None
        self.std = torch.tensor(t["std"], dtype=torch.float32).view(1, -1, 1, 1) if t.get("std") is not None else None
        self.split = hasattr(net, "features") and hasattr(net, "head")
        self.head = net.head if self.split else nn.Identity()
        self.config: dict = {}

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels and x.shape[1] != int(self.channels):
            x = x.repeat(1, int(self.channels) // x.shape[1], 1, 1)
        if self.size:
            x = torch.nn.functional.interpolate(x, size=(int(self.size), int(self.size)), mode="bilinear",
                                                align_corners=False)
        x = self.lo + (x + 1.0) * (self.hi - self.lo) / 2.0
        if self.mean is not None:
            x = x - self.mean.to(x.device)
        if self.std is not None:
            x = x / self.std.to(x.device)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prepare(x)
        return self.net.features(x) if self.split else self.net(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def check(self, channels: int, size: int, num_classes: int) -> "ExternalClassifier":
        """One batch of dataset-shaped images through it before anything is sampled: it must return finite
        [B, num_classes] logits. Sets ``config`` (feature_dim, num_classes, in_channels)."""
        try:
            with torch.inference_mode():
                x = torch.linspace(-1, 1, 2 * channels * size * size).view(2, channels, size, size)
                f = self.features(x)
                logits = self.head(f)
        except Exception as err:
            raise UserError(f"model.classifier fails on a batch of {channels}x{size}x{size} images: "
                            f"{type(err).__name__}: {one_line(err)}") from None
        if logits.dim() != 2 or logits.shape != (2, num_classes):
            raise UserError(f"model.classifier returns {tuple(logits.shape)} for 2 images: expected logits "
                            f"(2, {num_classes}), one per dataset class")
        if not torch.isfinite(logits).all():
            raise UserError("model.classifier returns non-finite logits on a batch of test images")
        self.config = {"feature_dim": int(f.flatten(1).shape[1]), "num_classes": num_classes, "in_channels": channels}
        return self


def load_classifier(name_or_path, check: tuple[int, int, int] | None = None) -> nn.Module:
    """The classifier ``model.classifier`` names (see ``classifier_source``), eval mode, no gradients.

    Takes images in [-1, 1] ``[B, C, H, W]`` and returns logits. ``check`` = (channels, size, classes): a
    TorchScript or ``_target_`` classifier is run on one such batch first (``ExternalClassifier.check``).
    """
    from safetensors.torch import load_file

    src = classifier_source(name_or_path)
    if src["kind"] != "folder":
        net = _external_network(src)
        clf = ExternalClassifier(net, src["transform"]).requires_grad_(False)
        if check is None:
            raise UserError("a TorchScript or _target_ classifier needs the dataset's shape to be checked")
        return clf.check(*check)
    path = Path(src["path"])
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise UserError(f"classifier path {str(path)!r} is not a classifier folder: expected config.json and "
                        f"model.safetensors, a TorchScript file, or a shipped name ({', '.join(SHIPPED)})")
    try:
        model = Classifier(**json.loads((path / "config.json").read_text()))
        model.load_state_dict(load_file(str(path / "model.safetensors")))
    except Exception as err:
        raise UserError(f"classifier path {str(path)!r} could not be loaded: {type(err).__name__}: "
                        f"{one_line(err)}") from None
    return model.eval().requires_grad_(False)


def _external_network(src: dict) -> nn.Module:
    if src["kind"] == "torchscript":
        import warnings

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch 2.9+: "torch.jit.load is deprecated"
                return torch.jit.load(src["path"], map_location="cpu")
        except Exception as err:
            raise UserError(f"model.classifier={src['path']!r} is neither a classifier folder nor a TorchScript file: "
                            f"{type(err).__name__}: {one_line(err)}") from None
    import hydra.utils

    try:
        net = hydra.utils.instantiate({"_target_": src["target"], **src["kwargs"]})
    except Exception as err:
        raise UserError(f"model.classifier._target_={src['target']!r} could not be built: {type(err).__name__}: "
                        f"{one_line(err.__cause__ or err)}") from None
    if not isinstance(net, nn.Module):
        raise UserError(f"model.classifier._target_={src['target']!r} built a {type(net).__name__}, not a torch module")
    if src["weights"]:
        try:
            missing, unexpected = net.load_state_dict(load_state_dict(Path(str(src["weights"])).expanduser()), strict=False)
        except Exception as err:
            raise UserError(f"model.classifier.weights={str(src['weights'])!r} could not be loaded: "
                            f"{type(err).__name__}: {one_line(err)}") from None
        if missing or unexpected:
            raise UserError(f"model.classifier.weights={str(src['weights'])!r} do not fit {src['target']}: "
                            f"{len(missing)} missing, {len(unexpected)} unexpected keys")
    return net


@torch.inference_mode()
def classify(classifier: nn.Module, images: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted classes, penultimate features) of images: uint8 [0, 255] or floats in [-1, 1]."""
    preds, feats = [], []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        x = x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x.float()
        f = classifier.features(x)
        logits = classifier.head(f)
        bad = ~(torch.isfinite(f).flatten(1).all(1) & torch.isfinite(logits).all(1))
        if bool(bad.any()):  # argmax of NaN would be class 0, its features a NaN FID
            raise UserError(f"the classifier returned NaN/inf for {int(bad.sum())} of {len(x)} images in a batch "
                            f"(first: image {i + int(bad.nonzero()[0])} of the scored set): it cannot score these "
                            f"samples; check its weights (nothing was written)")
        feats.append(f)
        preds.append(logits.argmax(1))
    return torch.cat(preds), torch.cat(feats)


class Network:
    """One UNet as the sampler calls it: memory format, optional ``torch.compile`` and micro-batches.

    ``max_batch`` splits a call into chunks of at most that many images (on a CPU a forward of 256
    28x28 images is slower per image than two of 128: cache size); with ``compile`` every chunk is
    padded to ``max_batch`` rows so the compiled graph sees one shape and never recompiles.
    """

    def __init__(self, unet, channels_last: bool = False, compile: bool = False, max_batch: int | None = None,
                 precision: str = "fp32", backend: str = "torch"):
        if precision not in ("fp32", "bf16"):
            raise UserError(f"precision={precision!r} is invalid here: fp32 or bf16 (resolve auto first)")
        self.precision = precision
        if max_batch is not None and int(max_batch) <= 0:
            raise UserError(f"max_batch={max_batch} is invalid: it must be a positive integer or null")
        if backend != "torch" and (compile or precision != "fp32"):
            raise UserError(f"backend={backend} runs fp32 without compile (resolve it with backends.resolve first)")
        from dng_cli import backends

        graph, self.backend = backends.network(unet, backend)  # the graph backends take NCHW arrays
        self.memory_format = torch.channels_last if channels_last and self.backend == "torch" else torch.contiguous_format
        self.unet = unet.to(memory_format=self.memory_format)
        self.max_batch = int(max_batch) if max_batch else None
        self.compiled = bool(compile)
        self.forward = torch.compile(self.unet, dynamic=False) if compile else graph if graph is not unet else self.unet

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
        if self.precision == "bf16":  # the network only: the chain, the posterior and every metric stay fp32
            with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
                out = self.forward(x, t, class_labels=class_labels, return_dict=False)[0]
            return out.float().contiguous()
        return self.forward(x, t, class_labels=class_labels, return_dict=False)[0].contiguous()


class ClassConditionalEps:
    """eps_fn of one class-conditional UNet2DModel (null label: the last embedding index unless ``null_label``
    says otherwise, see ``null_label_index``).

    Per call ONE batched forward of ``[x; x; …]`` (1 + K copies) with labels ``[null; c_1; …; c_K]``
    (split into chunks of ``max_batch`` when set). ``label`` replaces the null label of the
    "unconditional" part (class-conditional sampling). ``channels_last`` runs the network in NHWC
    memory format and ``compile`` through ``torch.compile`` (see scripts/bench_sampler.py for what
    each buys on a given machine).
    """

    def __init__(self, unet, forbidden: Sequence[int] = (), label: int | None = None, channels_last: bool = False,
                 compile: bool = False, max_batch: int | None = None, null_label="last", precision: str = "fp32",
                 backend: str = "torch"):
        num_embeds = getattr(unet.config, "num_class_embeds", None)
        if not num_embeds:
            raise UserError("model has no class embedding (num_class_embeds is empty): use model kind 'pair' "
                            "for unconditional checkpoints")
        self.net = Network(unet, channels_last, compile, max_batch, precision, backend)
        self.unet, self.backend = self.net.unet, self.net.backend
        self.num_classes = int(num_embeds) - 1
        self.null_label = null_label_index(int(num_embeds), null_label)  # embedding index of the null label
        self.class_index = [i for i in range(int(num_embeds)) if i != self.null_label]  # class c -> its embedding
        for c in list(forbidden) + ([label] if label is not None else []):
            if not (isinstance(c, int) and 0 <= c < self.num_classes):
                raise UserError(f"class {c!r} is out of range: the model knows classes 0..{self.num_classes - 1}")
        self.forbidden = list(forbidden)
        self.label = self.null_label if label is None else self.class_index[int(label)]
        self._labels: dict[tuple[int, torch.device], torch.Tensor] = {}

    def labels(self, batch: int, device: torch.device) -> torch.Tensor:
        key = (batch, device)
        if key not in self._labels:
            ids = torch.tensor([self.label] + [self.class_index[c] for c in self.forbidden], device=device)
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
                 compile: bool = False, max_batch: int | None = None, precision: str = "fp32", backend: str = "torch"):
        self.unconditional = Network(unconditional, channels_last, compile, max_batch, precision, backend)
        self.forbidden_models = [Network(m, channels_last, compile, max_batch, precision, backend)
                                 for m in forbidden_models]
        used = {n.backend for n in [self.unconditional, *self.forbidden_models]}
        self.backend = used.pop() if len(used) == 1 else "mixed:" + "+".join(sorted(used))

    def __call__(self, x: torch.Tensor, t: torch.Tensor):
        eps_u = self.unconditional(x, t)
        if not self.forbidden_models:
            return eps_u, None
        return eps_u, torch.stack([m(x, t) for m in self.forbidden_models])
def load_model(model: ModelSpec, device: torch.device):
    """The network(s) of a resolved model: one UNet, or (unconditional, {class: UNet}) in pair mode."""
    if model.kind == "conditional":
        return load_unet(model.path, model.weights["model.path"]).to(device)
    if model.kind == "random":
        return build_unet(thawed(model.unet), seed=model.seed).eval().requires_grad_(False).to(device)
    uncond = load_unet(model.unconditional, model.weights["model.unconditional"]).to(device)
    return uncond, {c: load_unet(p, model.weights[f"model.forbidden_models.{c}"]).to(device)
                    for c, p in model.forbidden_models.items()}


def make_eps_fn(network, model: ModelSpec, forbidden: list[int], guidance, label: int | None = None,
                channels_last: bool = False, compile: bool = False, max_batch: int | None = None,
                precision: str = "fp32", backend: str = "torch"):
    speed = dict(channels_last=channels_last, compile=compile, max_batch=max_batch, precision=precision,
                 backend=backend)
    classes = list(forbidden) if "forbidden" in guidance.inputs else []
    if model.kind == "pair":
        uncond, per_class = network
        missing = [c for c in classes if c not in per_class]
        if missing:
            raise UserError(f"pair model has no forbidden-class model for class {missing[0]}: "
                            f"model.forbidden_models has {sorted(per_class)}")
        return PairEps(uncond, [per_class[c] for c in classes], **speed)
    return ClassConditionalEps(network, classes, label=label, null_label=model.null_label, **speed)


