"""`dng evaluate` end to end on the tiny model, batch-size independence, resume, bad input."""

import json

import pytest
import torch

from dng_cli import cli, pipeline
from dng_cli.sampler import generate_all
from dng_cli.spec import resolve_run
from dng_cli.commands import evaluate

TINY = ["model=tiny_random", "n_samples=6", "sampler.steps=2", "sampler.batch_size=4", "sampler.progress=false"]


def test_evaluate_end_to_end_and_resume(compose, tmp_path):
    cfg = compose("evaluate", TINY + ["method=dng", "forbidden=[0,6]"])
    out = tmp_path / "run"
    result = evaluate.run(cfg, out)
    m = json.loads((out / "metrics.json").read_text())
    for key in ("forbidden_rate", "forbidden_rate_ci", "kl_uniform", "fid", "fid_full", "fid_features",
                "histogram", "n_samples", "steps", "wall_time_s", "images_per_s", "config"):
        assert key in m, key
    assert m["n_samples"] == 6 and m["steps"] == 2 and sum(m["histogram_counts"]) == 6
    assert set(m["forbidden_rate_per_class"]) == {"0", "6"}
    assert m["forbidden_rate_ci"][0] <= m["forbidden_rate"] <= m["forbidden_rate_ci"][1]
    assert m["fid_features"].startswith("classifier-") and m["fid"] > 0
    assert (out / "samples.png").is_file() and (out / "histogram.png").is_file()
    assert result["forbidden_rate"] == m["forbidden_rate"]
    # DNG tracks a posterior: scored as a detector of the final verdict (too few samples for an AUROC)
    assert m["posterior_n_forbidden"] == round(6 * m["forbidden_rate"])
    assert m["posterior_auroc"] is None and set(m["posterior_auroc_at"]) == {"0.25", "0.5", "0.75", "1"}
    stamp = (out / "metrics.json").stat().st_mtime_ns
    evaluate.run(cfg, out)  # finished: skipped
    assert (out / "metrics.json").stat().st_mtime_ns == stamp


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float rounding: 1e-5 of the images' magnitude (tiny_random's images are unclamped, |x| to ~700;
    one uint8 level of a [-1, 1] image would be 8e-3)."""
    return float((a - b).abs().max()) <= 1e-5 * float(b.abs().max()) + 1e-6


def test_samples_do_not_depend_on_batch_size(compose):
    cfg = compose("evaluate", TINY + ["method=np", "method.guidance_scale=2"])
    gen = pipeline.build(resolve_run(cfg, scored=False), torch.device("cpu"))
    a = generate_all(gen, list(range(5)), batch_size=5, progress=False)
    b = generate_all(gen, list(range(5)), batch_size=2, progress=False)
    c = generate_all(gen, [3, 4], batch_size=2, progress=False)
    assert _same(a.images, b.images)
    assert _same(a.images[3:], c.images)


def test_methods_share_x_T(compose):
    # DNG with temperature 0 and offset 0 is NP at scale λ·prior/(1-prior): with that NP scale the
    # two methods give the same images, which holds only if both started from the same x_T
    cfg = compose("evaluate", TINY + ["method=dng", "sampler.steps=1", "method.temperature=0", "method.offset=0",
                                      "method.prior=0.5", "method.guidance_scale=2"])
    dng = generate_all(pipeline.build(resolve_run(cfg, scored=False), torch.device("cpu")), [0, 1], batch_size=2, progress=False)
    cfg = compose("evaluate", TINY + ["method=np", "sampler.steps=1", "method.guidance_scale=2"])
    np_ = generate_all(pipeline.build(resolve_run(cfg, scored=False), torch.device("cpu")), [1, 0], batch_size=1, progress=False)
    assert _same(dng.images, np_.images.flip(0))


@pytest.mark.parametrize("args,match", [
    (["n_samples=0"], "n_samples=0"),
    (["n_samples=-3"], "n_samples=-3"),
    (["metrics.fid.features=vgg"], "'vgg'"),
])
def test_evaluate_bad_inputs(capsys, tmp_path, args, match):
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        cli.main(["evaluate", "model=tiny_random", f"hydra.run.dir={run_dir}", *args])
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err
    assert not run_dir.exists()


def test_channels_last_matches_default(compose):
    outs = []
    for fmt in ("false", "true"):
        cfg = compose("evaluate", TINY + ["method=dng", f"sampler.channels_last={fmt}"])
        outs.append(generate_all(pipeline.build(resolve_run(cfg, scored=False), torch.device("cpu")), [0, 1, 2], 3, progress=False))
    assert _same(outs[0].images, outs[1].images)
    assert torch.allclose(outs[0].posterior, outs[1].posterior, rtol=1e-3, atol=1e-6)
