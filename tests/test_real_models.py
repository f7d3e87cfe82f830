"""The shipped models end to end at small sizes — where a broken adapter or method would show.

Every other end-to-end test runs on ``tiny_random``, whose classifier calls every image an 8, so its forbidden
rate is always 0. Here the shipped MNIST (forbid 0) and Fashion-MNIST (forbid Shirt) DDPMs and classifiers draw
96 samples in 10 steps: unguided, the forbidden class shows up near its share of the data; every method removes
it below that on the same seeds; and guidance with its two branches swapped (attraction instead of removal)
raises it above — the check that the null label and the branch order are right."""

import pytest

from dng_cli.commands import evaluate
from dng_cli.models import ClassConditionalEps

N, STEPS = 96, 10
DATASETS = {"mnist": ["dataset=mnist", "model=mnist", "forbidden=[0]"],
            "fashion_mnist": ["dataset=fashion_mnist", "model=fashion_mnist", "forbidden=[6]"]}
METHODS = {"np": ["method=np", "method.guidance_scale=1"], "sld": ["method=sld"], "dng": ["method=dng"],
           "ccfg": ["method=ccfg", "method.guidance_scale=3"]}
pytestmark = pytest.mark.slow


def _rate(compose, tmp_path, dataset: str, args: list[str]) -> float:
    cfg = compose("evaluate", DATASETS[dataset] + [f"n_samples={N}", f"sampler.steps={STEPS}", "sampler.batch_size=96",
                                                 "sampler.progress=false", "save_samples=false", *args])
    return evaluate.run(cfg, tmp_path / "_".join([dataset, *args]).replace("/", "_"))["forbidden_rate"]


@pytest.fixture(scope="module")
def unguided(tmp_path_factory):
    from conftest import compose_cfg

    folder = tmp_path_factory.mktemp("unguided")
    return {d: _rate(compose_cfg, folder, d, ["method=none"]) for d in DATASETS}


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_unguided_forbidden_rate_is_near_the_class_share(unguided, dataset):
    # the class share is 10 %; 96 samples at 10 steps: a 95 % binomial range of about 4-17 %
    assert 0.03 <= unguided[dataset] <= 0.2, unguided[dataset]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("dataset", list(DATASETS))
def test_every_method_removes_the_forbidden_class(compose, tmp_path, unguided, dataset, method):
    rate = _rate(compose, tmp_path, dataset, METHODS[method])
    assert rate <= unguided[dataset] / 2, (rate, unguided[dataset])


def test_swapped_branches_attract_instead(compose, tmp_path, unguided, monkeypatch):
    """A broken adapter (ε_u and ε_c swapped) turns negative guidance into attraction: NP then draws more
    zeros than unguided — what the checks above would catch."""
    real = ClassConditionalEps.__call__

    def swapped(self, x, t):
        eps_u, eps_c = real(self, x, t)
        return eps_c[0], eps_u.unsqueeze(0)

    monkeypatch.setattr(ClassConditionalEps, "__call__", swapped)
    assert _rate(compose, tmp_path, "mnist", METHODS["np"]) > 2 * unguided["mnist"]
