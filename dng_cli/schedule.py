"""DDPM noise schedules and exact respacing (Ho et al. 2020; Nichol & Dhariwal 2021, Sec. 4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dng_cli import UserError

VARIANCES = ("large", "small")


@dataclass(frozen=True)
class NoiseSchedule:
    """A DDPM chain: per step its original timestep, β and ᾱ (float64, ascending in time).

    ``timesteps[k]`` is the original timestep τ_k whose ᾱ is kept; ``betas[k]`` is the β of the
    chain itself, so a respaced schedule is an exact DDPM chain of its own:
    β'_k = 1 - ᾱ_{τ_k} / ᾱ_{τ_{k-1}}, with ᾱ_{τ_0} := 1.
    """

    timesteps: torch.Tensor  # LongTensor[K], original timesteps
    betas: torch.Tensor  # float64[K]
    alphas_cumprod: torch.Tensor  # float64[K]
    num_train_timesteps: int
    original_betas: torch.Tensor | None = None  # float64[T] of the chain this one was respaced from (None: itself)

    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "NoiseSchedule":
        """The linear β schedule of Ho et al. (2020): β_t from beta_start to beta_end over T steps."""
        if T < 1:
            raise UserError(f"num_train_timesteps={T} is invalid: it must be a positive integer")
        if not (0.0 < beta_start <= beta_end < 1.0):
            raise UserError(f"beta_start={beta_start}, beta_end={beta_end} are invalid: need 0 < beta_start <= beta_end < 1")
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        return cls(torch.arange(T), betas, torch.cumprod(1.0 - betas, 0), T)

    @classmethod
    def from_betas(cls, betas) -> "NoiseSchedule":
        """Any β sequence, e.g. Stable Diffusion's "scaled_linear" (√β linear from √0.00085 to √0.012)."""
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.dim() != 1 or not bool(((betas > 0) & (betas < 1)).all()):
            raise UserError("betas must be a 1-d sequence in (0, 1)")
        return cls(torch.arange(len(betas)), betas, torch.cumprod(1.0 - betas, 0), len(betas))

    @classmethod
    def from_scheduler(cls, config) -> "NoiseSchedule":
        """The β chain of a diffusers scheduler (an object with ``.config``, or its config dict / the
        ``scheduler_config.json`` it saves): ``trained_betas``, or ``beta_schedule`` linear, scaled_linear
        or squaredcos_cap_v2 over ``num_train_timesteps``, with diffusers' own defaults for missing keys."""
        config = dict(getattr(config, "config", config))
        T = int(config.get("num_train_timesteps", 1000))
        start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
        if config.get("trained_betas") is not None:
            return cls.from_betas(config["trained_betas"])
        kind = config.get("beta_schedule", "linear")
        if kind == "linear":
            return cls.linear(T, start, end)
        if kind == "scaled_linear":
            return cls.from_betas(torch.linspace(start**0.5, end**0.5, T, dtype=torch.float64) ** 2)
        if kind == "squaredcos_cap_v2":  # Nichol & Dhariwal (2021), as diffusers' betas_for_alpha_bar
            def abar(t):
                return torch.cos(torch.as_tensor((t + 0.008) / 1.008 * torch.pi / 2, dtype=torch.float64)) ** 2
            return cls.from_betas([min(1 - float(abar((i + 1) / T) / abar(i / T)), 0.999) for i in range(T)])
        raise UserError(f"scheduler beta_schedule={kind!r} is not supported: allowed are linear, scaled_linear, "
                        f"squaredcos_cap_v2 (or trained_betas)")

    @classmethod
    def shared(cls, configs: "dict[str, dict | None]") -> "tuple[dict, NoiseSchedule]":
        """The one chain several model folders were trained with ({config key: its scheduler_config.json, None
        when unreadable}): each must be a valid scheduler config and, for a pair, all must give the same β.
        Returns the first config and its chain; every fault is one ``UserError`` naming the config key."""
        chains = {}
        for key, conf in configs.items():
            if not isinstance(conf, dict):
                raise UserError(f"{key}: its scheduler_config.json is not a JSON object")
            try:
                chains[key] = cls.from_scheduler(conf)
            except UserError as err:
                raise UserError(f"{key}: {err}") from None
            except (TypeError, ValueError) as err:
                raise UserError(f"{key}: its scheduler_config.json is invalid ({type(err).__name__}: {err})") from None
        (first_key, first), *_ = chains.items()
        for key, chain in chains.items():
            if len(chain) != len(first) or not torch.allclose(chain.betas, first.betas):
                raise UserError(f"{key} was trained with another noise schedule than {first_key} "
                                f"(their scheduler_config.json differ): a pair must share one")
        return configs[first_key], first

    def scheduler_config(self, **extra) -> dict:
        """This chain as a diffusers ``DDPMScheduler`` config (what a model folder's scheduler_config.json holds):
        linear when it is one, else ``trained_betas``. ``extra``: e.g. ``prediction_type``."""
        orig = self.original()
        T, b = len(orig), orig.betas
        config = {"_class_name": "DDPMScheduler", "num_train_timesteps": T, "beta_schedule": "linear",
                  "beta_start": float(b[0]), "beta_end": float(b[-1]), "trained_betas": None,
                  "variance_type": "fixed_small", "clip_sample": False, "prediction_type": "epsilon",
                  "timestep_spacing": "linspace"}
        if not torch.allclose(b, torch.linspace(float(b[0]), float(b[-1]), T, dtype=torch.float64), rtol=0, atol=1e-12):
            config.update(beta_schedule="linear", trained_betas=b.tolist())
        return {**config, **extra}

    def __len__(self) -> int:
        return int(self.timesteps.numel())

    def respace(self, steps: int) -> "NoiseSchedule":
        """Keep ᾱ at ``steps`` evenly spaced timesteps (first and last included) and rebuild β'."""
        T = len(self)
        if not isinstance(steps, int) or isinstance(steps, bool) or not (1 <= steps <= T):
            raise UserError(f"steps={steps} is invalid: it must be an integer in [1, {T}]")
        idx = torch.linspace(0, T - 1, steps, dtype=torch.float64).round().long()
        if steps == 1:
            idx = torch.tensor([T - 1])
        return self.keep(idx)

    def keep(self, idx) -> "NoiseSchedule":
        """The chain that keeps ᾱ at the increasing positions ``idx`` of this one (β' rebuilt): ``respace``'s, or a
        scheduler's own timesteps (``dng_cli.guiders``)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        abar = self.alphas_cumprod[idx]
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        return NoiseSchedule(self.timesteps[idx], 1.0 - abar / abar_prev, abar, self.num_train_timesteps,
                             self.original().betas)

    def original(self) -> "NoiseSchedule":
        """The full chain this schedule was respaced from (itself when it was not respaced)."""
        if self.original_betas is None:
            return self
        betas = self.original_betas
        return NoiseSchedule(torch.arange(len(betas)), betas, torch.cumprod(1.0 - betas, 0), len(betas))

    def timestep_spans(self) -> list[tuple[int, int]]:
        """Step k covers the original timesteps (τ_{k-1}, τ_k]; step 0 covers [0, τ_0] (τ_{-1} := -1)."""
        t = [-1, *self.timesteps.tolist()]
        return [(t[k], t[k + 1]) for k in range(len(self))]

    def span_precision(self, kind: str = "large") -> torch.Tensor:
        """Σ_{s ∈ (τ_{k-1}, τ_k]} 1/σ_s² per step k, σ_s² of the ORIGINAL chain (``kind`` as in ``variances``).

        What a per-original-timestep rate sums to over one respaced step: DNG's ``offset`` adds
        offset/(2σ_s²) for every original timestep s, so its total drift does not depend on the
        number of steps. Equals 1/σ_k² when the schedule is not respaced. Step 0 ends the chain
        without noise (no posterior update), and its entry is 0."""
        orig = self.original()
        var = orig.variances(kind)
        precision = torch.zeros_like(var)
        precision[1:] = 1.0 / var[1:]  # σ_0² = β̃_0 = 0: timestep 0 is never inside a noisy step's span
        cum = torch.cat([precision.new_zeros(1), precision.cumsum(0)])  # cum[j] = Σ_{s<j}
        out = torch.tensor([cum[hi + 1] - cum[lo + 1] for lo, hi in self.timestep_spans()], dtype=torch.float64)
        out[0] = 0.0
        return out

    @property
    def alphas_cumprod_prev(self) -> torch.Tensor:
        return torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod[:-1]])

    def variances(self, kind: str = "large") -> torch.Tensor:
        """Reverse-kernel variance σ_k²: "large" = β'_k, "small" = β̃_k = β'_k (1-ᾱ_{k-1}) / (1-ᾱ_k)."""
        if kind == "large":
            return self.betas.clone()
        if kind == "small":
            return self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        raise UserError(f"variance={kind!r} is invalid: allowed are {', '.join(VARIANCES)}")

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Forward process q(x_t | x_0) at original timesteps t (used in training)."""
        abar = self.alphas_cumprod.to(x0.device)[t].to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise UserError(f"scheduler prediction_type={prediction_type!r} is not supported: allowed are "
                        f"{', '.join(PREDICTION_TYPES)}")
