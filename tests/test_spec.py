"""The composed config is resolved once, at the front, into a frozen run spec that the lower layers receive."""

import dataclasses

import pytest
import torch

from dng_cli import pipeline, scoring, spec
from dng_cli.commands import evaluate, sample

TINY = ["model=tiny_random", "n_samples=4", "sampler.steps=2", "sampler.batch_size=4", "sampler.progress=false"]


def _spy(monkeypatch, module, name, seen):
    real = getattr(module, name)

    def spy(first, *args, **kwargs):
        seen.append((name, type(first).__name__))
        return real(first, *args, **kwargs)
    monkeypatch.setattr(module, name, spy)


@pytest.mark.parametrize("command", ["evaluate", "sample"])
def test_a_run_resolves_its_config_once_and_passes_the_spec_down(compose, tmp_path, monkeypatch, command):
    seen = []
    _spy(monkeypatch, spec, "resolve_run", seen)
    for name in ("build", "load_model", "draw"):
        _spy(monkeypatch, pipeline, name, seen)
    for name in ("classifier_of", "fid_reference"):
        _spy(monkeypatch, scoring, name, seen)
    cfg = compose(command, TINY + (["model.classifier=mnist"] if command == "sample" else []))
    (evaluate if command == "evaluate" else sample).run(cfg, tmp_path / command)
    assert [s for s in seen if s[0] == "resolve_run"] == [("resolve_run", "DictConfig")]
    below = [s for s in seen if s[0] != "resolve_run"]
    assert ("build", "RunSpec") in below and ("classifier_of", "RunSpec") in below
    assert all(kind in ("RunSpec", "ModelSpec", "DatasetSpec") for _, kind in below), below


def test_below_the_spec_no_module_reads_a_config():
    """Issue 45's invariant: spec.py is the only reader of a composed config; the layers below take specs."""
    import importlib
    import inspect

    for name in ("models", "pipeline", "scoring", "sampler", "guidance", "schedule", "metrics", "matching"):
        source = inspect.getsource(importlib.import_module(f"dng_cli.{name}"))
        assert "omegaconf" not in source.lower() and "DictConfig" not in source, name
    assert "dng_cli.models" not in inspect.getsource(spec) and "dng_cli.data " not in inspect.getsource(spec)


def test_the_spec_is_frozen_and_resolved(compose):
    run = spec.resolve_run(compose("evaluate", ["method=np", "sampler.device=auto", "sampler.precision=auto"]))
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.n_samples = 3
    with pytest.raises(TypeError):
        run.config["n_samples"] = 3  # the recorded config is read-only too
    assert run.model.path.is_dir() and (run.model.path / "config.json").is_file()  # "mnist" -> the shipped folder
    assert run.model.classifier["kind"] == "folder" and run.dataset.shape == (1, 28, 28)
    assert run.sampler.device == ("cuda" if torch.cuda.is_available() else "cpu")  # auto decided
    assert run.sampler.precision in ("fp32", "bf16") and len(run.schedule) == 50 and run.forbidden == (0,)
    again = dict(spec.resolve_run(compose("evaluate", ["method=np", "sampler.device=auto", "sampler.precision=auto"])).identity)
    assert dict(run.identity) == again and run.fingerprint == spec.fingerprint(again)


def test_a_bad_config_fails_in_the_resolve(compose):
    from dng_cli import UserError

    with pytest.raises(UserError, match="forbidden class 12 is out of range"):
        spec.resolve_run(compose("evaluate", ["forbidden=[12]"]))
    with pytest.raises(UserError, match="model.path='/nowhere' is not a checkpoint folder"):
        spec.resolve_run(compose("evaluate", ["model.path=/nowhere"]))


@pytest.mark.parametrize("command", ["evaluate", "sample"])
def test_no_config_resolution_after_the_spec(command):
    """scripts/config_walk.py follows the config through a real run: once resolve_run has returned, nothing
    resolves a name, source or format again (the spec's own lazy identity aside)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "config_walk.py"
    loader = importlib.util.spec_from_file_location("config_walk", path)
    walk = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(walk)
    result = walk.walk(walk.trace(command), f"dng_cli.commands.{command}")
    assert result["resolution_after_resolve_run"] == [], result["path"]
    assert any(step.startswith("dng_cli.spec.resolve_run") for step in result["path"])
