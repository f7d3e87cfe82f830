"""``dng evaluate``: the paper's experiment for one configuration — sample N, classify, score.

Writes metrics.json (atomically; a finished run is skipped when re-run in the same folder),
samples.png, samples.npz (every scored image, uint8, with its seed) and histogram.png. Metric definitions live in ``dng_cli.metrics``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from dng_cli import RunRefused, UserError, io, metrics, pipeline
from dng_cli.commands.common import entry, plain, setup_torch, write_json
from dng_cli.models import SHIPPED, classify, load_classifier, resolve
from dng_cli.schedule import NoiseSchedule

log = logging.getLogger(__name__)


def check_cfg(cfg: DictConfig) -> None:
    pipeline.check_run_cfg(cfg)
    if cfg.metrics.fid.features not in metrics.FEATURES:
        raise UserError(f"metrics.fid.features={cfg.metrics.fid.features!r} is unknown: allowed are "
                        f"{', '.join(metrics.FEATURES)}")
    clf = resolve(cfg.model.classifier, "classifier") / "config.json"
    if not clf.is_file():
        raise UserError(f"model.classifier={str(cfg.model.classifier)!r} is not a classifier folder (config.json "
                        f"and model.safetensors) nor a shipped name ({', '.join(SHIPPED)})")
    conf = json.loads(clf.read_text())
    for field, want in (("in_channels", int(cfg.dataset.channels)), ("num_classes", int(cfg.dataset.num_classes))):
        if conf.get(field) is not None and conf[field] != want:
            raise UserError(f"model.classifier={str(cfg.model.classifier)!r} does not fit dataset={cfg.dataset.name}: "
                            f"its {field} is {conf[field]}, the dataset's is {want}")
    pipeline.check_trained_on("model.classifier", str(cfg.model.classifier), "classifier", cfg.dataset)
    if cfg.metrics.fid.split not in ("train", "test"):
        raise UserError(f"metrics.fid.split={cfg.metrics.fid.split!r} is invalid: allowed are train, test")


def fid_scores(feats: torch.Tensor, stats: dict, forbidden: list[int], prefix: str = "fid") -> dict:
    """FID against the split without the forbidden classes and the full split, each with its s.e."""
    without, full = metrics.reference_stats(stats, forbidden), metrics.reference_stats(stats)
    enough = len(feats) > 1
    return {prefix: metrics.fid_from_features(feats, without) if enough else None,
            f"{prefix}_se": metrics.fid_se(feats, without),
            f"{prefix}_full": metrics.fid_from_features(feats, full) if enough else None,
            f"{prefix}_full_se": metrics.fid_se(feats, full)}


def fid_reference(cfg: DictConfig, net, key: str) -> dict:
    """Per-class reference accumulators: shipped, cached, or computed from the dataset (then cached)."""
    fcfg = cfg.metrics.fid
    name = f"{cfg.dataset.name}-{fcfg.split}-{key}.npz"
    candidates = [SHIPPED[cfg.dataset.name] / "fid" / name] if cfg.dataset.name in SHIPPED else []
    candidates.append(Path(fcfg.cache_dir) / name)
    for path in candidates:
        if path.is_file():
            return metrics.load_stats(path)
    from dng_cli.data import load_tensors

    log.info("computing FID reference statistics %s", name)
    images, labels = load_tensors(cfg.dataset.name, cfg.dataset.root, fcfg.split)
    big = int(getattr(net, "num_features", 0)) > 512  # Inception: 299x299 inputs, small batches
    stats = metrics.per_class_stats(net, pipeline.to_uint8(images), labels, int(cfg.dataset.num_classes),
                                    batch_size=32 if big else 500, progress=big)
    metrics.save_stats(candidates[-1], stats)
    return stats


def method_label(cfg: DictConfig) -> str:
    """The method config chosen (e.g. "dng_official_cli"): ``label`` when set, Hydra's choice of the
    method group, else the method's name."""
    from hydra.core.hydra_config import HydraConfig

    if cfg.get("label"):
        return str(cfg.label)
    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get("method")
        if choice:
            return str(choice)
    return str(cfg.method.name)


# Keys that change how fast a result is made or where files live, never the numbers in it.
NOT_RESULT_KEYS = ("skip_existing", "overwrite", "save_samples", "label", "grids", "grid_index", "sampler.batch_size", "sampler.max_batch",
                   "sampler.channels_last", "sampler.compile", "sampler.progress", "sampler.num_threads",
                   "sampler.device", "dataset.root", "metrics.fid.cache_dir", "model.path", "model.classifier",
                   "model.unconditional", "model.forbidden_models", "metrics.fid.inception_weights")


def result_config(config: dict) -> dict:
    """The resolved config minus speed/progress/path keys (see NOT_RESULT_KEYS)."""
    return {k: _canonical(v) for k, v in io.flatten(config)
            if not any(k == n or k.startswith(n + ".") for n in NOT_RESULT_KEYS)}


def _canonical(value):
    """Numbers compare by value (a scale given as 2 on the command line is the yaml's 2.0)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


def result_identity(cfg: DictConfig) -> dict:
    """Everything that determines a result: the result config and the hashes of the weights it used."""
    model, unet = cfg.model, "diffusion_pytorch_model.safetensors"
    weights = {"classifier": _weights_hash(resolve(model.classifier, "classifier") / "model.safetensors", "model.classifier")}
    if model.kind == "conditional":
        weights["ddpm"] = _weights_hash(resolve(model.path, "ddpm") / unet, "model.path")
    elif model.kind == "pair":
        weights["unconditional"] = _weights_hash(Path(str(model.unconditional)) / unet, "model.unconditional")
        for c, p in model.forbidden_models.items():
            weights[f"class_{c}"] = _weights_hash(Path(str(p)) / unet, f"model.forbidden_models.{c}")
    return {**identity_config(plain(cfg)), **{f"weights.{k}": v for k, v in weights.items()}}


def identity_config(config: dict) -> dict:
    """``result_config`` with the keys results were identified by before ``forbidden`` moved to the top
    level and the schedule into the model folder, so results written before either stay reusable."""
    config = dict(config)
    if "forbidden" in config:
        config["method"] = {**config.get("method", {}), "forbidden": config.pop("forbidden")}
    identity = result_config(config)
    if isinstance(config.get("model"), dict):
        identity.update(schedule_identity(OmegaConf.create(config["model"])))
    return identity


def schedule_identity(model_cfg: DictConfig) -> dict:
    """The model's noise schedule as result keys. A linear ε-chain keeps the keys the sampler config
    carried before the schedule moved into the model folder, so earlier results stay reusable."""
    conf = pipeline.model_scheduler_config(model_cfg)
    schedule = NoiseSchedule.from_scheduler(conf)
    pred = str(conf.get("prediction_type", "epsilon"))
    if conf.get("trained_betas") is None and conf.get("beta_schedule", "linear") == "linear" and pred == "epsilon":
        return {"sampler.num_train_timesteps": float(len(schedule)), "sampler.beta_start": float(conf.get("beta_start", 1e-4)),
                "sampler.beta_end": float(conf.get("beta_end", 0.02))}
    return {"schedule.betas": io.fingerprint(schedule.betas.tolist()), "schedule.prediction_type": pred}


def identity_weights(identity: dict) -> dict:
    return {k[len("weights."):]: v for k, v in identity.items() if k.startswith("weights.")}


def _weights_hash(path: Path, key: str) -> str:
    if not path.is_file():
        raise UserError(f"{key}: weights file {str(path)!r} not found")
    return io.sha256_file(path)


RESCORE_PREFIX = "metrics."  # settings that change how saved samples are scored, never the samples


def finished_result(metrics_path: Path, identity: dict, fingerprint: str, recompute: bool) -> dict | None:
    """The finished result in ``metrics_path`` when it was made by this very config, else None
    (recompute: the old file is removed first). A result of another config is refused, never reused,
    with one exception: when only metric settings differ (``metrics.*``, e.g. Inception FID turned on)
    and the run saved its samples, the old result comes back with ``"rescore": [the changed keys]`` and
    ``run`` scores the saved samples again."""
    old = io.read_json_object(metrics_path)
    if recompute or old is None:
        log.info("%s: recomputing (%s)", metrics_path, "overwrite=true" if recompute else "unreadable")
        metrics_path.unlink()
        return None
    if old.get("fingerprint") == fingerprint:
        log.info("%s was made by this config: skipping finished run", metrics_path)
        return old
    old_weights = old.get("weights") if old.get("fingerprint") is not None else identity_weights(identity)
    old_identity = {**identity_config(old.get("config") or {}),
                    **{f"weights.{k}": v for k, v in (old_weights or {}).items()}}
    if old.get("fingerprint") is None:  # written before fingerprints: compare what it recorded
        if old_identity == identity:
            log.warning("%s predates result fingerprints: its config matches, its weights were not recorded; "
                        "skipping finished run", metrics_path)
            return old
    changed = io.differences(old_identity, identity)
    if changed and all(k.startswith(RESCORE_PREFIX) for k, _, _ in changed) and (metrics_path.parent / "samples.npz").is_file():
        # same samples, other metric settings: score them again, no sampling
        return {**old, "rescore": sorted(k for k, _, _ in changed)}
    key, there, here = changed[0] if changed else ("fingerprint", old.get("fingerprint"), fingerprint)
    raise RunRefused(f"{metrics_path.parent} holds a finished run of another config ({key}={there!r} there, "
                    f"{here!r} here): use another output folder, or overwrite=true to recompute it")


def run(cfg: DictConfig, output_dir: Path, network=None) -> dict:
    """One evaluation; ``network``: an already loaded model (what ``pipeline.load_model`` returns) to reuse."""
    check_cfg(cfg)
    metrics_path = output_dir / "metrics.json"
    identity = result_identity(cfg)
    fingerprint = io.fingerprint(identity)
    if metrics_path.exists():
        finished = finished_result(metrics_path, identity, fingerprint, recompute=bool(cfg.get("overwrite", False))
                                   or not cfg.skip_existing)
        if finished is not None and "rescore" in finished:
            return rescore(cfg, output_dir, finished, identity, fingerprint)
        if finished is not None:
            return finished
    device = setup_torch(cfg.sampler.device, cfg.sampler.get("num_threads"))
    scorer = Scorer(cfg)  # reference statistics first: a missing Inception file fails before any sampling
    gen = pipeline.build(cfg, device, network)
    n = int(cfg.n_samples)
    seeds = [int(cfg.sampler.seed) + i for i in range(n)]
    io.pause_for_tests("evaluate")
    t0 = time.time()
    out = pipeline.generate_all(gen, seeds, int(cfg.sampler.batch_size), progress=bool(cfg.sampler.progress))
    wall = time.time() - t0
    images = pipeline.to_uint8(out.images)
    scores, preds = scorer(images)
    result = {
        "method": cfg.method.name,
        "label": method_label(cfg),
        "forbidden": scorer.forbidden,
        "guidance_scale": cfg.method.get("guidance_scale"),
        **scores,
        "mean_final_posterior": float(out.posterior[-1].sum(-1).mean()) if out.posterior.dim() == 3 else float(out.posterior[-1].mean()),
        **(metrics.posterior_detection(out.posterior, metrics.is_forbidden(preds, scorer.forbidden))
           if gen.guidance.tracks_posterior else {}),
        "mean_guidance_scale": float(out.scale.mean()),
        "n_samples": n,
        "steps": int(cfg.sampler.steps),
        "seed": int(cfg.sampler.seed),
        "wall_time_s": round(wall, 3),
        "images_per_s": n / wall,
        "config": plain(cfg),
        "fingerprint": fingerprint,
        "weights": identity_weights(identity),
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    from dng_cli.plots import save_grid

    save_grid(images[:100], output_dir / "samples.png", nrow=10)
    if cfg.get("save_samples", True):  # every image scored, so a metric added later needs no resampling
        io.atomic_save(output_dir / "samples.npz", lambda tmp: np.savez_compressed(
            open(tmp, "wb"), images=images.numpy(), seeds=np.asarray(seeds)))
    else:  # an earlier run's samples (overwrite=true) must not be rescored as this run's
        (output_dir / "samples.npz").unlink(missing_ok=True)
    return finish(cfg, output_dir, result)


class Scorer:
    """Everything ``run`` measures on finished uint8 samples: forbidden rate, class balance, FID on the
    classifier's features and, with metrics.fid.features=inception, Inception FID."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.forbidden = pipeline.forbidden_classes(cfg, int(cfg.dataset.num_classes))
        self.classifier = load_classifier(cfg.model.classifier)
        clf_net = metrics.feature_network("classifier", self.classifier)
        self.fid_key = metrics.features_key("classifier", resolve(cfg.model.classifier, "classifier"))
        self.stats = fid_reference(cfg, clf_net, self.fid_key)
        self.inception = None
        if cfg.metrics.fid.features == "inception":
            inc_net = metrics.feature_network("inception", None, cfg.metrics.fid.get("inception_weights"))
            inc_key = metrics.features_key("inception", net=inc_net)
            self.inception = (inc_net, inc_key, fid_reference(cfg, inc_net, inc_key))

    def __call__(self, images: torch.Tensor) -> tuple[dict, torch.Tensor]:
        cfg, forbidden, n = self.cfg, self.forbidden, len(images)
        preds, feats = classify(self.classifier, images)
        inception_scores = {}
        if self.inception is not None:
            inc_net, inc_key, inc_stats = self.inception
            with torch.inference_mode():
                inc_feats = torch.cat([inc_net(images[i:i + 32]) for i in range(0, n, 32)])
            inception_scores = {**fid_scores(inc_feats, inc_stats, forbidden, "fid_inception"),
                                "fid_inception_features": inc_key}
        counts = metrics.class_histogram(preds, int(cfg.dataset.num_classes))
        smoothing = float(cfg.metrics.kl_smoothing)
        return {
            **metrics.forbidden_rate(counts, forbidden),
            "kl_uniform": metrics.kl_uniform(counts, forbidden, smoothing),
            "kl_uniform_se": metrics.kl_uniform_se(counts, forbidden, smoothing),
            **fid_scores(feats, self.stats, forbidden),
            "fid_features": self.fid_key,
            **inception_scores,
            "fid_reference": {"dataset": cfg.dataset.name, "split": cfg.metrics.fid.split, "excluded": forbidden},
            "histogram": [c / n for c in counts],
            "histogram_counts": counts,
        }, preds


def rescore(cfg: DictConfig, output_dir: Path, old: dict, identity: dict, fingerprint: str) -> dict:
    """Score a finished run's saved samples (samples.npz) under this config's metric settings; what
    sampling measured (wall time, the posterior's detection scores) is kept."""
    with np.load(output_dir / "samples.npz") as f:
        images, seeds = torch.from_numpy(f["images"]), f["seeds"].tolist()
    want = [int(cfg.sampler.seed) + i for i in range(int(cfg.n_samples))]
    if seeds != want:
        raise RunRefused(f"{output_dir / 'samples.npz'} holds {len(seeds)} samples from seed {seeds[0] if seeds else None}, "
                         f"not the {len(want)} from seed {want[0]} this config draws: use another output folder, "
                         f"or overwrite=true to recompute it")
    log.info("%s: scoring its saved samples again (%s changed)", output_dir, ", ".join(old["rescore"]))
    scores, _ = Scorer(cfg)(images)
    # Scorer's keys replace the old ones; the Inception ones are dropped first, as this config may not make them
    result = {k: v for k, v in old.items() if not k.startswith("fid_inception") and k != "rescore"}
    result.update(scores, config=plain(cfg), fingerprint=fingerprint, weights=identity_weights(identity),
                  rescored={"from": "samples.npz", "changed": old["rescore"],
                            "sampled_on": (old.get("rescored") or {}).get("sampled_on")  # a rescore of a rescore
                            or (old.get("config") or {}).get("sampler", {}).get("device")})
    return finish(cfg, output_dir, result)


def finish(cfg: DictConfig, output_dir: Path, result: dict) -> dict:
    from dng_cli.plots import histogram_plot

    histogram_plot(result["histogram"], result["forbidden"], output_dir / "histogram.png",
                   title=f"{cfg.method.name} (scale {result['guidance_scale']}), forbidden "
                         f"{pipeline.forbidden_names(cfg, result['forbidden'])}",
                   class_names=cfg.dataset.get("class_names"))
    write_json(output_dir / "metrics.json", result)  # last: its presence marks the run finished
    log.info("forbidden %.2f%% [%.2f, %.2f], KL %.4f, FID %.3f (full %.3f), %.1f images/s -> %s",
             100 * result["forbidden_rate"], *(100 * v for v in result["forbidden_rate_ci"]), result["kl_uniform"],
             result["fid"] or float("nan"), result["fid_full"] or float("nan"), result["images_per_s"], output_dir)
    return result


main = entry("evaluate", run)
