"""The `dng` front: help, --key=value sugar, and bad input (one line, non-zero exit, no files)."""

import subprocess
import sys

import pytest

from dng_cli import cli


def test_help_lists_commands(capsys):
    cli.main(["--help"])
    out = capsys.readouterr().out
    for name in ("sample", "evaluate", "report", "train", "data"):
        assert f"  {name}" in out


def test_rewrite_sugar():
    assert cli.rewrite(["--method=dng", "-m", "--multirun", "a=b", "--cfg", "job"]) == ["method=dng", "-m", "--multirun", "a=b", "--cfg", "job"]


def _fails(capsys, argv, match):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert match in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("args,match", [
    (["method=foo"], "'foo'"),
    (["forbidden=[10]"], "10"),
    (["forbidden=[-1]"], "-1"),
    (["method=dng", "method.p_max=1.0"], "p_max=1.0"),
    (["method=dng", "method.p_max=1e-7"], "p_max"),
    (["method=dng", "method.prior=0"], "prior=0"),
    (["method=dng", "method.prior=1.5"], "prior=1.5"),
    (["sampler.steps=0"], "steps=0"),
    (["sampler.steps=1001"], "steps=1001"),
    (["method=dng", "method.temperature=-1"], "temperature=-1"),
    (["model=mnist", "model.path=/nonexistent/ckpt"], "/nonexistent/ckpt"),
    (["sampler.variance=medium"], "medium"),
    (["method=dng_fewstep", "forbidden=[0,6,8]"], "3 forbidden classes"),
    (["no_such_key=1"], "no_such_key"),
    (["sampler.max_batch=0"], "max_batch=0"),
    (["sampler.compile=maybe"], "compile='maybe'"),
])
def test_sample_bad_inputs(capsys, tmp_path, args, match):
    run_dir = tmp_path / "run"
    model = [] if any(a.startswith("model=") for a in args) else ["model=tiny_random"]
    _fails(capsys, ["sample", *model, f"hydra.run.dir={run_dir}", *args], match)
    assert not run_dir.exists()


@pytest.mark.parametrize("args,match", [
    (["lr_schedule=linear"], "lr_schedule='linear'"),
    (["init_from=/nonexistent/ema"], "/nonexistent/ema"),
    (["steps=0"], "steps=0"),
])
def test_train_bad_inputs(capsys, tmp_path, args, match):
    run_dir = tmp_path / "run"
    _fails(capsys, ["train", "ddpm", f"hydra.run.dir={run_dir}", *args], match)
    assert not run_dir.exists()


def test_unknown_command(capsys):
    _fails(capsys, ["frobnicate"], "frobnicate")


def test_corrupt_checkpoint(capsys, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"_class_name": "UNet2DModel", "sample_size": 28}')
    (ckpt / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    run_dir = tmp_path / "run"
    _fails(capsys, ["sample", f"model.path={ckpt}", f"hydra.run.dir={run_dir}", "sampler.steps=2", "n_samples=2"], str(ckpt))
    assert not run_dir.exists()


@pytest.mark.e2e
def test_sample_subprocess_writes_all_outputs(tmp_path):
    run_dir = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "dng_cli.cli", "sample", "model=tiny_random", "sampler.steps=2",
                          "n_samples=6", "sampler.batch_size=4", "sampler.progress=false", f"hydra.run.dir={run_dir}"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    for name in ("samples.png", "samples.npz", "trajectory.csv", "guidance.png"):
        assert (run_dir / name).is_file(), name
    import numpy as np

    data = np.load(run_dir / "samples.npz")
    assert data["images"].shape == (6, 1, 28, 28) and data["images"].dtype == np.uint8
    assert list(data["seeds"]) == list(range(6))
    lines = (run_dir / "trajectory.csv").read_text().strip().splitlines()
    assert lines[0].startswith("step,timestep,posterior_mean") and len(lines) == 3


@pytest.mark.e2e
def test_bad_input_subprocess_one_line(tmp_path):
    run_dir = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "dng_cli.cli", "sample", "--method=dng", "--method.p_max=2",
                          f"hydra.run.dir={run_dir}"], capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert len(res.stderr.strip().splitlines()) == 1 and "p_max=2" in res.stderr
    assert not run_dir.exists()


def test_lower_modules_never_import_commands_or_scripts():
    """The layering of the README's Layout: arrows only point down."""
    import ast
    from pathlib import Path

    import dng_cli

    root = Path(dng_cli.__file__).parent
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not name.startswith(("dng_cli.commands", "scripts")), f"{path.name} imports {name}"
    io_imports = [n for n in ast.walk(ast.parse((root / "io.py").read_text())) if isinstance(n, ast.ImportFrom)]
    assert {n.module for n in io_imports if (n.module or "").startswith("dng_cli")} <= {"dng_cli"}  # error types at most


def test_class_names_come_from_the_dataset_config(compose):
    from dng_cli.spec import dataset_spec

    fashion = dataset_spec(compose("evaluate", ["dataset=fashion_mnist", "model=tiny_random", "forbidden=[6,0]"]).dataset)
    assert fashion.names_of([6, 0]) == "[6 Shirt, 0 T-shirt/top]"
    assert dataset_spec(compose("evaluate", ["model=tiny_random"]).dataset).names_of([0]) == "[0]"


def test_a_model_that_is_not_shipped_names_the_shipped_ones(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit):
        cli.main(["evaluate", "model.path=fashion_mnist2", f"hydra.run.dir={tmp_path / 'r'}"])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'fashion_mnist2'" in err and "mnist" in err
