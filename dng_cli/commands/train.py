"""``dng train ddpm|classifier``: the networks behind the shipped assets, trained by our own code.

DDPM: ε-prediction loss (Ho et al. 2020, Eq. 14), label dropout to the null label (classifier-free
guidance training, Ho & Salimans 2022), EMA of the weights, AdamW with linear warm-up. Every random
draw of step s comes from a generator seeded by (seed, s), so ``resume=true`` continues exactly.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from tqdm.auto import tqdm

from dng_cli import UserError, trackers
from dng_cli.commands.common import entry
from dng_cli.io import atomic_save
from dng_cli.pipeline import hardware, setup_torch
from dng_cli.data import load_dataset
from dng_cli.io import recover_folder
from dng_cli.runs import RunLock
from dng_cli.spec import check_types
from dng_cli.models import Classifier, build_unet, classify, load_ddpm
from dng_cli.spec import dataset_spec, plain, resolve
from dng_cli.schedule import NoiseSchedule

log = logging.getLogger(__name__)


class Batches:
    """Deterministic drop-last batches: batch s is a pure function of (seed, s)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if batch_size > n:
            raise UserError(f"batch_size={batch_size} is invalid: the training set has only {n} images")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.per_epoch = n // batch_size
        self._epoch, self._perm = -1, None

    def indices(self, step: int) -> torch.Tensor:
        epoch, j = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        return self._perm[j * self.batch_size:(j + 1) * self.batch_size]


def _check_train_cfg(cfg: DictConfig) -> None:
    check_types(cfg)  # steps, batch_size, label_dropout, ...: the declared type/range table
    if cfg.get("lr_schedule", "constant") not in ("constant", "cosine"):
        raise UserError(f"lr_schedule={cfg.lr_schedule!r} is invalid: allowed are constant, cosine")


# ------------------------------------------------------------------------------- checkpointing
RESUME_KEYS = ("batch_size", "lr", "lr_schedule", "warmup_steps", "weight_decay", "label_dropout", "seed")


def save_checkpoint(path: Path, model, ema, opt, step: int, loss: float, wall_time_s: float = 0.0,
                    settings: dict | None = None) -> None:
    from safetensors.torch import save_file

    def save(tmp: str) -> None:
        tmp = Path(tmp)
        tmp.mkdir()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(tmp / "ema.safetensors"))
        sd = opt.state_dict()
        tensors = {f"{i}.{k}": v.contiguous() for i, s in sd["state"].items() for k, v in s.items()}
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, "loss": loss, "wall_time_s": wall_time_s,
                                                   "param_groups": sd["param_groups"], "settings": settings or {}}))

    atomic_save(path, save)


def load_checkpoint(path: Path, model, ema, opt) -> tuple[int, float, float]:
    from safetensors.torch import load_file

    state = json.loads((path / "state.json").read_text())
    try:
        model.load_state_dict(load_file(str(path / "model.safetensors")))
    except RuntimeError as err:
        raise UserError(f"checkpoint {str(path)!r} does not match this model's architecture (resume with the model "
                        f"settings it was trained with): {str(err).strip().splitlines()[0]}") from None
    ema.load_state_dict(load_file(str(path / "ema.safetensors")))
    opt_state: dict[int, dict] = {}
    for key, value in load_file(str(path / "optimizer.safetensors")).items():
        i, name = key.split(".", 1)
        opt_state.setdefault(int(i), {})[name] = value
    opt.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    return int(state["step"]), float(state["loss"]), float(state.get("wall_time_s", 0.0))


def _output_dir(cfg: DictConfig, output_dir: Path) -> Path:
    return Path(cfg.output_dir) if cfg.get("output_dir") else output_dir


# -------------------------------------------------------------------------------------- DDPM
def run_ddpm(cfg: DictConfig, output_dir: Path) -> dict:
    """Train a (class-conditional) DDPM; writes ``checkpoint/`` and the EMA model in ``ema/``. The folder
    written (``output_dir=``, else the run dir) is locked for the training (re-entrant)."""
    _check_train_cfg(cfg)
    out = _output_dir(cfg, output_dir)
    with RunLock(out, reentrant=True):
        return _run_ddpm(cfg, out)


def _run_ddpm(cfg: DictConfig, out: Path) -> dict:
    device = setup_torch(cfg.device, cfg.get("num_threads"))
    classes = list(cfg.dataset.classes) if cfg.dataset.get("classes") is not None else None
    images, labels = load_dataset(dataset_spec(cfg.dataset), "train", classes)
    images, labels = images.to(device), labels.to(device)
    arch = plain(cfg.model.unet)
    if cfg.conditional:
        arch["num_class_embeds"] = int(cfg.dataset.num_classes) + 1
    else:
        arch.pop("num_class_embeds", None)
    model = build_unet(arch, seed=cfg.seed).to(device).train()
    init = _init_from(cfg, model) if cfg.get("init_from") else None
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = NoiseSchedule.linear(cfg.schedule.num_train_timesteps, cfg.schedule.beta_start, cfg.schedule.beta_end)
    null_label = int(cfg.dataset.num_classes)

    step, loss_value, wall_before, t_start = 0, float("nan"), 0.0, time.time()
    ckpt = out / "checkpoint"
    settings = {k: plain(cfg).get(k) for k in RESUME_KEYS}
    resumed_changes = {}
    if cfg.resume:
        step, loss_value, wall_before, resumed_changes = resume(ckpt, model, ema, opt, settings)
    batches = Batches(len(images), int(cfg.batch_size), int(cfg.seed))
    tracked = tracker(cfg, out, "train-ddpm")
    bar = tqdm(total=int(cfg.steps), initial=step, disable=not cfg.progress, desc="train ddpm")
    running = None
    while step < cfg.steps:
        g = torch.Generator().manual_seed(int(cfg.seed) * 1_000_003 + step)
        idx = batches.indices(step)
        x0, y = images[idx], labels[idx]
        t = torch.randint(0, len(schedule), (len(idx),), generator=g).to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        drop = (torch.rand(len(idx), generator=g) < cfg.label_dropout).to(device)
        x_t = schedule.add_noise(x0, noise, t)
        class_labels = torch.where(drop, torch.full_like(y, null_label), y) if cfg.conditional else None
        pred = model(x_t, t, class_labels=class_labels, return_dict=False)[0]
        loss = F.mse_loss(pred, noise)
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        decay = min(float(cfg.ema_decay), (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        step += 1
        loss_value = loss.item()
        running = loss_value if running is None else 0.98 * running + 0.02 * loss_value
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}")
        if step % cfg.log_every == 0:
            log.info("step %d loss %.5f (ema %.5f) lr %.2e", step, loss_value, running, opt.param_groups[0]["lr"])
            if tracked is not None:
                tracked.metrics({"loss": loss_value, "loss_ema": running, "lr": opt.param_groups[0]["lr"]}, step=step)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            wall = wall_before + time.time() - t_start
            save_checkpoint(ckpt, model, ema, opt, step, loss_value, wall, settings)
            _save_ema(out, ema, cfg, step, running, wall, len(images), classes, init, resumed_changes)
    bar.close()
    if tracked is not None:
        tracked.metrics({"final_loss_ema": running if running is not None else loss_value}, step=step)
        tracked.end()
    return {"step": step, "loss": loss_value, "output_dir": str(out)}


def tracker(cfg: DictConfig, out: Path, command: str):
    """The run's trackers (``logger=``), or None: training logs its loss, EMA loss and LR every ``log_every`` steps.
    A tracker's failure is one warning (``trackers.Run``), never a failed training."""
    logger = trackers.config_of(cfg)
    if not logger:
        return None
    params = trackers.flatten({k: v for k, v in plain(cfg).items() if k != "logger"})
    return trackers.Run(logger, command, out, out.name, params, {"command": command, "folder": str(out.resolve())})


def resume(ckpt: Path, model, ema, opt, settings: dict) -> tuple[int, float, float, dict]:
    """Load ``ckpt`` for ``resume=true``: recover it from an interrupted save, refuse when there is
    nothing to resume, and warn about (and return) training settings that differ from the checkpoint's."""
    recover_folder(ckpt)
    if not (ckpt / "state.json").is_file():
        raise UserError(f"resume=true but there is no checkpoint in {str(ckpt)!r}: pass the earlier run's folder "
                        f"(hydra.run.dir=<its run dir> or output_dir=...), or drop resume=true to start afresh")
    step, loss, wall = load_checkpoint(ckpt, model, ema, opt)
    before = json.loads((ckpt / "state.json").read_text()).get("settings") or {}
    changes = {k: {"checkpoint": before[k], "now": v} for k, v in settings.items() if k in before and before[k] != v}
    for k, c in changes.items():
        log.warning("resuming with %s=%r (the checkpoint was trained with %r): recorded in the card",
                    k, c["now"], c["checkpoint"])
    log.info("resumed from %s at step %d", ckpt, step)
    return step, loss, wall, changes


def learning_rate(cfg: DictConfig, step: int) -> float:
    """Linear warm-up over ``warmup_steps``, then constant or (``lr_schedule=cosine``) cosine to 0 at ``steps``."""
    warm = max(1, int(cfg.warmup_steps))
    if step < warm or cfg.get("lr_schedule", "constant") == "constant":
        return float(cfg.lr) * min(1.0, (step + 1) / warm)
    progress = (step - warm) / max(1, int(cfg.steps) - warm)
    return float(cfg.lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _init_from(cfg: DictConfig, model) -> dict:
    """Start from the weights of an earlier run's ``ema/`` folder (or a shipped name): continued training."""
    source = load_ddpm(cfg.init_from)
    try:
        model.load_state_dict(source.state_dict())
    except RuntimeError as err:
        raise UserError(f"init_from={cfg.init_from!r} does not match model={cfg.model.name}'s architecture: "
                        f"{str(err).splitlines()[0]}") from None
    card_path = resolve(cfg.init_from, "ddpm") / "card.json"
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    return {"init_from": str(cfg.init_from), "steps": card.get("total_steps", card.get("steps")),
            "batch_size": card.get("config", {}).get("batch_size"),
            "wall_time_s": card.get("total_wall_time_s", card.get("wall_time_s")),
            "hardware": card.get("hardware")}


def _save_ema(out: Path, ema, cfg: DictConfig, step: int, loss: float | None, wall: float, n: int, classes,
              init: dict | None = None, resumed_changes: dict | None = None) -> None:
    card = {
        "kind": "ddpm", "conditional": bool(cfg.conditional), "steps": step, "final_loss_ema": loss,
        "data": {"dataset": cfg.dataset.name, "split": "train", "images": n, "classes": classes},
        "wall_time_s": round(wall, 1), "hardware": hardware(), "config": plain(cfg),
    }
    if resumed_changes:
        card["resumed_with_changes"] = resumed_changes
    if init:  # continued training: totals over the whole lineage
        card["init"] = init
        card["total_steps"] = step + int(init.get("steps") or 0)
        card["total_wall_time_s"] = round(wall + float(init.get("wall_time_s") or 0.0), 1)

    schedule = NoiseSchedule.linear(cfg.schedule.num_train_timesteps, cfg.schedule.beta_start, cfg.schedule.beta_end)

    def save(tmp: str) -> None:
        ema.save_pretrained(tmp, safe_serialization=True)
        (Path(tmp) / "card.json").write_text(json.dumps(card, indent=2))
        # the chain it was trained on, as diffusers' DDPMScheduler reads it: samplers build theirs from it
        (Path(tmp) / "scheduler_config.json").write_text(json.dumps(schedule.scheduler_config(), indent=2) + "\n")

    atomic_save(out / "ema", save)


# -------------------------------------------------------------------------------- classifier
def run_classifier(cfg: DictConfig, output_dir: Path) -> dict:
    """Train the small CNN (its penultimate layer is the FID feature space); writes ``classifier/``."""
    check_classifier(cfg)
    out = _output_dir(cfg, output_dir)
    with RunLock(out, reentrant=True):
        return _run_classifier(cfg, out)


def _run_classifier(cfg: DictConfig, out: Path) -> dict:
    device = setup_torch(cfg.device, cfg.get("num_threads"))
    dataset = dataset_spec(cfg.dataset)
    x, y = load_dataset(dataset, "train")
    xt, yt = load_dataset(dataset, "test")
    if cfg.get("max_train") and cfg.max_train < len(x):
        x, y = x[: cfg.max_train], y[: cfg.max_train]
    x, y, xt, yt = x.to(device), y.to(device), xt.to(device), yt.to(device)
    torch.manual_seed(cfg.seed)
    model = Classifier(in_channels=int(cfg.dataset.channels), num_classes=int(cfg.dataset.num_classes),
                       width=int(cfg.width), feature_dim=int(cfg.feature_dim)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    batches = Batches(len(x), int(cfg.batch_size), int(cfg.seed))
    total = batches.per_epoch * int(cfg.epochs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total)
    t_start = time.time()
    tracked = tracker(cfg, out, "train-classifier")
    bar = tqdm(range(total), disable=not cfg.progress, desc="train classifier")
    for step in bar:
        g = torch.Generator().manual_seed(int(cfg.seed) * 1_000_003 + step)
        idx = batches.indices(step)
        xb = x[idx]
        if cfg.shift:  # random translation by up to `shift` pixels
            s = int(cfg.shift)
            dx, dy = torch.randint(-s, s + 1, (2,), generator=g).tolist()
            xb = torch.roll(F.pad(xb, (s, s, s, s), value=-1.0), (dy, dx), (2, 3))[..., s:-s, s:-s]
        model.train()
        loss = F.cross_entropy(model(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if tracked is not None and (step + 1) % int(cfg.get("log_every", 50)) == 0:
            tracked.metrics({"loss": loss.item(), "lr": opt.param_groups[0]["lr"]}, step=step + 1)
    model.eval()
    accuracy = float((classify(model, xt, batch_size=1000)[0] == yt).double().mean())
    log.info("test accuracy %.4f", accuracy)
    if tracked is not None:
        tracked.metrics({"test_accuracy": accuracy}, step=total)
        tracked.end()
    card = {"kind": "classifier", "test_accuracy": accuracy, "epochs": int(cfg.epochs), "steps": total,
            "data": {"dataset": cfg.dataset.name, "train_images": len(x), "test_images": len(xt)},
            "wall_time_s": round(time.time() - t_start, 1), "hardware": hardware(), "config": plain(cfg)}

    def save(tmp: str) -> None:
        model.cpu().save_pretrained(tmp)
        (Path(tmp) / "card.json").write_text(json.dumps(card, indent=2))

    atomic_save(out / "classifier", save)
    return {"test_accuracy": accuracy, "output_dir": str(out)}


def check_classifier(cfg: DictConfig) -> None:
    check_types(cfg)


def check_ddpm(cfg: DictConfig) -> None:
    _check_train_cfg(cfg)
    if cfg.get("init_from"):
        if not (resolve(cfg.init_from, "ddpm") / "config.json").is_file():
            raise UserError(f"init_from={cfg.init_from!r} is not a DDPM folder (config.json missing) or a shipped name")


main_ddpm = entry("train_ddpm", run_ddpm)
main_classifier = entry("train_classifier", run_classifier)
