"""Scoring finished samples: the run's classifier, the FID/KID references (shipped, cached, or computed once from
the dataset), the ``Scorer`` of a run and its per-seed records (records.npz, what ``dng compare`` re-analyses).

Shared by ``dng evaluate`` (fresh and rescored runs), ``dng compare`` (records of older folders) and
``scripts/make_fid_stats.py``. Everything here takes a resolved ``spec.RunSpec``, never a config.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from dng_cli import io, metrics, runs, spec
from dng_cli.models import classify, load_classifier
from dng_cli.sampler import to_uint8

log = logging.getLogger(__name__)

INCEPTION_BATCH = 32  # images per Inception call: 299x299 activations, best on a 2-core CPU (scripts/bench_inception.py)
RECORDS_NAME = "records.npz"


def classifier_of(run: spec.RunSpec):
    """The run's classifier (``model.classifier``), checked on one batch of the dataset's shape."""
    d = run.dataset
    return load_classifier(spec.thawed(run.model.classifier), check=(d.channels, d.image_size, d.num_classes))
def fid_scores(feats: torch.Tensor, stats: dict, forbidden: list[int], prefix: str = "fid") -> dict:
    """FID against the split without the forbidden classes and the full split, each with its s.e."""
    without, full = metrics.reference_stats(stats, forbidden), metrics.reference_stats(stats)
    enough = len(feats) > 1
    return {prefix: metrics.fid_from_features(feats, without) if enough else None,
            f"{prefix}_se": metrics.fid_se(feats, without),
            f"{prefix}_full": metrics.fid_from_features(feats, full) if enough else None,
            f"{prefix}_full_se": metrics.fid_se(feats, full)}


def fid_reference(d: spec.DatasetSpec, split: str, cache_dir, net, key: str, kid: bool = False,
                  data_hash: str | None = None, rebuild: bool = False) -> dict:
    """Per-class reference accumulators of ``split``: shipped, cached in ``cache_dir``, or computed from the dataset
    (then cached there; ``rebuild``: always computed, as ``scripts/make_fid_stats.py`` writes the shipped ones). With
    ``kid``, also the KID reference (every reference feature and its per-class kernel sums, ``<name>-kid.npz``)
    under the key "kid"; a cache made before KID is completed by one more pass over the data. ``data_hash``: a
    dataset of your own is named by its content too (``RunSpec.identity["weights.dataset"]``)."""
    from dng_cli.data import load_dataset

    name = reference_name(d.name, split, key, data_hash)
    candidates = [spec.SHIPPED[d.name] / "fid" / name] if d.name in spec.SHIPPED and not rebuild else []
    candidates.append(Path(cache_dir) / name)
    for path in candidates if not rebuild else []:
        kid_path = path.with_name(path.stem + "-kid.npz")
        if path.is_file() and (not kid or kid_path.is_file()):
            return {**metrics.load_stats(path), **({"kid": metrics.load_kid_reference(kid_path)} if kid else {})}
    images, labels = load_dataset(d, split)
    big = int(getattr(net, "num_features", 0)) > 512  # Inception: 299x299 inputs, small batches
    log.info("computing FID reference statistics %s: %d %s images, once (then cached in %s)%s", name, len(images),
             split, candidates[-1].parent, " — Inception runs at ~16 images/s on 2 CPU cores (MNIST's 10000 test "
             "images: ~10 min); progress and ETA below" if big else "")
    features: list | None = [] if kid else None
    stats = metrics.per_class_stats(net, to_uint8(images), labels, d.num_classes,
                                    batch_size=INCEPTION_BATCH if big else 500, progress=big, features=features)
    if kid:
        feats = torch.cat(features)
        reference = {"features": feats.numpy(), "labels": labels.numpy().astype(np.int16),
                     **metrics.kid_reference_terms(feats, labels, d.num_classes)}
        metrics.save_stats(candidates[-1].with_name(candidates[-1].stem + "-kid.npz"), reference)
        stats["kid"] = reference
    metrics.save_stats(candidates[-1], {k: v for k, v in stats.items() if k != "kid"})
    return stats


def reference_name(dataset: str, split: str, key: str, data_hash: str | None = None) -> str:
    """The file name of a reference: ``<dataset>-<split>[-<data hash[:12]>]-<features key>.npz``."""
    return f"{dataset}-{split}{'-' + data_hash[:12] if data_hash else ''}-{key}.npz"


class Scorer:
    """Everything ``run`` measures on finished uint8 samples: forbidden rate, class balance, FID on the
    classifier's features and, with metrics.fid.features=inception, Inception FID."""

    def __init__(self, run: spec.RunSpec):
        self.run = run
        self.forbidden = list(run.forbidden)
        self.classifier = classifier_of(run)  # a classifier of your own runs on one batch here
        clf_net = metrics.feature_network("classifier", self.classifier)
        self.fid_key = "classifier-" + run.identity["weights.classifier"][:12]
        data_hash = run.identity.get("weights.dataset")
        self.stats = fid_reference(run.dataset, run.metrics.split, run.metrics.cache_dir, clf_net, self.fid_key,
                                   data_hash=data_hash)
        self.inception = None
        if run.metrics.features == "inception":
            inc_net = metrics.feature_network("inception", None, run.metrics.inception_weights, run.metrics.backend)
            inc_key = metrics.features_key("inception", net=inc_net)
            inc_stats = fid_reference(run.dataset, run.metrics.split, run.metrics.cache_dir, inc_net, inc_key,
                                      kid=True, data_hash=data_hash)
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


def save_records(stage: runs.ResultStage, scorer: "Scorer", seeds: list[int], samples_fp: str) -> None:
    """records.npz: per seed, the classifier's class and features (and Inception features when computed),
    so that ``dng compare`` post-processes saved results (paired bootstrap) and never resamples."""
    io.atomic_savez(stage.path(RECORDS_NAME), seeds=np.asarray(seeds), fingerprint=np.asarray(samples_fp), **scorer.records)


