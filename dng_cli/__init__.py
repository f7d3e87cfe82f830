"""dng: Dynamic Negative Guidance of diffusion models — sample, evaluate and sweep class removal.

Reproduces Koulischer et al., *Dynamic Negative Guidance of Diffusion Models*, ICLR 2025
(arXiv 2410.14398), next to Negative Prompting and Safe Latent Diffusion.
"""

__version__ = "0.1.0"


class UserError(ValueError):
    """A bad value given by the user. The CLI prints its message as one line and exits non-zero."""


def one_line(err: BaseException) -> str:
    """An exception as one line: its message's first line (OSErrors: what failed on which path)."""
    if isinstance(err, OSError) and not isinstance(err, UserError):
        where = f" {str(err.filename)!r}" if err.filename else ""
        return f"cannot write or read{where}: {err.strerror or type(err).__name__}"
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class RunRefused(UserError):
    """A run that may not write into its folder (another config's results, another live process)."""


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("dng.pick"):
        # ${dng.pick:${grids},${method.name},${grid_index}} -> grids[method.name][grid_index]
        OmegaConf.register_new_resolver("dng.pick", lambda table, key, index: table[key][int(index)])
    if not OmegaConf.has_resolver("dng.process"):
        # this process, as <host>-<pid>: Hydra's pending config folder is this process's own
        OmegaConf.register_new_resolver("dng.process", _process_name, use_cache=True)
    if not OmegaConf.has_resolver("dng.dirname"):
        OmegaConf.register_new_resolver("dng.dirname", short_dirname)


def _process_name() -> str:
    import os
    import socket

    return f"{socket.gethostname()}-{os.getpid()}"


MAX_DIRNAME_BYTES = 200


def short_dirname(name: str, limit: int = MAX_DIRNAME_BYTES) -> str:
    """A sweep job's folder name: Hydra's ``override_dirname`` when it fits a file name (255 bytes on
    most file systems), else a readable prefix + "_" + a hash of the whole name: deterministic, so a
    re-run of the sweep finds the same folder."""
    import hashlib

    name = str(name)
    raw = name.encode()
    if len(raw) <= limit:
        return name
    digest = hashlib.sha256(raw).hexdigest()[:12]
    prefix = raw[:limit - 13].decode("utf-8", errors="ignore").replace("/", "_")
    return f"{prefix}_{digest}"


_register_resolvers()
