"""KID (Bińkowski et al. 2018) beside Inception FID: the unbiased estimator against torchmetrics', the per-class
reference terms against a direct computation, an honest bootstrap s.e., and `dng evaluate` reporting it."""

import json

import numpy as np
import pytest
import torch

from dng_cli import metrics


def _reference(y, labels, k):
    return {**metrics.kid_reference_terms(y, labels, k), "features": y.float().numpy(), "labels": labels.numpy()}


def test_kid_equals_torchmetrics_and_the_excluded_classes_are_exact():
    from torchmetrics.image.kid import poly_mmd

    g = torch.Generator().manual_seed(0)
    y = torch.randn(90, 8, generator=g, dtype=torch.float64)
    y = y.float().double()  # the cache stores float32 features
    labels = torch.arange(90) % 3
    x = torch.randn(60, 8, generator=g, dtype=torch.float64) + 0.3
    ref = metrics.KidReference(_reference(y, labels, 3), exclude=[0])
    kept = y[labels != 0]
    assert metrics.kid(x, ref) == pytest.approx(float(poly_mmd(kept, x)), rel=1e-9, abs=1e-12)  # equal sizes: 60, 60
    # unequal sizes: the unbiased formula written out
    xs = x[:25]
    k = metrics.poly_kernel
    n, m = len(xs), len(kept)
    direct = ((k(xs, xs).sum() - k(xs, xs).diagonal().sum()) / (n * (n - 1))
              + (k(kept, kept).sum() - k(kept, kept).diagonal().sum()) / (m * (m - 1)) - 2 * k(xs, kept).mean())
    assert metrics.kid(xs, ref) == pytest.approx(float(direct), rel=1e-9, abs=1e-12)
    assert metrics.kid(kept[:30], ref) < metrics.kid(x[:30], ref)  # samples of the reference itself score lower


def test_kid_se_matches_the_spread_over_repeated_draws():
    g = torch.Generator().manual_seed(1)
    y = torch.randn(2000, 16, generator=g, dtype=torch.float64)
    ref = metrics.KidReference(_reference(y, torch.arange(2000) % 2, 2))
    draws = [torch.randn(200, 16, generator=g, dtype=torch.float64) * 1.1 + 0.1 for _ in range(100)]
    spread = np.std([metrics.kid(x, ref) for x in draws], ddof=1)
    se = np.mean([metrics.kid_se(x, ref, seed=i) for i, x in enumerate(draws[:30])])
    assert 0.9 < se / spread < 1.45, se / spread  # a sqrt(2) error either way falls outside (measured 1.18)


def test_evaluate_reports_kid_beside_inception_fid(compose, tiny_mnist, tmp_path, monkeypatch):
    from dng_cli.commands import evaluate
    from test_metrics import standin_inception

    cfg = compose("evaluate", standin_inception(tmp_path, monkeypatch, tiny_mnist) + ["n_samples=6", "method=np"])
    m = evaluate.run(cfg, tmp_path / "run")
    (kid_file,) = (tmp_path / "fid").glob("mnist-test-inception-ts-*-kid.npz")
    ref = metrics.load_kid_reference(kid_file)
    with np.load(tmp_path / "run" / "records.npz") as f:
        feats = torch.from_numpy(f["inception"])
    kept = torch.from_numpy(ref["features"][ref["labels"] != 0]).double()
    from torchmetrics.image.kid import poly_kernel

    x = feats.double()
    n, k = len(x), len(kept)
    direct = ((poly_kernel(x, x).sum() - poly_kernel(x, x).diagonal().sum()) / (n * (n - 1))
              + (poly_kernel(kept, kept).sum() - poly_kernel(kept, kept).diagonal().sum()) / (k * (k - 1))
              - 2 * poly_kernel(x, kept).mean())
    assert m["kid_inception"] == pytest.approx(float(direct), rel=1e-6) and m["kid_inception_se"] > 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["kid_inception"] == m["kid_inception"]
    # a cache made before KID existed (stats only) is completed, not trusted as it is
    kid_file.unlink()
    again = evaluate.run(cfg, tmp_path / "run2")
    assert kid_file.is_file() and again["kid_inception"] == pytest.approx(m["kid_inception"], rel=1e-9)


def test_compare_bootstraps_kid_from_the_saved_inception_features(compose, tiny_mnist, tmp_path, monkeypatch):
    from dng_cli import matching
    from dng_cli.commands import compare
    from test_metrics import standin_inception

    cfg = compose("compare", standin_inception(tmp_path, monkeypatch, tiny_mnist) + ["methods=[np]"])
    fns = compare.metric_functions(compare.scoring_spec(cfg), ["kid_inception"], [0])
    feats = torch.randn(12, 2048, generator=torch.Generator().manual_seed(0)).abs()
    point = matching.Point(1.0, np.zeros(12, bool), {"inception": feats.numpy()})
    ref = metrics.KidReference(metrics.load_kid_reference(next((tmp_path / "fid").glob("*-kid.npz"))), [0])
    assert fns["kid_inception"](point, np.arange(12)) == pytest.approx(metrics.kid(feats, ref), rel=1e-9)
    idx = np.array([0, 0, 1, 2, 3, 3, 3, 4, 5, 6, 7, 8])  # a resample: pairs of a sample with itself are left out
    w = torch.from_numpy(np.bincount(idx, minlength=12))
    assert fns["kid_inception"](point, idx) == pytest.approx(metrics.kid_from_parts(*ref.parts(feats), ref.yy, w))
    assert fns["kid_inception"](point, idx) != pytest.approx(metrics.kid(feats, ref))


def test_report_shows_kid_when_a_run_has_it(tmp_path, capsys):
    import csv

    from dng_cli import cli
    from test_report import _metrics

    m = {**_metrics("dng", 5.0, 0.01, 0.05, 1.5), "fid_inception": 20.5, "fid_inception_se": 1.3,
         "fid_inception_full": 25.0, "kid_inception": 0.01234, "kid_inception_se": 0.0021}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text(json.dumps(m))
    cli.main(["report", str(tmp_path)])
    assert "| 20.5 ± 1.3 | 25 | 12.34 ± 2.10 ×10⁻³ | 3.5 |" in (tmp_path / "report.md").read_text()
    assert float(next(csv.DictReader((tmp_path / "report.csv").open()))["kid_inception"]) == 0.01234
