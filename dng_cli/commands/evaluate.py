"""``dng evaluate``: the paper's experiment for one configuration — sample N, classify, score.

Writes metrics.json (atomically; a finished run is skipped when re-run in the same folder),
samples.png, samples.npz (every scored image, uint8, with its seed), records.npz (per-seed classes and features)
and histogram.png. Metric definitions live in ``dng_cli.metrics``, the scoring in ``dng_cli.scoring``.

The command is one path: resolve the config (``spec.resolve_run``) → look at the folder (finished: done) →
draw the samples (``pipeline.draw``; resumed from the batches of a killed attempt) or, when only metric settings
changed, read the saved ones back → score them (``scoring.Scorer``) → commit (every file staged, metrics.json last).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from dng_cli import io, metrics, pipeline, runs, scoring, spec, trackers
from dng_cli.commands.common import entry

log = logging.getLogger(__name__)


def check_cfg(cfg: DictConfig) -> spec.RunSpec:
    """Every check that needs nothing heavy; the run spec the rest of the run uses."""
    return spec.resolve_run(cfg)


def result_folder(run: spec.RunSpec, output_dir: Path) -> runs.ResultFolder:
    return runs.ResultFolder(output_dir, run.identity, run.fingerprint, recompute=run.overwrite or not run.skip_existing,
                             schedule_of=spec.schedule_of, shape=run.dataset.shape)


def run(cfg: DictConfig, output_dir: Path, network=None) -> dict:
    """One evaluation; ``network``: an already loaded model (what ``models.load_model`` returns) to reuse.
    The folder is locked for the run (re-entrant: the CLI entry point or compare may hold it already)."""
    run = check_cfg(cfg)
    folder = result_folder(run, output_dir)
    if runs.only_finished_asked():
        return folder.finished_only()
    with runs.RunLock(output_dir, reentrant=True):
        runs.clean_folder(output_dir)
        old = folder.finished()
        if old is not None and "rescore" not in old:
            return old
        if old is None:
            device = pipeline.setup_torch(run.sampler.device, run.sampler.num_threads)
            scorer = scoring.Scorer(run)  # references first: a missing Inception file fails before any sampling
            partial = folder.partial()
            if run.overwrite:
                partial.clear()
            drawn = pipeline.draw(run, device, partial, network)
            scores, preds = scorer(drawn.images)
            result = fresh_result(run, drawn, scores, preds, scorer.forbidden, folder.samples_fp)
            commit(run, folder, result, scorer, folder.samples_fp, drawn)
            partial.clear()
            return result
        images = folder.saved(old, run.seeds)
        log.info("%s: scoring its saved samples again (%s changed)", output_dir, ", ".join(old["rescore"]))
        scorer = scoring.Scorer(run)
        scores, _ = scorer(torch.from_numpy(images))
        result = rescored_result(run, old, scores)
        return commit(run, folder, result, scorer, (old.get("samples") or {}).get("fingerprint") or folder.samples_fp)


def fresh_result(run: spec.RunSpec, drawn: pipeline.Drawn, scores: dict, preds: torch.Tensor,
                 forbidden: list[int], samples_fp: str) -> dict:
    """What metrics.json holds for samples drawn by this run (``samples_fp``: their fingerprint)."""
    n, post = run.n_samples, drawn.posterior
    return {
        "method": run.method_name,
        "label": run.label,
        "forbidden": forbidden,
        "guidance_scale": run.method.get("guidance_scale"),
        **scores,
        "mean_final_posterior": float(post[-1].sum(-1).mean()) if post.dim() == 3 else float(post[-1].mean()),
        **(metrics.posterior_detection(post, metrics.is_forbidden(preds, forbidden)) if drawn.tracks_posterior else {}),
        "mean_guidance_scale": float(drawn.scale.mean()),
        "n_samples": n,
        "steps": int(run.sampler.steps),
        "seed": run.sampler.seed,
        "wall_time_s": round(drawn.seconds, 3),
        "images_per_s": n / drawn.seconds,
        "sampled_on": drawn.sampled_on,
        "precision": run.sampler.precision,
        "backend": drawn.backend,
        "noise": runs.NOISE,
        "samples": {"fingerprint": samples_fp, "saved": run.save_samples},
        "config": run.plain_config(),
        "fingerprint": run.fingerprint,
        "weights": runs.identity_weights(dict(run.identity)),
    }


def rescored_result(run: spec.RunSpec, old: dict, scores: dict) -> dict:
    """A finished result's saved samples scored under this config's metric settings: the scores replace the old
    ones (the Inception ones are dropped first, as this config may not make them); what sampling measured (wall
    time, the posterior's detection scores) is kept."""
    result = {k: v for k, v in old.items() if not k.startswith(("fid_inception", "kid_inception")) and k != "rescore"}
    result.update(scores, config=run.plain_config(), fingerprint=run.fingerprint,
                  weights=runs.identity_weights(dict(run.identity)),
                  rescored={"from": runs.SAMPLES_NAME, "changed": old["rescore"],
                            "sampled_on": (old.get("rescored") or {}).get("sampled_on")  # a rescore of a rescore
                            or old.get("sampled_on") or (old.get("config") or {}).get("sampler", {}).get("device")})
    return result


def commit(run: spec.RunSpec, folder: runs.ResultFolder, result: dict, scorer: scoring.Scorer, records_fp: str,
           drawn: pipeline.Drawn | None = None) -> dict:
    """Every file of the result into a stage (the old result stays whole until the commit), then the commit:
    files renamed in, metrics.json last; then the trackers of logger=… see the committed result (a tracker's
    failure is a warning, never the run's). ``drawn``: the samples of a fresh run (samples.png, samples.npz)."""
    from dng_cli.plots import histogram_plot, save_grid

    output_dir, series = folder.folder, None
    stage = folder.stage()
    try:
        if drawn is not None:
            save_grid(drawn.images[:100], stage.path("samples.png"), nrow=10)
        io.pause_for_tests("evaluate_write")
        scoring.save_records(stage, scorer, run.seeds, records_fp)
        if drawn is not None:
            if run.save_samples:  # every image scored, so a metric added later needs no resampling
                runs.save_samples(stage.path(runs.SAMPLES_NAME), drawn.images.numpy(), run.seeds, records_fp,
                                  drawn.sampled_on, "evaluate", backend=np.asarray(drawn.backend))
            else:  # an earlier run's samples (overwrite=true) must not be rescored as this run's
                stage.remove(runs.SAMPLES_NAME)
            post = drawn.posterior.sum(-1) if drawn.posterior.dim() == 3 else drawn.posterior  # [steps, N]
            series = {"guidance_scale_mean": drawn.scale.mean(1).tolist(), "posterior_mean": post.mean(1).tolist()}
        histogram_plot(result["histogram"], result["forbidden"], stage.path("histogram.png"),
                       title=f"{run.method_name} (scale {result['guidance_scale']}), forbidden "
                             f"{run.dataset.names_of(result['forbidden'])}",
                       class_names=list(run.dataset.class_names) or None)
        stage.commit(result)
    finally:
        stage.discard()
    trackers.log_result(trackers.config_of(run.config), "evaluate", output_dir, result, series=series,
                        images={"samples": output_dir / "samples.png", "histogram": output_dir / "histogram.png"})
    log.info("forbidden %.2f%% [%.2f, %.2f], KL %.4f, FID %.3f (full %.3f), %.1f images/s -> %s",
             100 * result["forbidden_rate"], *(100 * v for v in result["forbidden_rate_ci"]), result["kl_uniform"],
             result["fid"] or float("nan"), result["fid_full"] or float("nan"), result["images_per_s"], output_dir)
    return result


main = entry("evaluate", run, commits=True)
