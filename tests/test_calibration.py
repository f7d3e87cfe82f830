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
    assert summary["reached"] and summary["rate_at_star"] <= 0.01 and "rate_at_star_ci" not in summary


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
    args = ["compare", *TINY, "methods=[np,dng_official_cli,dng]", "targets=[0.5]", "n_samples=6", "pilot_n=4",
            "bootstrap=20", f"hydra.run.dir={out}"]
    cli.main(args)
    summary = json.loads((out / "compare.json").read_text())
    assert summary["reference"] == "dng" and summary["n_seeds"] == 6 and summary["compared"] == ["kl_kept", "fid"]
    assert summary["primary"] == "kl_kept" and summary["estimand"] == "band-averaged matched quality"
    assert [m["method"] for m in summary["methods"]] == ["np", "dng_official_cli", "dng"]
    for m in summary["methods"]:  # the tiny model calls everything an 8: the rate is 0 everywhere, nothing crosses 50 %
        assert not m["identified"] and m["clamped"] == 1.0 and m["scale_star"] == pytest.approx(m["grid"][0]) == 0.01
    assert len(summary["claims"]) == 2 * 2 and {c["family"] for c in summary["claims"]} == {"primary", "secondary"}
    assert all(c["estimand"] == "band-averaged" and c["mde"] is not None for c in summary["claims"])
    folders = sorted(p.parent for p in (out / "eval").glob("*/scale=*/metrics.json"))
    assert {json.loads((f / "metrics.json").read_text())["label"] for f in folders} == {"np", "dng_official_cli", "dng"}
    assert all((f / "records.npz").is_file() for f in folders)
    header = (out / "compare.csv").read_text().splitlines()[0].split(",")
    for column in ("table", "target", "method", "scale_star", "eval_rate", "clamped", "identified", "kl_kept",
                   "kl_kept_se", "kl_kept_at_target", "fid_se", "metric", "family", "diff", "lo", "hi", "p", "p_adj",
                   "resolved", "mde", "matched_diff"):
        assert column in header, column
    md = (out / "compare.md").read_text()
    assert "| 50 % | np |" in md and "np − dng" in md and "max-T" in md and "inconclusive at N = 6 (MDE" in md
    assert "identical on these seeds" in md  # KL kept: every method puts all 6 samples in one class
    assert "**Class histogram**" in md and "| np λ=0.01 | 6 |" in md  # where the removed mass went
    assert (out / "compare.png").is_file()
    log = (out / "compare.log").read_text()  # the plan before the first sample, progress against it
    assert "plan: 3 method(s) × 1 target(s) at N = 6" in log and "network evals/s measured here" in log
    assert log.index("plan:") < log.index("probe ") and "compare progress: " in log
    assert "images/s its points recorded" in log and "ETA ≈ " in log  # the time left, from the points' own speed
    # a second run reuses every probe and evaluation (fingerprints match)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("metrics.json")}
    cli.main(args)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("metrics.json")} == stamps


def test_compare_shares_one_pilot_set_per_method_across_targets(tmp_path, capsys):
    out = tmp_path / "cmp"
    cli.main(["compare", *TINY, "methods=[np]", "targets=[0.5,0.3]", "n_samples=4", "pilot_n=4",
              "scale_min=0.01", "scale_max=1", f"hydra.run.dir={out}"])
    listed = [json.loads((out / "calibrate" / f"np-{t}" / "calibration.json").read_text())["probes"] for t in ("0.5", "0.3")]
    run = {p.parent.name for p in (out / "calibrate" / "np" / "probes").glob("scale=*/metrics.json")}
    assert run == {f"scale={p['scale']:g}" for probes in listed for p in probes}
    assert len(run) < sum(len(probes) for probes in listed)  # the second target reused the first one's probes


def test_compare_logs_each_probe_under_the_compared_methods_name(tmp_path, capsys):
    """A variant that inherits another method's guidance (dng_hold is dng with a hold) is named as compared, so
    its probes are not logged as the other method's."""
    out = tmp_path / "cmp"
    cli.main(["compare", *TINY, "methods=[dng_hold]", "targets=[0.5]", "n_samples=4", "pilot_n=4", "bootstrap=10",
              f"hydra.run.dir={out}"])
    log = (out / "compare.log").read_text()
    assert "probe dng_hold scale" in log and "probe dng scale" not in log


def test_compare_method_overrides_reach_every_result_and_the_table(tmp_path, capsys):
    """``method_overrides`` (a setting chosen on the pilot set, e.g. CCFG's τ) is in every probe's and grid point's
    config (and in no other method's: np's results do not depend on it), in compare.json and the table; the same
    folder with another value reuses np's results and refuses CCFG's, never reusing them."""
    out = tmp_path / "cmp"
    args = ["compare", *TINY, "methods=[np,ccfg]", "targets=[0.5]", "n_samples=4", "pilot_n=4", "bootstrap=10",
            f"hydra.run.dir={out}"]
    cli.main([*args, "method_overrides={ccfg:{tau:0.05}}"])
    results = [json.loads(p.read_text()) for p in (out / "eval" / "ccfg").rglob("metrics.json")]
    results += [json.loads(p.read_text()) for p in (out / "calibrate" / "ccfg").rglob("metrics.json")]
    assert len(results) >= 2 and {r["config"]["method"]["tau"] for r in results} == {0.05}
    assert not any("method_overrides" in json.loads(p.read_text())["config"] for p in out.rglob("metrics.json"))
    assert json.loads((out / "compare.json").read_text())["method_overrides"] == {"ccfg": {"tau": 0.05}}
    assert "settings beyond the method configs: ccfg: tau 0.05" in (out / "compare.md").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main([*args, "method_overrides={ccfg:{tau:0.1}}"])
    assert "holds a finished run of another config (method.tau=0.05 there, 0.1 here)" in capsys.readouterr().err


def test_compare_table_carries_every_compared_metric_its_estimand_and_verdict():
    from dng_cli.commands.compare import markdown

    def method(name, inc):
        return {"target": 0.01, "method": name, "grid": [1.0, 2.0], "grid_rates": [0.02, 0.005], "identified": True,
                "identified_fraction": 1.0, "reached": True, "scale_star": 1.5, "scale_star_clamped": False,
                "scale_star_ci": [1.2, 1.8], "eval_rate": 0.012, "band": [0.005, 0.02], "band_scales": [1.0, 2.0],
                "clamped": 0.03, "metrics": {"kl_kept": {"value": 0.05, "se": 0.01}, "fid_inception": {"value": inc, "se": 1.0}},
                "matched": {"kl_kept": {"value": 0.04}, "fid_inception": {"value": inc - 1}}}

    claims = [{"target": 0.01, "method": "np", "reference": "dng", "metric": "kl_kept", "family": "primary",
               "estimand": "band-averaged", "diff": 0.0, "se": 0.02, "lo": -0.04, "hi": 0.04, "p": 0.9, "p_adj": 0.9,
               "resolved": False, "mde": 0.056, "matched_diff": 0.001, "replicates": 1000, "family_size": 1},
              {"target": 0.01, "method": "np", "reference": "dng", "metric": "fid_inception", "family": "secondary",
               "estimand": "band-averaged", "diff": 10.0, "se": 1.4, "lo": 7.2, "hi": 12.8, "p": 0.001, "p_adj": 0.001,
               "resolved": True, "mde": 3.9, "matched_diff": 10.0, "replicates": 1000, "family_size": 1}]
    analysis = {"n_seeds": 1000, "n_boot": 1000, "reference": "dng", "methods": [method("np", 30.0), method("dng", 20.0)],
                "claims": claims, "n_claims": 1, "primary": "kl_kept", "band_factor": 2.0}
    md = markdown(analysis, ["kl_kept", "fid_inception"], [])
    assert "Inception FID (band) ± s.e." in md and "band-averaged matched quality" in md
    assert "| 1 % | np | 1.5 [1.2, 1.8] | 1.20 % | 1–2 | 3 % | 1 2 | 0.050 ± 0.010 | 30.00 ± 1.00 | 0.040 | 29.00 |" in md
    assert "| 1 % | np − dng | Inception FID | secondary | +10.00 [+7.20, +12.80] | 0.001 | 0.001 | ✓ resolved | +10.00 |" in md
    assert "| 1 % | np − dng | KL kept | primary | +0.000 [-0.040, +0.040] | 0.900 | 0.900 | inconclusive at N = 1000 (MDE 0.056) |" in md


def test_compare_grid_existing_reanalyses_without_sampling(tmp_path, capsys):
    """``grid=existing`` reads every finished grid point back (nothing sampled, no file added but the tables) and
    gives the same table as the run that sampled them; without finished probes it is one line."""
    out = tmp_path / "cmp"
    args = ["compare", *TINY, "methods=[np,dng]", "targets=[0.5]", "n_samples=4", "pilot_n=4", "bootstrap=10",
            f"hydra.run.dir={out}"]
    cli.main(args)
    first = json.loads((out / "compare.json").read_text())
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("metrics.json")}
    cli.main([*args, "grid=existing"])
    again = json.loads((out / "compare.json").read_text())
    assert {p: p.stat().st_mtime_ns for p in out.rglob("metrics.json")} == stamps
    assert again["methods"] == first["methods"] and again["claims"] == first["claims"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli.main([*args[:-1], "grid=existing", f"hydra.run.dir={tmp_path / 'empty'}"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code != 0 and len(err.splitlines()) == 1 and "grid=existing" in err, err


@pytest.mark.parametrize("args,match", [
    (["methods=[foo]"], "'foo'"), (["targets=[1.5]"], "1.5"), (["methods=[none]"], "no guidance_scale"),
    (["scale_min=0"], "scale_min"), (["methods=[]"], "at least one"), (["scale_start=-1"], "scale_start=-1"),
    (["scale_start=foo"], "scale_start='foo'"), (["method_overrides={ccfg:{tau:1}}"], "'ccfg', which is not compared"),
    (["method_overrides={np:{taux:1}}"], "method_overrides.np.taux is not a setting"),
    (["method_overrides=3"], "method_overrides=3"), (["methods=[ccfg]", "method_overrides={ccfg:{tau:-1}}"], "tau=-1.0"),
    (["grid=foo"], "grid='foo' is invalid"), (["primary=fid_inception"], "primary='fid_inception'"),
    (["grid_rates=[0,1]"], "grid_rates"), (["grid_max_ratio=1"], "grid_max_ratio"),
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
                                     "scale_max=10", "bootstrap=10"])
    summary = compare.run(cfg, tmp_path / "cmp")
    assert summary["not_reached"][0]["method"] == "np" and summary["methods"] == []
    assert "not reached" in (tmp_path / "cmp" / "compare.md").read_text()
    with pytest.raises(UserError):
        compare.check_cfg(compose("compare", TINY + ["methods=[foo]"]))
