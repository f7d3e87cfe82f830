import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def gmm():
    from gmm import GaussianMixtureEps

    # forbidden component 0 sits symmetrically between the two kept ones (weights 0.42 : 0.28)
    return GaussianMixtureEps([[0.0, 1.5], [-2.0, -1.0], [2.0, -1.0]], [0.3, 0.42, 0.28], 0.25)


def compose_cfg(config_name: str, overrides: list[str]):
    from dng_cli.validate import compose

    return compose(config_name, overrides)


@pytest.fixture
def compose():
    return compose_cfg
