"""`dng report` on fixture metrics files, and on a folder with no runs."""

import csv
import json

import pytest

from dng_cli import cli


def _metrics(method, scale, rate, kl, fid):
    return {"method": method, "forbidden": [0], "guidance_scale": scale, "forbidden_rate": rate,
            "forbidden_rate_ci": [max(0.0, rate - 0.02), rate + 0.02], "kl_uniform": kl, "fid": fid,
            "fid_full": fid + 1, "fid_features": "classifier-abc", "n_samples": 100, "steps": 25,
            "images_per_s": 3.5}


def test_report_on_fixture_runs(tmp_path, capsys):
    runs = {"a/method=np": _metrics("np", 1.0, 0.05, 0.2, 3.0), "a/method=dng": {**_metrics("dng", 5.0, 0.01, 0.05, 1.5), "kl_uniform_se": 0.0123},
            "b/method=np,s=2": _metrics("np", 2.0, 0.02, 0.4, 6.0)}
    for name, m in runs.items():
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "metrics.json").write_text(json.dumps(m))
    cli.main(["report", str(tmp_path)])
    rows = list(csv.DictReader((tmp_path / "report.csv").open()))
    assert rows[0]["label"] == "dng"  # label falls back to the method name
    assert [(r["method"], float(r["guidance_scale"])) for r in rows] == [("dng", 5.0), ("np", 1.0), ("np", 2.0)]
    assert float(rows[0]["forbidden_rate"]) == 0.01 and float(rows[2]["fid"]) == 6.0
    md = (tmp_path / "report.md").read_text()
    assert "| dng | 0 | 5 | 25 | 100 | 1.0 (0.0–3.0) | 0.050 ± 0.012 | 1.5 | 2.5 | 3.5 |" in md
    assert "| np | 0 | 1 | 25 | 100 | 5.0 (3.0–7.0) | 0.200 | 3 | 4 | 3.5 |" in md  # older runs: no s.e.
    assert float(rows[0]["kl_uniform_se"]) == 0.0123
    assert "classifier-abc" in md and "Inception" not in md
    assert (tmp_path / "pareto_kl.png").stat().st_size > 0 and (tmp_path / "pareto_fid.png").stat().st_size > 0


def test_report_carries_fid_se_and_inception_fid_when_present(tmp_path, capsys):
    m = {**_metrics("dng", 5.0, 0.01, 0.05, 1.5), "fid_se": 0.21, "fid_inception": 20.5, "fid_inception_se": 1.3,
         "fid_inception_full": 25.0}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text(json.dumps(m))
    cli.main(["report", str(tmp_path)])
    md = (tmp_path / "report.md").read_text()
    assert "| 1.5 ± 0.21 | 2.5 | 20.5 ± 1.3 | 25 | 3.5 |" in md and "Inception FID ± s.e." in md
    row = next(csv.DictReader((tmp_path / "report.csv").open()))
    assert float(row["fid_inception"]) == 20.5 and float(row["fid_se"]) == 0.21


def test_report_shows_each_runs_class_histogram_with_the_datasets_names(tmp_path, capsys):
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    hist = [0.2, 0.1, 0.15, 0.1, 0.15, 0.1, 0.01, 0.09, 0.05, 0.05]
    m = {**_metrics("np", 2.0, 0.01, 0.1, 3.0), "forbidden": [6], "histogram": hist,
         "config": {"dataset": {"class_names": names}}}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text(json.dumps(m))
    cli.main(["report", str(tmp_path)])
    md = (tmp_path / "report.md").read_text()
    assert "| run | N | T-shirt/top | Trouser | Pullover | Dress | Coat | Sandal | Shirt | Sneaker | Bag | Ankle boot |" in md
    assert "| np 2 | 100 | 20.0 | 10.0 | 15.0 | 10.0 | 15.0 | 10.0 | **1.0** | 9.0 | 5.0 | 5.0 |" in md
    row = next(csv.DictReader((tmp_path / "report.csv").open()))
    assert [float(v) for v in row["histogram"].split()] == hist


def test_report_no_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["report", str(tmp_path)])
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no runs" in err and str(tmp_path) in err
    assert tmp_path.is_dir() and not any(tmp_path.iterdir())


def test_report_missing_dir(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["report", str(tmp_path / "nope")])
    assert "does not exist" in capsys.readouterr().err


def test_matched_safety_view_interpolates_on_each_front():
    from dng_cli.commands.report import matched

    def pt(label, scale, rate, kl, fid):
        return {"label": label, "forbidden": [0], "guidance_scale": scale, "forbidden_rate": rate, "kl_uniform": kl,
                "fid": fid}

    rows = [pt("np", 0.0, 0.05, 0.07, 6.0), pt("np", 0.5, 0.02, 0.10, 8.0), pt("np", 1.0, 0.0, 0.30, 20.0),
            pt("sld", 1.0, 0.005, 0.08, 7.0), pt("dng", 1.0, 0.04, 0.06, 6.0), pt("dng", 3.0, 0.03, 0.07, 6.5)]
    out = {(r["label"], r["target"]): r for r in matched(rows, [0.01])}
    np_ = out[("np", 0.01)]
    assert np_["kl_uniform"] == pytest.approx(0.10 + 0.5 * 0.20) and np_["fid"] == pytest.approx(14.0)
    assert out[("sld", 0.01)]["kl_uniform"] == 0.08 and "already" in out[("sld", 0.01)]["how"]
    assert out[("dng", 0.01)]["kl_uniform"] is None and "not reached" in out[("dng", 0.01)]["how"]


def test_report_never_puts_two_models_or_seed_sets_on_one_front(tmp_path, capsys):
    """The audit's case: a sweep over two models (the MNIST DDPM and a random tiny UNet) used to give one "dng"
    front mixing both, so a matched row was interpolated between different models; a copied run folder counted
    twice. Now each model is its own front, named by what differs, the table shows the model, copies count once."""
    import shutil

    sweep = tmp_path / "mix"
    cli.main(["evaluate", "-m", "model=mnist,tiny_random", "method=dng", "method.guidance_scale=1,30",
              "sampler.steps=3", "n_samples=8", "sampler.progress=false", f"hydra.sweep.dir={sweep}"])
    first = sorted(sweep.glob("*/metrics.json"))[0].parent
    shutil.copytree(first, sweep / "copy_of_a_run")
    capsys.readouterr()
    cli.main(["report", str(sweep), "targets=[0.5]"])
    text = (sweep / "report.md").read_text()
    assert "| dng | mnist | mnist |" in text and "| dng | tiny_random | mnist |" in text  # model column (mixed)
    matched = text.split("**Matched safety, interpolated**")[1]
    assert "dng [model.name=mnist" in matched and "dng [model.name=tiny_random" in matched, matched
    assert len((sweep / "report.csv").read_text().strip().splitlines()) == 1 + 4  # the copy is not a fifth run
