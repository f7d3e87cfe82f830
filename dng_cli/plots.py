"""Figures: sample grids, the guidance-scale / posterior trajectory (the paper's Figure 2 view),
class histograms and Pareto fronts. Headless (Agg); each writes one PNG atomically."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from dng_cli.io import atomic_save  # noqa: E402


def save_grid(images_uint8: torch.Tensor, path: Path, nrow: int | None = None) -> None:
    """uint8 [N, C, H, W] -> one PNG grid."""
    from PIL import Image
    from torchvision.utils import make_grid

    n = images_uint8.shape[0]
    grid = make_grid(images_uint8, nrow=nrow or max(1, int(math.ceil(math.sqrt(n)))), padding=2, pad_value=255)
    array = grid.permute(1, 2, 0).numpy()
    img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    atomic_save(path, lambda tmp: img.save(tmp, format="PNG"))


def _save_fig(fig, path: Path) -> None:
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)


def guidance_plot(timesteps: torch.Tensor, scale: torch.Tensor, posterior: torch.Tensor, path: Path,
                  title: str = "", n_individual: int = 6, is_forbidden: torch.Tensor | None = None,
                  labels: list[str] | None = None) -> None:
    """λ_t and p(c | x_t…x_T) along the reverse process: the mean and a few individual samples.

    With ``is_forbidden`` (the classifier's verdict on each final image) the curves are coloured by
    it (red: classified forbidden, blue: kept), each group with its own mean: how early and how
    clearly the posterior singles out the samples that end up forbidden. With ``labels`` (one per
    sample, e.g. ``dng sd``'s few images) every sample is its own labelled curve."""
    t = timesteps.numpy()
    post = posterior.sum(-1) if posterior.dim() == 3 else posterior
    if labels is not None:
        groups = [(name, f"C{j % 10}", np.asarray([j]), None) for j, name in enumerate(labels)]
    elif is_forbidden is None:
        groups = [("mean", "k", np.arange(post.shape[1]), None)]
    else:
        flags = np.asarray(is_forbidden, dtype=bool)
        groups = [(f"classified forbidden (n={int(flags.sum())})", "tab:red", np.flatnonzero(flags), "tab:red"),
                  (f"kept (n={int((~flags).sum())})", "tab:blue", np.flatnonzero(~flags), "tab:blue")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, values, label in ((axes[0], scale, "effective guidance scale $\\lambda_t$"),
                              (axes[1], post, "posterior $p(c\\,|\\,x_t,\\dots,x_T)$")):
        v = values.numpy()
        for name, color, idx, line_color in groups:
            if len(idx) == 0:
                continue
            for j in idx[:n_individual] if len(idx) > 1 else []:
                ax.plot(t, v[:, j], lw=0.8, alpha=0.5, color=line_color)
            ax.plot(t, v[:, idx].mean(1), color=color, lw=2, label=name)
        ax.set_xlabel("timestep t")
        ax.set_ylabel(label)
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    if title:
        fig.suptitle(title)
    _save_fig(fig, path)


def histogram_plot(histogram: Sequence[float], forbidden: Sequence[int], path: Path, title: str = "",
                   class_names: Sequence[str] | None = None) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    colors = ["tab:red" if c in forbidden else "tab:blue" for c in range(len(histogram))]
    ax.bar(range(len(histogram)), histogram, color=colors)
    kept = len(histogram) - len(forbidden)
    if kept > 0:
        ax.axhline(1.0 / kept, color="k", ls="--", lw=1, label="uniform over kept classes")
        ax.legend()
    if class_names is not None and len(class_names) == len(histogram):
        ax.set_xticks(range(len(histogram)), [str(n) for n in class_names], rotation=45 if max(map(len, map(str, class_names))) > 2 else 0,
                      ha="right" if max(map(len, map(str, class_names))) > 2 else "center")
    else:
        ax.set_xticks(range(len(histogram)))
    ax.set_xlabel("predicted class (red: forbidden)")
    ax.set_ylabel("fraction of samples")
    ax.set_title(title)
    _save_fig(fig, path)


def pareto_plot(rows: list[dict], y_key: str, y_label: str, path: Path) -> None:
    """Forbidden % on x (with CI bars), ``y_key`` on y (± its ``<y_key>_se`` where every row has one),
    one curve per method ordered by scale."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for method in sorted({r["label"] for r in rows}):
        pts = sorted((r for r in rows if r["label"] == method and r.get(y_key) is not None),
                     key=lambda r: (r.get("guidance_scale") or 0.0))
        if not pts:
            continue
        x = np.array([100 * r["forbidden_rate"] for r in pts])
        lo = np.array([100 * r["forbidden_rate_ci"][0] for r in pts])
        hi = np.array([100 * r["forbidden_rate_ci"][1] for r in pts])
        y = np.array([r[y_key] for r in pts], dtype=float)
        se = [r.get(f"{y_key}_se") for r in pts]  # KL has a bootstrap s.e.; FID and older runs none
        yerr = np.array(se, dtype=float) if all(v is not None for v in se) else None
        ax.errorbar(x, y, xerr=[x - lo, hi - x], yerr=yerr, marker="o", capsize=3, label=method)
    ax.set_xlabel("forbidden class generated (%)")
    ax.set_ylabel(y_label)
    ax.grid(alpha=0.3)
    ax.legend()
    _save_fig(fig, path)


QUANTILES = (0.05, 0.5, 0.95)


def trajectory_csv(timesteps: torch.Tensor, posterior: torch.Tensor, scale: torch.Tensor) -> str:
    """One row per step: mean and 5/50/95% quantiles over samples of Σ_c p_c and of λ_t."""
    post = posterior.sum(-1) if posterior.dim() == 3 else posterior
    q = torch.tensor(QUANTILES, dtype=torch.float64)
    buf = io.StringIO()
    w = csv.writer(buf)
    names = [f"q{int(100 * x):02d}" for x in QUANTILES]
    w.writerow(["step", "timestep", "posterior_mean", *[f"posterior_{n}" for n in names],
                "scale_mean", *[f"scale_{n}" for n in names]])
    pq = torch.quantile(post.double(), q, dim=1).t()
    sq = torch.quantile(scale.double(), q, dim=1).t()
    for i in range(len(timesteps)):
        w.writerow([i, int(timesteps[i]), f"{post[i].double().mean():.6g}", *[f"{v:.6g}" for v in pq[i].tolist()],
                    f"{scale[i].double().mean():.6g}", *[f"{v:.6g}" for v in sq[i].tolist()]])
    return buf.getvalue()
