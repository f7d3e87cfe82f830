"""``dng evaluate``: the paper's experiment for one configuration — sample N, classify, score.

Writes metrics.json (atomically; a finished run is skipped when re-run in the same folder),
samples.png, samples.npz (every scored image, uint8, with its seed) and histogram.png. Metric definitions live in ``dng_cli.metrics``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from dng_cli import io, metrics, pipeline, runs, spec, trackers
from dng_cli.commands.common import entry, setup_torch
from dng_cli.models import SHIPPED, classify

log = logging.getLogger(__name__)


def check_cfg(cfg: DictConfig) -> spec.RunSpec:
    """Every check that needs nothing heavy; the run spec the rest of the run uses."""
    return spec.resolve_run(cfg)


def fid_scores(feats: torch.Tensor, stats: dict, forbidden: list[int], prefix: str = "fid") -> dict:
    """FID against the split without the forbidden classes and the full split, each with its s.e."""
    without, full = metrics.reference_stats(stats, forbidden), metrics.reference_stats(stats)
    enough = len(feats) > 1
    return {prefix: metrics.fid_from_features(feats, without) if enough else None,
            f"{prefix}_se": metrics.fid_se(feats, without),
            f"{prefix}_full": metrics.fid_from_features(feats, full) if enough else None,
            f"{prefix}_full_se": metrics.fid_se(feats, full)}


def fid_reference(run: spec.RunSpec, net, key: str, kid: bool = False) -> dict:
    """Per-class reference accumulators: shipped, cached, or computed from the dataset (then cached). With
    ``kid``, also the KID reference (every reference feature and its per-class kernel sums, ``<name>-kid.npz``)
    under the key "kid"; a cache made before KID is completed by one more pass over the data."""
    from dng_cli.data import load_dataset

    d, m = run.dataset, run.metrics
    data_hash = run.identity.get("weights.dataset")  # a dataset of your own: named by its content too
    name = f"{d.name}-{m.split}{'-' + data_hash[:12] if data_hash else ''}-{key}.npz"
    candidates = [SHIPPED[d.name] / "fid" / name] if d.name in SHIPPED else []
    candidates.append(Path(m.cache_dir) / name)
    for path in candidates:
        kid_path = path.with_name(path.stem + "-kid.npz")
        if path.is_file() and (not kid or kid_path.is_file()):
            return {**metrics.load_stats(path), **({"kid": metrics.load_kid_reference(kid_path)} if kid else {})}
    images, labels = load_dataset(d, m.split)
    big = int(getattr(net, "num_features", 0)) > 512  # Inception: 299x299 inputs, small batches
    log.info("computing FID reference statistics %s: %d %s images, once (then cached in %s)%s", name, len(images),
             m.split, candidates[-1].parent, " — Inception runs at ~16 images/s on 2 CPU cores (MNIST's 10000 test "
             "images: ~10 min); progress and ETA below" if big else "")
    features: list | None = [] if kid else None
    stats = metrics.per_class_stats(net, pipeline.to_uint8(images), labels, d.num_classes,
                                    batch_size=INCEPTION_BATCH if big else 500, progress=big, features=features)
    if kid:
        feats = torch.cat(features)
        reference = {"features": feats.numpy(), "labels": labels.numpy().astype(np.int16),
                     **metrics.kid_reference_terms(feats, labels, d.num_classes)}
        metrics.save_stats(candidates[-1].with_name(candidates[-1].stem + "-kid.npz"), reference)
        stats["kid"] = reference
    metrics.save_stats(candidates[-1], {k: v for k, v in stats.items() if k != "kid"})
    return stats


method_label = spec.method_label


NOT_RESULT_KEYS, RESCORE_PREFIX = runs.NOT_RESULT_KEYS, runs.RESCORE_PREFIX
result_config = runs.result_config
identity_weights = runs.identity_weights


result_identity, identity_config = pipeline.result_identity, pipeline.identity_config
_schedule_of = pipeline.schedule_of


def finished_result(metrics_path: Path, identity: dict, fingerprint: str, recompute: bool) -> dict | None:
    """``runs.finished_result`` with the model's noise schedule."""
    return runs.finished_result(metrics_path, identity, fingerprint, recompute, _schedule_of)


def run(cfg: DictConfig, output_dir: Path, network=None) -> dict:
    """One evaluation; ``network``: an already loaded model (what ``pipeline.load_model`` returns) to reuse.
    The folder is locked for the run (re-entrant: the CLI entry point or compare may hold it already).
    The config is resolved here, once (``spec.resolve_run``); everything below works on the run spec."""
    run_spec = check_cfg(cfg)
    if runs.only_finished_asked():
        return finished_only(run_spec, output_dir)
    with runs.RunLock(output_dir, reentrant=True):
        runs.clean_folder(output_dir)
        return _run(run_spec, output_dir, network)


def finished_in(run: spec.RunSpec, output_dir: Path) -> dict | None:
    """The folder's finished result of this config (``"rescore"`` marked when only metric settings differ), else
    None; another config's result is refused (``finished_result``)."""
    path = output_dir / runs.RESULT_NAME
    return finished_result(path, dict(run.identity), run.fingerprint,
                           recompute=run.overwrite or not run.skip_existing) if path.exists() else None


def finished_only(run: spec.RunSpec, output_dir: Path) -> dict:
    """Under ``runs.only_finished``: this config's finished result (read only, no lock), else ``runs.Unfinished``
    (also when it would be rescored: that computes)."""
    found = finished_in(run, output_dir)
    if found is None or "rescore" in found:
        raise runs.Unfinished(str(output_dir))
    return found


def _run(run: spec.RunSpec, output_dir: Path, network) -> dict:
    identity = dict(run.identity)
    fingerprint = run.fingerprint
    finished = finished_in(run, output_dir)
    if finished is not None and "rescore" in finished:
        return rescore(run, output_dir, finished, identity, fingerprint)
    if finished is not None:
        return finished
    device = setup_torch(run.sampler.device, run.sampler.num_threads)
    scorer = Scorer(run)  # reference statistics first: a missing Inception file fails before any sampling
    gen = pipeline.build(run, device, network)
    n, seeds = run.n_samples, run.seeds
    samples_fp = runs.samples_fingerprint(identity)
    partial = runs.PartialBatches(output_dir, samples_fp, run.dataset.shape)  # finished batches survive a kill
    if run.overwrite:
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
        pipeline.generate_all(gen, todo, run.sampler.batch_size, progress=run.sampler.progress, on_batch=keep)
    batches = partial.load(seeds)
    images = torch.from_numpy(np.stack([batches[s][0] for s in seeds]))
    out = pipeline.SampleOutput(images, torch.from_numpy(np.stack([batches[s][1] for s in seeds], 1)),
                                torch.from_numpy(np.stack([batches[s][2] for s in seeds], 1)), None)
    wall = sum(batches[s][3] for s in seeds)  # the sampling time of the kept samples, over all attempts
    scores, preds = scorer(images)
    sampled_on = pipeline.device_name(gen.device)
    result = {
        "method": run.method_name,
        "label": run.label,
        "forbidden": scorer.forbidden,
        "guidance_scale": run.method.get("guidance_scale"),
        **scores,
        "mean_final_posterior": float(out.posterior[-1].sum(-1).mean()) if out.posterior.dim() == 3 else float(out.posterior[-1].mean()),
        **(metrics.posterior_detection(out.posterior, metrics.is_forbidden(preds, scorer.forbidden))
           if gen.guidance.tracks_posterior else {}),
        "mean_guidance_scale": float(out.scale.mean()),
        "n_samples": n,
        "steps": int(run.sampler.steps),
        "seed": run.sampler.seed,
        "wall_time_s": round(wall, 3),
        "images_per_s": n / wall,
        "sampled_on": sampled_on,
        "precision": run.sampler.precision,
        "backend": gen.backend,
        "noise": runs.NOISE,
        "samples": {"fingerprint": samples_fp, "saved": run.save_samples},
        "config": run.plain_config(),
        "fingerprint": fingerprint,
        "weights": identity_weights(identity),
    }
    from dng_cli.plots import save_grid

    stage = runs.ResultStage(output_dir)  # every file aside; the old result stays until the commit
    try:
        save_grid(images[:100], stage.path("samples.png"), nrow=10)
        io.pause_for_tests("evaluate_write")
        save_records(stage, scorer, seeds, samples_fp)
        if run.save_samples:  # every image scored, so a metric added later needs no resampling
            runs.save_samples(stage.path(runs.SAMPLES_NAME), images.numpy(), seeds, samples_fp, sampled_on, "evaluate",
                              backend=np.asarray(gen.backend))
        else:  # an earlier run's samples (overwrite=true) must not be rescored as this run's
            stage.remove(runs.SAMPLES_NAME)
        post = out.posterior.sum(-1) if out.posterior.dim() == 3 else out.posterior  # [steps, N]
        finished = finish(run, output_dir, result, stage, {"guidance_scale_mean": out.scale.mean(1).tolist(),
                                                           "posterior_mean": post.mean(1).tolist()})
        partial.clear()
        return finished
    finally:
        stage.discard()


INCEPTION_BATCH = 32  # images per Inception call: 299x299 activations, best on a 2-core CPU (scripts/bench_inception.py)


class Scorer:
    """Everything ``run`` measures on finished uint8 samples: forbidden rate, class balance, FID on the
    classifier's features and, with metrics.fid.features=inception, Inception FID."""

    def __init__(self, run: spec.RunSpec):
        self.run = run
        self.forbidden = list(run.forbidden)
        self.classifier = pipeline.run_classifier(run)  # a classifier of your own runs on one batch here
        clf_net = metrics.feature_network("classifier", self.classifier)
        self.fid_key = "classifier-" + run.identity["weights.classifier"][:12]
        self.stats = fid_reference(run, clf_net, self.fid_key)
        self.inception = None
        if run.metrics.features == "inception":
            inc_net = metrics.feature_network("inception", None, run.metrics.inception_weights, run.metrics.backend)
            inc_key = metrics.features_key("inception", net=inc_net)
            inc_stats = fid_reference(run, inc_net, inc_key, kid=True)
            self.inception = (inc_net, inc_key, inc_stats)
            self.kid_reference = metrics.KidReference(inc_stats["kid"], self.forbidden)

    def __call__(self, images: torch.Tensor) -> tuple[dict, torch.Tensor]:
        run, forbidden, n = self.run, self.forbidden, len(images)
        preds, feats = classify(self.classifier, images)
        self.records = {"classes": preds.numpy().astype(np.int16), "features": feats.float().numpy()}
        inception_scores = {}
        if self.inception is not None:
            inc_net, inc_key, inc_stats = self.inception
            t0 = time.perf_counter()
            with torch.inference_mode():
                inc_feats = torch.cat([inc_net(images[i:i + INCEPTION_BATCH]) for i in range(0, n, INCEPTION_BATCH)])
            speed = n / (time.perf_counter() - t0)  # this run's Inception throughput (scripts/bench_inception.py)
            self.records["inception"] = inc_feats.float().numpy()
            inception_scores = {**fid_scores(inc_feats, inc_stats, forbidden, "fid_inception"),
                                "fid_inception_features": inc_key, "fid_inception_images_per_s": speed,
                                "fid_inception_backend": getattr(inc_net, "backend", "torch"),
                                # KID beside FID: unbiased, no Gaussian assumption (N may be below 2048)
                                "kid_inception": metrics.kid(inc_feats, self.kid_reference) if n > 1 else None,
                                "kid_inception_se": metrics.kid_se(inc_feats, self.kid_reference)}
        counts = metrics.class_histogram(preds, run.dataset.num_classes)
        smoothing = run.metrics.kl_smoothing
        return {
            **metrics.forbidden_rate(counts, forbidden),
            "kl_kept": metrics.kl_kept(counts, forbidden, smoothing),
            "kl_kept_se": metrics.kl_kept_se(counts, forbidden, smoothing),
            "kl_uniform": metrics.kl_uniform(counts, forbidden, smoothing),
            "kl_uniform_se": metrics.kl_uniform_se(counts, forbidden, smoothing),
            **fid_scores(feats, self.stats, forbidden),
            "fid_features": self.fid_key,
            **inception_scores,
            "fid_reference": {"dataset": run.dataset.name, "split": run.metrics.split, "excluded": forbidden},
            "histogram": [c / n for c in counts],
            "histogram_counts": counts,
        }, preds


def rescore(run: spec.RunSpec, output_dir: Path, old: dict, identity: dict, fingerprint: str) -> dict:
    """Score a finished run's saved samples (samples.npz, checked to be that run's) under this config's
    metric settings; what sampling measured (wall time, the posterior's detection scores) is kept."""
    want = run.seeds
    images, _ = runs.saved_samples(output_dir, old, want, run.dataset.shape, runs.samples_fingerprint(identity))
    log.info("%s: scoring its saved samples again (%s changed)", output_dir, ", ".join(old["rescore"]))
    scorer = Scorer(run)
    scores, _ = scorer(torch.from_numpy(images))
    # Scorer's keys replace the old ones; the Inception ones are dropped first, as this config may not make them
    result = {k: v for k, v in old.items() if not k.startswith(("fid_inception", "kid_inception")) and k != "rescore"}
    result.update(scores, config=run.plain_config(), fingerprint=fingerprint, weights=identity_weights(identity),
                  rescored={"from": runs.SAMPLES_NAME, "changed": old["rescore"],
                            "sampled_on": (old.get("rescored") or {}).get("sampled_on")  # a rescore of a rescore
                            or old.get("sampled_on") or (old.get("config") or {}).get("sampler", {}).get("device")})
    stage = runs.ResultStage(output_dir)
    try:
        save_records(stage, scorer, want, (old.get("samples") or {}).get("fingerprint") or runs.samples_fingerprint(identity))
        return finish(run, output_dir, result, stage)
    finally:
        stage.discard()


RECORDS_NAME = "records.npz"


def save_records(stage: runs.ResultStage, scorer: "Scorer", seeds: list[int], samples_fp: str) -> None:
    """records.npz: per seed, the classifier's class and features (and Inception features when computed),
    so that ``dng compare`` post-processes saved results (paired bootstrap) and never resamples."""
    io.atomic_savez(stage.path(RECORDS_NAME), seeds=np.asarray(seeds), fingerprint=np.asarray(samples_fp), **scorer.records)


def finish(run: spec.RunSpec, output_dir: Path, result: dict, stage: runs.ResultStage,
           series: dict[str, list[float]] | None = None) -> dict:
    """The histogram plot into ``stage``, then the commit: files renamed in, metrics.json last."""
    from dng_cli.plots import histogram_plot

    histogram_plot(result["histogram"], result["forbidden"], stage.path("histogram.png"),
                   title=f"{run.method_name} (scale {result['guidance_scale']}), forbidden "
                         f"{pipeline.forbidden_names(run, result['forbidden'])}",
                   class_names=list(run.dataset.class_names) or None)
    stage.commit(result)
    # the trackers of logger=… see the committed result (a tracker's failure is a warning, never the run's)
    trackers.log_result(trackers.config_of(run.config), "evaluate", output_dir, result, series=series,
                        images={"samples": output_dir / "samples.png", "histogram": output_dir / "histogram.png"})
    log.info("forbidden %.2f%% [%.2f, %.2f], KL %.4f, FID %.3f (full %.3f), %.1f images/s -> %s",
             100 * result["forbidden_rate"], *(100 * v for v in result["forbidden_rate_ci"]), result["kl_uniform"],
             result["fid"] or float("nan"), result["fid_full"] or float("nan"), result["images_per_s"], output_dir)
    return result


main = entry("evaluate", run, commits=True)
