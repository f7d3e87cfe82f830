"""``dng evaluate``: the paper's experiment for one configuration — sample N, classify, score.

Writes metrics.json (atomically; a finished run is skipped when re-run in the same folder),
samples.png, samples.npz (every scored image, uint8, with its seed) and histogram.png. Metric definitions live in ``dng_cli.metrics``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from dng_cli import UserError, data, io, metrics, pipeline, runs
from dng_cli.commands.common import entry, plain, setup_torch
from dng_cli.models import SHIPPED, classifier_source, classifier_weights_hash, classify

log = logging.getLogger(__name__)


def check_cfg(cfg: DictConfig) -> None:
    pipeline.check_run_cfg(cfg)
    if cfg.metrics.fid.features not in metrics.FEATURES:
        raise UserError(f"metrics.fid.features={cfg.metrics.fid.features!r} is unknown: allowed are "
                        f"{', '.join(metrics.FEATURES)}")
    src = classifier_source(cfg.model.classifier)
    if src["kind"] == "folder":
        clf = Path(src["path"]) / "config.json"
        if not clf.is_file():
            raise UserError(f"model.classifier={str(cfg.model.classifier)!r} is not a classifier folder (config.json "
                            f"and model.safetensors), a TorchScript file, nor a shipped name ({', '.join(SHIPPED)})")
        conf = json.loads(clf.read_text())
        for field, want in (("in_channels", int(cfg.dataset.channels)), ("num_classes", int(cfg.dataset.num_classes))):
            if conf.get(field) is not None and conf[field] != want:
                raise UserError(f"model.classifier={str(cfg.model.classifier)!r} does not fit dataset={cfg.dataset.name}: "
                                f"its {field} is {conf[field]}, the dataset's is {want}")
        pipeline.check_trained_on("model.classifier", str(cfg.model.classifier), "classifier", cfg.dataset)
    else:
        classifier_weights_hash(cfg.model.classifier)  # the file / weights exist (it is checked on a batch later)
    if cfg.metrics.fid.split not in ("train", "test"):
        raise UserError(f"metrics.fid.split={cfg.metrics.fid.split!r} is invalid: allowed are train, test")
    if data.dataset_format(cfg.dataset) in ("image_folder", "tensors"):
        data.split_source(cfg.dataset, str(cfg.metrics.fid.split))  # the FID reference's data exists


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
    from dng_cli.data import content_hash, load_dataset

    data_hash = content_hash(cfg.dataset, fcfg.split)  # a dataset of your own: named by its content too
    name = f"{cfg.dataset.name}-{fcfg.split}{'-' + data_hash[:12] if data_hash else ''}-{key}.npz"
    candidates = [SHIPPED[cfg.dataset.name] / "fid" / name] if cfg.dataset.name in SHIPPED else []
    candidates.append(Path(fcfg.cache_dir) / name)
    for path in candidates:
        if path.is_file():
            return metrics.load_stats(path)
    log.info("computing FID reference statistics %s", name)
    images, labels = load_dataset(cfg.dataset, fcfg.split)
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


NOT_RESULT_KEYS, RESCORE_PREFIX = runs.NOT_RESULT_KEYS, runs.RESCORE_PREFIX
result_config = runs.result_config
identity_weights = runs.identity_weights


result_identity, identity_config, schedule_identity = pipeline.result_identity, pipeline.identity_config, pipeline.schedule_identity
_schedule_of = pipeline.schedule_of


def finished_result(metrics_path: Path, identity: dict, fingerprint: str, recompute: bool) -> dict | None:
    """``runs.finished_result`` with the model's noise schedule."""
    return runs.finished_result(metrics_path, identity, fingerprint, recompute, _schedule_of)


def run(cfg: DictConfig, output_dir: Path, network=None) -> dict:
    """One evaluation; ``network``: an already loaded model (what ``pipeline.load_model`` returns) to reuse.
    The folder is locked for the run (re-entrant: the CLI entry point or compare may hold it already)."""
    check_cfg(cfg)
    with runs.RunLock(output_dir, reentrant=True):
        runs.clean_folder(output_dir)
        return _run(cfg, output_dir, network)


def _run(cfg: DictConfig, output_dir: Path, network) -> dict:
    metrics_path = output_dir / runs.RESULT_NAME
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
    samples_fp = runs.samples_fingerprint(identity)
    partial = runs.PartialBatches(output_dir, samples_fp)  # finished batches survive a kill
    if cfg.get("overwrite", False):
        partial.clear()
    done = partial.load(seeds)
    todo = [s for s in seeds if s not in done]
    if done:
        log.info("%s: resuming: %d of %d samples were drawn before, drawing the other %d", output_dir, len(done), n,
                 len(todo))
    io.pause_for_tests("evaluate")

    def keep(batch_seeds, out, seconds):
        partial.save(batch_seeds, pipeline.to_uint8(out.images).numpy(), out.posterior.numpy(), out.scale.numpy(),
                     seconds)

    if todo:
        pipeline.generate_all(gen, todo, int(cfg.sampler.batch_size), progress=bool(cfg.sampler.progress), on_batch=keep)
    batches = partial.load(seeds)
    images = torch.from_numpy(np.stack([batches[s][0] for s in seeds]))
    out = pipeline.SampleOutput(images, torch.from_numpy(np.stack([batches[s][1] for s in seeds], 1)),
                                torch.from_numpy(np.stack([batches[s][2] for s in seeds], 1)), None)
    wall = sum(batches[s][3] for s in seeds)  # the sampling time of the kept samples, over all attempts
    scores, preds = scorer(images)
    sampled_on = pipeline.device_name(gen.device)
    save_samples = bool(cfg.get("save_samples", True))
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
        "sampled_on": sampled_on,
        "precision": pipeline.precision_of(cfg, gen.device),
        "noise": runs.NOISE,
        "samples": {"fingerprint": samples_fp, "saved": save_samples},
        "config": plain(cfg),
        "fingerprint": fingerprint,
        "weights": identity_weights(identity),
    }
    from dng_cli.plots import save_grid

    stage = runs.ResultStage(output_dir)  # every file aside; the old result stays until the commit
    try:
        save_grid(images[:100], stage.path("samples.png"), nrow=10)
        io.pause_for_tests("evaluate_write")
        save_records(stage, scorer, seeds, samples_fp)
        if save_samples:  # every image scored, so a metric added later needs no resampling
            runs.save_samples(stage.path(runs.SAMPLES_NAME), images.numpy(), seeds, samples_fp, sampled_on, "evaluate")
        else:  # an earlier run's samples (overwrite=true) must not be rescored as this run's
            stage.remove(runs.SAMPLES_NAME)
        finished = finish(cfg, output_dir, result, stage)
        partial.clear()
        return finished
    finally:
        stage.discard()


class Scorer:
    """Everything ``run`` measures on finished uint8 samples: forbidden rate, class balance, FID on the
    classifier's features and, with metrics.fid.features=inception, Inception FID."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.forbidden = pipeline.forbidden_classes(cfg, int(cfg.dataset.num_classes))
        self.classifier = pipeline.run_classifier(cfg)  # a classifier of your own runs on one batch here
        clf_net = metrics.feature_network("classifier", self.classifier)
        self.fid_key = "classifier-" + classifier_weights_hash(cfg.model.classifier)[:12]
        self.stats = fid_reference(cfg, clf_net, self.fid_key)
        self.inception = None
        if cfg.metrics.fid.features == "inception":
            inc_net = metrics.feature_network("inception", None, cfg.metrics.fid.get("inception_weights"))
            inc_key = metrics.features_key("inception", net=inc_net)
            self.inception = (inc_net, inc_key, fid_reference(cfg, inc_net, inc_key))

    def __call__(self, images: torch.Tensor) -> tuple[dict, torch.Tensor]:
        cfg, forbidden, n = self.cfg, self.forbidden, len(images)
        preds, feats = classify(self.classifier, images)
        self.records = {"classes": preds.numpy().astype(np.int16), "features": feats.float().numpy()}
        inception_scores = {}
        if self.inception is not None:
            inc_net, inc_key, inc_stats = self.inception
            with torch.inference_mode():
                inc_feats = torch.cat([inc_net(images[i:i + 32]) for i in range(0, n, 32)])
            self.records["inception"] = inc_feats.float().numpy()
            inception_scores = {**fid_scores(inc_feats, inc_stats, forbidden, "fid_inception"),
                                "fid_inception_features": inc_key}
        counts = metrics.class_histogram(preds, int(cfg.dataset.num_classes))
        smoothing = float(cfg.metrics.kl_smoothing)
        return {
            **metrics.forbidden_rate(counts, forbidden),
            "kl_kept": metrics.kl_kept(counts, forbidden, smoothing),
            "kl_kept_se": metrics.kl_kept_se(counts, forbidden, smoothing),
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
    """Score a finished run's saved samples (samples.npz, checked to be that run's) under this config's
    metric settings; what sampling measured (wall time, the posterior's detection scores) is kept."""
    want = [int(cfg.sampler.seed) + i for i in range(int(cfg.n_samples))]
    shape = (int(cfg.dataset.channels), int(cfg.dataset.image_size), int(cfg.dataset.image_size))
    images, _ = runs.saved_samples(output_dir, old, want, shape, runs.samples_fingerprint(identity))
    log.info("%s: scoring its saved samples again (%s changed)", output_dir, ", ".join(old["rescore"]))
    scorer = Scorer(cfg)
    scores, _ = scorer(torch.from_numpy(images))
    # Scorer's keys replace the old ones; the Inception ones are dropped first, as this config may not make them
    result = {k: v for k, v in old.items() if not k.startswith("fid_inception") and k != "rescore"}
    result.update(scores, config=plain(cfg), fingerprint=fingerprint, weights=identity_weights(identity),
                  rescored={"from": runs.SAMPLES_NAME, "changed": old["rescore"],
                            "sampled_on": (old.get("rescored") or {}).get("sampled_on")  # a rescore of a rescore
                            or old.get("sampled_on") or (old.get("config") or {}).get("sampler", {}).get("device")})
    stage = runs.ResultStage(output_dir)
    try:
        save_records(stage, scorer, want, (old.get("samples") or {}).get("fingerprint") or runs.samples_fingerprint(identity))
        return finish(cfg, output_dir, result, stage)
    finally:
        stage.discard()


RECORDS_NAME = "records.npz"


def save_records(stage: runs.ResultStage, scorer: "Scorer", seeds: list[int], samples_fp: str) -> None:
    """records.npz: per seed, the classifier's class and features (and Inception features when computed),
    so that ``dng compare`` post-processes saved results (paired bootstrap) and never resamples."""
    io.atomic_savez(stage.path(RECORDS_NAME), seeds=np.asarray(seeds), fingerprint=np.asarray(samples_fp), **scorer.records)


def finish(cfg: DictConfig, output_dir: Path, result: dict, stage: runs.ResultStage) -> dict:
    """The histogram plot into ``stage``, then the commit: files renamed in, metrics.json last."""
    from dng_cli.plots import histogram_plot

    histogram_plot(result["histogram"], result["forbidden"], stage.path("histogram.png"),
                   title=f"{cfg.method.name} (scale {result['guidance_scale']}), forbidden "
                         f"{pipeline.forbidden_names(cfg, result['forbidden'])}",
                   class_names=cfg.dataset.get("class_names"))
    stage.commit(result)
    log.info("forbidden %.2f%% [%.2f, %.2f], KL %.4f, FID %.3f (full %.3f), %.1f images/s -> %s",
             100 * result["forbidden_rate"], *(100 * v for v in result["forbidden_rate_ci"]), result["kl_uniform"],
             result["fid"] or float("nan"), result["fid_full"] or float("nan"), result["images_per_s"], output_dir)
    return result


main = entry("evaluate", run, commits=True)
