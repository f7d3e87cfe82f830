"""CIFAR-10 end to end on tiny synthetic CIFAR-shaped data: train (conditional, class-only), classifier,
evaluate class-conditional and in the paper's pair mode (FID reference computed and cached)."""

import json
import pickle

import numpy as np
import pytest

from dng_cli import cli
from dng_cli.commands import evaluate, train

TINY_ARCH = ["model.unet.sample_size=32", "model.unet.in_channels=3", "model.unet.out_channels=3",
             "model.unet.block_out_channels=[4,8]", "model.unet.down_block_types=[DownBlock2D,DownBlock2D]",
             "model.unet.up_block_types=[UpBlock2D,UpBlock2D]", "model.unet.norm_num_groups=4",
             "model.unet.layers_per_block=1"]


@pytest.fixture
def tiny_cifar(tmp_path):
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 8) for i in range(1, 6)] + [("test_batch", 20)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(np.arange(n) % 10)}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return tmp_path / "data"


@pytest.mark.e2e
def test_cifar_end_to_end(compose, tiny_cifar, tmp_path):
    root = f"dataset.root={tiny_cifar}"
    common = ["dataset=cifar10", root, "model=cifar10", *TINY_ARCH, "batch_size=4", "progress=false"]
    cond = tmp_path / "cond"
    train.run_ddpm(compose("train_ddpm", common + ["steps=1", f"output_dir={cond}"]), cond)
    uncond = tmp_path / "uncond"
    train.run_ddpm(compose("train_ddpm", common + ["steps=1", "conditional=false", f"output_dir={uncond}"]), uncond)
    class0 = tmp_path / "class0"
    train.run_ddpm(compose("train_ddpm", common + ["steps=1", "conditional=false", "dataset.classes=[0]",
                                                   f"output_dir={class0}"]), class0)
    clf = tmp_path / "clf"
    train.run_classifier(compose("train_classifier", ["dataset=cifar10", root, "epochs=1", "batch_size=8", "width=4",
                                                      "progress=false", f"output_dir={clf}"]), clf)
    sampling = [root, "dataset=cifar10", "n_samples=4", "sampler.steps=2", "sampler.batch_size=4",
                "sampler.progress=false", f"model.classifier={clf / 'classifier'}",
                f"metrics.fid.cache_dir={tmp_path / 'fid'}"]
    out = tmp_path / "eval_cond"
    m = evaluate.run(compose("evaluate", sampling + ["model=cifar10", f"model.path={cond / 'ema'}", "method=dng"]), out)
    assert m["n_samples"] == 4 and len(list((tmp_path / "fid").glob("cifar10-test-classifier-*.npz"))) == 1
    out = tmp_path / "eval_pair"
    m = evaluate.run(compose("evaluate", sampling + ["model=cifar10_pair", f"model.unconditional={uncond / 'ema'}",
                                                     f"+model.forbidden_models.0={class0 / 'ema'}", "method=np"]), out)
    assert json.loads((out / "metrics.json").read_text())["method"] == "np" and m["fid"] is not None


def test_pair_mode_missing_model_is_one_line(capsys, tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["evaluate", "dataset=cifar10", "model=cifar10_pair", f"hydra.run.dir={tmp_path / 'r'}"])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.unconditional" in err


def test_cifar_batch_with_a_code_payload_is_refused_unread(tmp_path):
    """A pickle in cifar-10-batches-py that would run code when unpickled is refused before it runs."""
    import os

    import pytest

    from dng_cli import UserError
    from dng_cli.data import load_tensors

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": Payload(), b"labels": [0]}, f)
    with pytest.raises(UserError, match="not a plain CIFAR batch"):
        load_tensors("cifar10", tmp_path, "test")
    assert not marker.exists()


def test_cifar_archive_with_wrong_md5_is_not_extracted(tmp_path):
    import pytest

    from dng_cli import UserError
    from dng_cli.data import prepare

    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not the real archive")
    with pytest.raises(UserError, match="md5"):
        prepare("cifar10", tmp_path)
