"""``dng calibrate``: the smallest guidance scale whose forbidden rate is ≤ ``target_forbidden``.

Each probe is a ``dng evaluate`` run of ``pilot_n`` samples (seeds ``pilot_seed``…) cached in
``<run dir>/probes/scale=<λ>/`` with its fingerprint, so an interrupted calibration resumes; ``dng compare``
keeps one probe folder per method and starts each later target from the probes already run. Writes ``calibration.json`` (the probes, λ*, the rate at
λ* with its Wilson interval); the search itself is ``dng_cli.calibration.calibrate``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dng_cli import UserError, calibration, spec
from dng_cli.commands import evaluate
from dng_cli.commands.common import entry
from dng_cli.io import write_json
from dng_cli.models import load_model
from dng_cli.pipeline import setup_torch
from dng_cli.spec import plain
from dng_cli.spec import check_types

log = logging.getLogger(__name__)
SEARCH_KEYS = ("target_forbidden", "pilot_n", "pilot_seed", "scale_min", "scale_max", "scale_start", "tolerance",
               "max_probes", "methods", "targets", "grid_rates", "grid_max_ratio", "grid_extend", "grid", "bootstrap",
               "bootstrap_seed", "band_factor", "compared", "primary", "method_overrides")


def check_search(cfg: DictConfig, targets: list) -> None:
    for t in targets:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t < 1.0:
            raise UserError(f"target forbidden rate {t!r} is invalid: it must lie in [0, 1)")
    if not 0 < float(cfg.scale_min) < float(cfg.scale_max):
        raise UserError(f"scale_min={cfg.scale_min}, scale_max={cfg.scale_max} are invalid: need 0 < scale_min < scale_max")
    check_types(cfg)  # pilot_n, max_probes, tolerance, ...: the declared type/range table
    start = cfg.get("scale_start")
    if start not in (None, "method") and (isinstance(start, bool) or not isinstance(start, (int, float)) or start <= 0):
        raise UserError(f"scale_start={start!r} is invalid: allowed are method (each method's guidance_scale), "
                        f"null (the range ends) or a positive number")


def check_cfg(cfg: DictConfig) -> None:
    check_search(cfg, [cfg.target_forbidden])
    if "guidance_scale" not in cfg.method:
        raise UserError(f"method={cfg.method.name} has no guidance_scale to calibrate: allowed are np, sld, dng (or a dng preset)")
    evaluate.check_cfg(probe_cfg(cfg, cfg.method, 1.0))


def run_cfg(cfg: DictConfig, method: DictConfig, scale: float, n: int, seed: int, label: str | None = None) -> DictConfig:
    """An evaluate config from a calibrate/compare config: ``method`` at ``scale``, n samples from ``seed``."""
    data = {k: v for k, v in plain(cfg).items() if k not in SEARCH_KEYS}
    data.update(n_samples=n, seed=seed, method={**OmegaConf.to_container(method, resolve=True), "guidance_scale": scale})
    if label is not None:
        data["label"] = label
    data["sampler"]["seed"] = seed
    return OmegaConf.create(data)


def probe_cfg(cfg: DictConfig, method: DictConfig, scale: float, label: str | None = None) -> DictConfig:
    """A probe's evaluate config: the pilot seeds, and the fast classifier FID (a probe only counts forbidden
    samples; Inception features would cost ~25 s per 300 samples on a 2-core CPU and decide nothing)."""
    probe = run_cfg(cfg, method, scale, int(cfg.pilot_n), int(cfg.pilot_seed), label)
    probe.metrics.fid.features = "classifier"
    return probe


def calibrate_method(cfg: DictConfig, method: DictConfig, target: float, folder: Path, network=None,
                     label: str | None = None, probes_dir: Path | None = None,
                     known: list[calibration.Probe] = ()) -> dict:
    """Calibrate one method to one target; probes cached under ``probes_dir`` (default ``folder/probes``).

    ``known``: probes of this method on the same pilot set from an earlier target (they start the bracket).
    """
    probes_dir = probes_dir or folder / "probes"

    def probe(scale: float) -> tuple[int, int]:
        m = evaluate.run(probe_cfg(cfg, method, scale, label), probes_dir / f"scale={scale:g}", network)
        forbidden = sum(m["histogram_counts"][c] for c in m["forbidden"])
        log.info("probe %s scale %g: %d/%d forbidden", m["label"], scale, forbidden, m["n_samples"])
        return forbidden, m["n_samples"]

    start = cfg.get("scale_start")
    if start == "method":
        start = float(method.guidance_scale) if float(method.guidance_scale) > 0 else None
    result = calibration.calibrate(probe, float(target), float(cfg.scale_min), float(cfg.scale_max),
                                   float(cfg.tolerance), int(cfg.max_probes), known,
                                   None if start is None else float(start))
    out = {"method": str(method.name), "method_config": OmegaConf.to_container(method, resolve=True),
           "pilot_n": int(cfg.pilot_n), "pilot_seed": int(cfg.pilot_seed), **result.as_dict()}
    write_json(folder / "calibration.json", out)
    return out


def calibrate_run(cfg: DictConfig, target: float, output_dir: Path) -> dict:
    """The run's own method calibrated: a launcher job's unit (its probes depend on each other)."""
    return calibrate_method(cfg, cfg.method, target, output_dir)


def run(cfg: DictConfig, output_dir: Path) -> dict:
    check_cfg(cfg)
    from dng_cli import fanout

    jobs = fanout.runner(output_dir)  # launcher=local|slurm: the bisection runs as one job, not here
    if jobs is not None:
        (result,) = jobs.map(fanout.unit, [(calibrate_run, fanout.absolute_paths(plain(cfg)), float(cfg.target_forbidden),
                                            Path(output_dir).resolve())], "calibrate", ready=fanout.finished)
    else:
        device = setup_torch(cfg.sampler.device, cfg.sampler.get("num_threads"))
        network = load_model(spec.model_spec(cfg.model), device)
        result = calibrate_method(cfg, cfg.method, float(cfg.target_forbidden), output_dir, network)
    if not result["reached"]:
        raise UserError(f"method={cfg.method.name} cannot reach forbidden <= {cfg.target_forbidden:g}: {result['reason']} "
                        f"(see {output_dir / 'calibration.json'})")
    print(f"{cfg.method.name}: guidance_scale* = {result['scale_star']:g} (the smallest probe meeting the target; its "
          f"pilot forbidden rate {100 * result['rate_at_star']:.2f}%, {len(result['probes'])} probes)")
    return result


main = entry("calibrate", run)
