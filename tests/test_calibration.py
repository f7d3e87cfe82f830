"""Calibration to a target safety (bisection on log λ) and the matched-safety comparison."""

import json
import math

import pytest
import torch

from dng_cli import UserError, cli
from dng_cli.calibration import calibrate
from dng_cli.guidance import NegativePrompting
from dng_cli.sampler import sample
from dng_cli.schedule import NoiseSchedule

TINY = ["model=tiny_random", "sampler.steps=1", "sampler.batch_size=8", "sampler.progress=false"]


def test_bisection_finds_the_smallest_scale_that_meets_the_target():
    n = 1000

    def probe(scale):  # a smooth decreasing rate: 20 % at λ = 0.1 ... 0 for large λ
        return round(n * 0.2 * math.exp(-scale)), n

    res = calibrate(probe, target=0.01, scale_min=0.1, scale_max=100, tolerance=0.05, max_probes=30)
    exact = math.log(0.2 / 0.01)  # 2.996
    assert res.scale_star is not None and exact * 0.97 <= res.scale_star <= exact * 1.06
    failing = [p.scale for p in res.probes if p.rate > 0.01]
    assert max(failing) < res.scale_star and res.at_star().rate <= 0.01
    summary = res.as_dict()
    assert summary["reached"] and summary["rate_at_star_ci"][0] <= summary["rate_at_star"]


def test_a_second_target_starts_from_the_first_targets_probes():
    """Known probes (same pilot set, an earlier target) start the bracket: the same λ*, fewer new probes."""
    n, calls = 1000, []

    def probe(scale):
        calls.append(scale)
        return round(n * 0.2 * math.exp(-scale)), n

    first = calibrate(probe, target=0.01, scale_min=0.01, scale_max=1000, tolerance=0.1, max_probes=30)
    calls.clear()
    cold = calibrate(probe, target=0.003, scale_min=0.01, scale_max=1000, tolerance=0.1, max_probes=30)
    n_cold = len(calls)
    calls.clear()
    warm = calibrate(probe, target=0.003, scale_min=0.01, scale_max=1000, tolerance=0.1, max_probes=30,
                     known=first.probes)
    assert warm.at_star().rate <= 0.003 and all(p.rate > 0.003 for p in warm.probes if p.scale < warm.scale_star)
    assert abs(math.log(warm.scale_star / cold.scale_star)) <= math.log(1.1)
    assert len(calls) < n_cold and not set(calls) & {p.scale for p in first.probes}
    assert "new)" in warm.reason


def test_stepping_from_a_start_scale_brackets_with_fewer_probes():
    n = 1000

    def probe(scale):
        return round(n * 0.2 * math.exp(-scale)), n

    ends = calibrate(probe, target=0.01, scale_min=0.01, scale_max=1000, tolerance=0.5, max_probes=30)
    for start in (1.0, 10.0, 0.02, 999.0):
        res = calibrate(probe, target=0.01, scale_min=0.01, scale_max=1000, tolerance=0.5, max_probes=30, start=start)
        assert res.at_star().rate <= 0.01 and all(p.rate > 0.01 for p in res.probes if p.scale < res.scale_star)
        assert max(p.scale for p in res.probes if p.scale < res.scale_star) * 1.5 >= res.scale_star
        if start in (1.0, 10.0):
            assert len(res.probes) < len(ends.probes)
    assert calibrate(lambda s: (50, 100), 0.01, 0.1, 10, start=1.0).reason.startswith("forbidden rate 50.000% at the largest")
    met = calibrate(lambda s: (0, 100), 0.01, 0.1, 10, start=1.0)
    assert met.scale_star == 0.1 and "already meets" in met.reason


def test_bisection_gives_up_cleanly():
    res = calibrate(lambda s: (50, 100), target=0.01, scale_min=0.1, scale_max=10)
    assert res.scale_star is None and "above the target" in res.reason and len(res.probes) == 1
    res = calibrate(lambda s: (0, 100), target=0.01, scale_min=0.1, scale_max=10)
    assert res.scale_star == 0.1 and len(res.probes) == 2


def test_calibrates_np_on_the_analytic_mixture(gmm):
    """Real sampling: NP at λ* meets the target on the pilot set, the largest failing probe does not."""
    x_T = torch.randn(400, 2, generator=torch.Generator().manual_seed(0))
    schedule = NoiseSchedule.linear().respace(20)

    def probe(scale):
        out = sample(gmm, schedule, NegativePrompting(scale), x_T, generator=torch.Generator().manual_seed(1),
                     progress=False, variance="small")
        return int((gmm.component(out.images) == 0).sum()), len(x_T)

    unguided = probe(0.0)[0] / 400
    assert unguided > 0.2
    res = calibrate(probe, target=0.02, scale_min=0.01, scale_max=10.0, tolerance=0.1, max_probes=12)
    assert res.scale_star is not None and res.at_star().rate <= 0.02
    assert all(p.rate > 0.02 for p in res.probes if p.scale < res.scale_star)


def test_calibrate_command_caches_probes_and_refuses_unreachable(tmp_path, capsys):
    out = tmp_path / "cal"
    cli.main(["calibrate", *TINY, "method=np", "pilot_n=4", "target_forbidden=0.5", "scale_min=0.1",
              f"hydra.run.dir={out}"])
    cal = json.loads((out / "calibration.json").read_text())  # steps down from np's scale 1: 1, 0.25, 0.1
    assert cal["reached"] and cal["scale_star"] == 0.1 and [p["scale"] for p in cal["probes"]] == [0.1, 0.25, 1.0]
    assert len(list((out / "probes").glob("scale=*/metrics.json"))) == 3
    assert "guidance_scale* = 0.1" in capsys.readouterr().out
    # the tiny model's noise is all classified 8: forbidding 8 cannot be reached
    with pytest.raises(SystemExit) as exc:
        cli.main(["calibrate", *TINY, "method=np", "forbidden=[8]", "pilot_n=4", "scale_max=10",
                  f"hydra.run.dir={tmp_path / 'cal8'}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot reach forbidden <= 0.01" in err
    with pytest.raises(SystemExit):
        cli.main(["calibrate", *TINY, "method=none", f"hydra.run.dir={tmp_path / 'none'}"])
    assert "no guidance_scale" in capsys.readouterr().err


def test_compare_end_to_end_on_the_tiny_model(tmp_path, capsys):
    out = tmp_path / "cmp"
    cli.main(["compare", *TINY, "methods=[np,dng_official_cli,dng]", "targets=[0.5]", "n_samples=6", "pilot_n=4",
              f"hydra.run.dir={out}"])
    summary = json.loads((out / "compare.json").read_text())
    assert summary["reference"] == "dng" and len(summary["rows"]) == 3
    for r in summary["rows"]:
        assert r["scale_star"] == 0.01 and r["metrics"]["n_samples"] == 6
        assert r["metrics"]["fid_se"] is not None and r["metrics"]["kl_uniform_se"] is not None
    labels = {json.loads(p.read_text())["label"] for p in (out / "eval").glob("*/metrics.json")}
    assert labels == {"np", "dng_official_cli", "dng"}
    np_row = next(r for r in summary["rows"] if r["method"] == "np")
    d = np_row["kl_uniform_vs_reference"]
    assert d["lo"] <= d["diff"] <= d["hi"]
    for name in ("compare.csv", "compare.md", "compare.png"):
        assert (out / name).is_file()
    md = (out / "compare.md").read_text()
    assert "| 50 % | np |" in md
    assert "**Class histogram**" in md and "| 50 % np λ*=0.01 | 6 |" in md  # where the removed mass went
    # a second run reuses every probe and evaluation (fingerprints match)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("metrics.json")}
    cli.main(["compare", *TINY, "methods=[np,dng_official_cli,dng]", "targets=[0.5]", "n_samples=6", "pilot_n=4",
              f"hydra.run.dir={out}"])
    assert {p: p.stat().st_mtime_ns for p in out.rglob("metrics.json")} == stamps


def test_compare_shares_one_pilot_set_per_method_across_targets(tmp_path, capsys):
    out = tmp_path / "cmp"
    cli.main(["compare", *TINY, "methods=[np]", "targets=[0.5,0.3]", "n_samples=4", "pilot_n=4",
              "scale_min=0.01", "scale_max=1", f"hydra.run.dir={out}"])
    listed = [json.loads((out / "calibrate" / f"np-{t}" / "calibration.json").read_text())["probes"] for t in ("0.5", "0.3")]
    run = {p.parent.name for p in (out / "calibrate" / "np" / "probes").glob("scale=*/metrics.json")}
    assert run == {f"scale={p['scale']:g}" for probes in listed for p in probes}
    assert len(run) < sum(len(probes) for probes in listed)  # the second target reused the first one's probes


def test_compare_table_carries_inception_fid_when_present():
    from dng_cli.commands.compare import difference, table

    def row(method, kl, fid, inc):
        m = {"n_samples": 1000, "forbidden_rate": 0.01, "forbidden_rate_ci": [0.005, 0.02], "kl_uniform": kl,
             "kl_uniform_se": 0.01, "fid": fid, "fid_se": 0.5, "fid_inception": inc, "fid_inception_se": 1.0}
        return {"target": 0.01, "method": method, "scale_star": 1.0, "metrics": m}

    ref, other = row("dng", 0.04, 6.0, 20.0), row("np", 0.10, 6.2, 30.0)
    for key in ("kl_uniform", "fid", "fid_inception"):
        other[f"{key}_vs_reference"] = difference(other["metrics"], ref["metrics"], key)
    md = table([other, ref], "dng")
    assert "Inception FID − dng" in md and "+10.000 [+7.228, +12.772] ✓" in md and "+0.200 [" in md
    assert "Inception" not in table([{**other, "metrics": {**other["metrics"], "fid_inception": None}}], "dng")


@pytest.mark.parametrize("args,match", [
    (["methods=[foo]"], "'foo'"), (["targets=[1.5]"], "1.5"), (["methods=[none]"], "no guidance_scale"),
    (["scale_min=0"], "scale_min"), (["methods=[]"], "at least one"), (["scale_start=-1"], "scale_start=-1"),
    (["scale_start=foo"], "scale_start='foo'"),
])
def test_compare_bad_input(tmp_path, capsys, args, match):
    with pytest.raises(SystemExit) as exc:
        cli.main(["compare", *TINY, *args, f"hydra.run.dir={tmp_path / 'run'}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err
    assert not (tmp_path / "run").exists()


def test_unreachable_target_is_a_row_not_a_crash(compose, tmp_path):
    from dng_cli.commands import compare

    cfg = compose("compare", TINY + ["methods=[np]", "targets=[0.01]", "forbidden=[8]", "n_samples=4", "pilot_n=4",
                                     "scale_max=10"])
    summary = compare.run(cfg, tmp_path / "cmp")
    assert summary["rows"][0]["scale_star"] is None
    assert "not reached" in (tmp_path / "cmp" / "compare.md").read_text()
    with pytest.raises(UserError):
        compare.check_cfg(compose("compare", TINY + ["methods=[foo]"]))
