"""An analytic Gaussian mixture: closed-form ε_u and ε_c for every timestep (each component a class)."""

from __future__ import annotations

import torch

from dng_cli.schedule import NoiseSchedule


class GaussianMixtureEps:
    """Data x0 ~ Σ_k w_k N(μ_k, s² I). Then x_t | k ~ N(√ᾱ μ_k, v I) with v = ᾱ s² + 1 - ᾱ and
    ε(x_t) = -√(1-ᾱ) ∇ log p_t(x_t) = √(1-ᾱ) Σ_k r_k(x_t) (x_t - √ᾱ μ_k) / v."""

    def __init__(self, means, weights, std: float, forbidden=(0,), schedule: NoiseSchedule | None = None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.std = std
        self.forbidden = list(forbidden)
        self.abar = (schedule or NoiseSchedule.linear()).alphas_cumprod

    def eps(self, x: torch.Tensor, t: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        xd = x.double()
        a = self.abar[t].view(-1, 1)
        v = a * self.std**2 + 1 - a
        centers = a.sqrt().unsqueeze(1) * self.means.unsqueeze(0)  # [B, K, d]
        diff = xd.unsqueeze(1) - centers
        logits = weights.log().unsqueeze(0) - (diff**2).sum(-1) / (2 * v)
        r = logits.softmax(-1)
        return ((1 - a).sqrt() * (r.unsqueeze(-1) * diff).sum(1) / v).to(x.dtype)

    def __call__(self, x: torch.Tensor, t: torch.Tensor):
        eps_u = self.eps(x, t, self.weights)
        eps_c = torch.stack([self.eps(x, t, torch.eye(len(self.weights), dtype=torch.float64)[c].clamp_min(1e-300))
                             for c in self.forbidden])
        return eps_u, eps_c

    def component(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cdist(x.double(), self.means).argmin(1)

    def distance(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cdist(x.double(), self.means).min(1).values
