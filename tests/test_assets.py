"""The shipped assets (MNIST, Fashion-MNIST) load (safetensors, no pickles) and run: `dng sample` with no model
argument, and with model=fashion_mnist."""

import json
import subprocess
import sys
import zipfile

import pytest
import torch

from dng_cli import cli
from dng_cli.models import load_classifier, load_ddpm
from dng_cli.spec import SHIPPED


@pytest.mark.parametrize("name, accuracy", [("mnist", 0.99), ("fashion_mnist", 0.92)])
def test_shipped_assets_load(name, accuracy):
    unet = load_ddpm(name)
    assert unet.config.num_class_embeds == 11 and unet.config.sample_size == 28
    assert sum(p.numel() for p in unet.parameters()) < 5_000_000  # <= 20 MB in float32
    clf = load_classifier(name)
    assert clf(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    card = json.loads((SHIPPED[name] / "ddpm" / "card.json").read_text())
    assert card["steps"] > 0 and card["data"]["dataset"] == name
    assert (SHIPPED[name] / "ddpm" / "scheduler_config.json").is_file()
    assert json.loads((SHIPPED[name] / "classifier" / "card.json").read_text())["test_accuracy"] >= accuracy
    assert list((SHIPPED[name] / "fid").glob(f"{name}-test-classifier-*.npz"))


def test_default_sample_two_steps(tmp_path):
    run_dir = tmp_path / "run"
    cli.main(["sample", "sampler.steps=2", "n_samples=4", "sampler.progress=false", f"hydra.run.dir={run_dir}"])
    assert (run_dir / "samples.npz").is_file() and (run_dir / "guidance.png").is_file()


def test_fashion_mnist_samples_two_steps_with_its_class_names(tmp_path):
    run_dir = tmp_path / "run"
    cli.main(["sample", "dataset=fashion_mnist", "model=fashion_mnist", "forbidden=[6]", "sampler.steps=2",
              "n_samples=4", "sampler.progress=false", f"hydra.run.dir={run_dir}"])
    assert (run_dir / "samples.npz").is_file() and (run_dir / "guidance.png").is_file()


@pytest.mark.e2e
def test_wheel_ships_configs_and_assets(tmp_path):
    """A plain (non-editable) install finds configs/ and the assets: build the wheel, run from it."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "dist"), str(repo)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("dng_cli-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "dng_cli/configs/evaluate.yaml" in names and "dng_cli/configs/method/dng.yaml" in names
    assert any(n.startswith("dng_cli/assets/mnist/ddpm/") for n in names)
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    res = subprocess.run([sys.executable, "-m", "dng_cli.cli", "evaluate", "--cfg", "job"], capture_output=True,
                         text=True, cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"},
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "guidance_scale: 10.0" in res.stdout and "prior: 0.1" in res.stdout
