"""``dng data <dataset>``: fetch a dataset into ``dataset.root`` (torchvision layout, offline fallbacks)."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from dng_cli.commands.common import entry
from dng_cli.data import prepare

log = logging.getLogger(__name__)


def run(cfg: DictConfig, output_dir: Path) -> Path:
    root = prepare(cfg.dataset.name, cfg.dataset.root, download=bool(cfg.download))
    log.info("%s ready under %s", cfg.dataset.name, root)
    return root


main = entry("data", run, cleanup=False, lock=False)
