"""dng: Dynamic Negative Guidance of diffusion models — sample, evaluate and sweep class removal.

Reproduces Koulischer et al., *Dynamic Negative Guidance of Diffusion Models*, ICLR 2025
(arXiv 2410.14398), next to Negative Prompting and Safe Latent Diffusion.
"""

__version__ = "0.1.0"


class UserError(ValueError):
    """A bad value given by the user. The CLI prints its message as one line and exits non-zero."""


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("dng.pick"):
        # ${dng.pick:${grids},${method.name},${grid_index}} -> grids[method.name][grid_index]
        OmegaConf.register_new_resolver("dng.pick", lambda table, key, index: table[key][int(index)])


_register_resolvers()
