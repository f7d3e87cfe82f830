"""Your own model, classifier and dataset: a fresh diffusers UNet2DModel folder (safetensors and .bin), a
TorchScript classifier, a `_target_` classifier with its input transform, and image-folder / tensor-file
datasets, end to end through `dng evaluate` (configs/model/own.yaml, configs/dataset/own.yaml)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from dng_cli import UserError, scoring, spec
from dng_cli.commands import evaluate
from dng_cli.models import ClassConditionalEps, build_unet

ARCH = dict(sample_size=28, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(4, 8),
            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
            norm_num_groups=4, num_class_embeds=3)  # 2 classes + the null label


class PixelMean(torch.nn.Module):
    """A 2-class "classifier": dark vs light images (logits from the mean pixel)."""

    def forward(self, x):
        m = x.flatten(1).mean(1, keepdim=True)
        return torch.cat([-m, m], 1) * 10


def _images(folder: Path, split: str, n: int, rng) -> None:
    from PIL import Image

    for c, name in enumerate(("dark", "light")):
        (folder / split / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray((rng.integers(0, 100, (28, 28)) + 150 * c).astype(np.uint8)).save(folder / split / name / f"{i}.png")


@pytest.fixture
def own(tmp_path):
    rng = np.random.default_rng(0)
    unet = build_unet(ARCH, seed=0)
    unet.save_pretrained(tmp_path / "unet")
    unet.save_pretrained(tmp_path / "unet_bin", safe_serialization=False)
    torch.jit.script(PixelMean()).save(str(tmp_path / "clf.pt"))
    _images(tmp_path / "data", "train", 4, rng)
    _images(tmp_path / "data", "test", 10, rng)
    return tmp_path


def _base(own: Path, unet: str = "unet", classifier: str | None = None) -> list[str]:
    return ["model=own", f"model.path={own / unet}", f"model.classifier={classifier or own / 'clf.pt'}", "dataset=own",
            f"dataset.root={own / 'data'}", "dataset.num_classes=2", "n_samples=6", "sampler.steps=3",
            "sampler.progress=false", f"metrics.fid.cache_dir={own / 'fid'}"]


def _samples(folder: Path) -> np.ndarray:
    with np.load(folder / "samples.npz") as f:
        return f["images"]


def test_own_unet_torchscript_classifier_and_image_folder(compose, own):
    m = evaluate.run(compose("evaluate", _base(own)), own / "out")
    assert len(m["histogram_counts"]) == 2 and sum(m["histogram_counts"]) == 6
    assert np.isfinite(m["fid"]) and set(m["weights"]) == {"classifier", "ddpm", "dataset"}
    (cached,) = (own / "fid").glob("own-test-*-classifier-*.npz")  # named by the data's content hash
    assert m["weights"]["dataset"][:12] in cached.name
    # the classifier really classifies: the test images themselves are 10 dark + 10 light
    from dng_cli.data import load_dataset

    cfg = compose("evaluate", _base(own))
    x, y = load_dataset(spec.dataset_spec(cfg.dataset), "test")
    assert x.shape == (20, 1, 28, 28) and y.tolist() == [0] * 10 + [1] * 10
    assert scoring.classifier_of(spec.resolve_run(cfg))(x).argmax(1).tolist() == y.tolist()


def test_bin_checkpoint_draws_the_same_samples_as_safetensors(compose, own):
    a = evaluate.run(compose("evaluate", _base(own)), own / "safe")
    b = evaluate.run(compose("evaluate", _base(own, "unet_bin")), own / "bin")
    assert (own / "unet_bin" / "diffusion_pytorch_model.bin").is_file()
    assert np.array_equal(_samples(own / "safe"), _samples(own / "bin"))
    assert a["histogram_counts"] == b["histogram_counts"]


def test_a_single_pt_state_dict_next_to_config_json(own):
    from dng_cli.models import load_ddpm

    folder = own / "pt"
    folder.mkdir()
    (folder / "config.json").write_text((own / "unet" / "config.json").read_text())
    state = load_ddpm(own / "unet").state_dict()
    torch.save({"state_dict": state}, folder / "ema.pt")
    loaded = load_ddpm(folder).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    torch.save({k: v for k, v in list(state.items())[1:]}, folder / "ema.pt")  # a key missing
    with pytest.raises(UserError, match="could not be loaded as a UNet2DModel: ValueError: 1 missing keys"):
        load_ddpm(folder)
    torch.save(state, folder / "other.pt")
    with pytest.raises(UserError, match="has no single weights file"):
        load_ddpm(folder)


def test_target_classifier_with_transform_on_a_tensor_dataset(compose, own):
    torch.manual_seed(0)
    resnet_state = __import__("torchvision").models.resnet18(num_classes=2).state_dict()
    torch.save(resnet_state, own / "resnet.pt")
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        np.savez(own / "data" / f"{split}.npz", images=rng.integers(0, 256, (8, 28, 28), dtype=np.uint8),
                 labels=np.arange(8) % 2)
    clf = ("{_target_:torchvision.models.resnet18,num_classes:2,weights:" + str(own / "resnet.pt")
           + ",transform:{channels:3,size:32,range:[0,1],mean:[0.485,0.456,0.406],std:[0.229,0.224,0.225]}}")
    base = _base(own, classifier=clf) + ["dataset.format=tensors"]
    m = evaluate.run(compose("evaluate", base), own / "target")
    assert len(m["histogram_counts"]) == 2 and np.isfinite(m["fid"])
    # other weights in the same file: another classifier identity, so the result is not reused
    first = m["weights"]["classifier"]
    torch.save(__import__("torchvision").models.resnet18(num_classes=2).state_dict(), own / "resnet.pt")
    assert dict(spec.resolve_run(compose("evaluate", base)).identity)["weights.classifier"] != first


def test_null_label_first_puts_the_null_label_at_embedding_zero(compose, own):
    from dng_cli.models import load_ddpm

    unet = load_ddpm(own / "unet")
    last = ClassConditionalEps(unet, [0])
    first = ClassConditionalEps(unet, [0], null_label="first")
    assert last.labels(2, torch.device("cpu")).tolist() == [2, 2, 0, 0]
    assert first.labels(2, torch.device("cpu")).tolist() == [0, 0, 1, 1]
    assert ClassConditionalEps(unet, [1], label=0, null_label=1).labels(1, torch.device("cpu")).tolist() == [0, 2]
    a = evaluate.run(compose("evaluate", _base(own)), own / "last")
    b = evaluate.run(compose("evaluate", _base(own) + ["model.null_label=first"]), own / "first")
    assert not np.array_equal(_samples(own / "last"), _samples(own / "first"))
    assert a["fingerprint"] != b["fingerprint"]
    # "last" is the convention of every result before the key existed: it does not enter the identity
    assert "model.null_label" not in dict(spec.resolve_run(compose("evaluate", _base(own))).identity)
    with pytest.raises(UserError, match=r"model.null_label=5 is invalid: allowed are last, first or an index in 0..2"):
        evaluate.check_cfg(compose("evaluate", _base(own) + ["model.null_label=5"]))


def test_the_dataset_content_is_part_of_the_identity(compose, own):
    cfg = compose("evaluate", _base(own))
    before = dict(spec.resolve_run(cfg).identity)
    from PIL import Image

    Image.fromarray(np.zeros((28, 28), np.uint8)).save(own / "data" / "test" / "dark" / "0.png")
    after = dict(spec.resolve_run(cfg).identity)
    assert before["weights.dataset"] != after["weights.dataset"]
    from dng_cli import runs

    assert runs.samples_fingerprint(before) == runs.samples_fingerprint(after)  # the data only scores


@pytest.mark.parametrize("case, match", [
    ("wrong_logits", r"model.classifier returns \(2, 3\) for 2 images: expected logits \(2, 2\)"),
    ("image_size", r"is 32x32, dataset.image_size is 28"),
    ("class_folders", r"has 3 class folders, dataset.num_classes is 2"),
    ("class_names", r"class folder .*/cat' not found"),
    ("no_split", r"split folder .*test.* not found"),
    ("not_torchscript", r"is neither a classifier folder nor a TorchScript file"),
    ("out_channels", r"model.path does not fit dataset=own: its out_channels is 2, the dataset's is 1"),
    ("empty_class", r"class folder .*light' \(class 1\) holds no images in the test split"),
    ("sixteen_bit", r"is a I;16 image \(16-bit or float\): convert the dataset to 8-bit images"),
])
def test_own_model_bad_input_is_one_line(compose, own, case, match):
    from PIL import Image

    extra = []
    if case == "wrong_logits":
        torch.jit.script(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 3))).save(str(own / "clf.pt"))
    elif case == "image_size":
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(own / "data" / "test" / "dark" / "big.png")
    elif case == "class_folders":
        (own / "data" / "test" / "extra").mkdir()
    elif case == "class_names":
        extra = ["dataset.class_names=[dark,cat]"]
    elif case == "no_split":
        extra = [f"dataset.root={own}"]
    elif case == "not_torchscript":
        (own / "clf.pt").write_bytes(b"not a TorchScript archive")
    elif case == "out_channels":  # a UNet that predicts its variance too (2C outputs) used to end in a reshape traceback
        build_unet({**ARCH, "out_channels": 2}, seed=0).save_pretrained(own / "unet")
    elif case == "empty_class":  # used to give a NaN FID with exit 0
        for p in (own / "data" / "test" / "light").iterdir():
            p.unlink()
    elif case == "sixteen_bit":  # PIL's convert() clips 16-bit values at 255
        Image.fromarray(np.full((28, 28), 4000, np.uint16)).save(own / "data" / "test" / "dark" / "wide.png")
    with pytest.raises(UserError, match=match) as err:
        evaluate.run(compose("evaluate", _base(own) + extra), own / "bad")
    assert "\n" not in str(err.value)


def test_a_denoiser_that_returns_nan_stops_with_one_line_and_writes_nothing(compose, own):
    """Own weights that overflow (here: a NaN in the output conv) gave a finished run of black images with ordinary
    looking metrics; now the run stops at the first bad step and leaves no result."""
    unet = build_unet(ARCH, seed=0)
    with torch.no_grad():
        unet.conv_out.bias.fill_(float("nan"))
    unet.save_pretrained(own / "unet_nan")
    with pytest.raises(UserError, match=r"NaN/inf at step 1 of 3 \(timestep \d+\)"):
        evaluate.run(compose("evaluate", _base(own, "unet_nan")), own / "out")
    assert not (own / "out" / "metrics.json").exists()


class NanOnBright(torch.nn.Module):
    """Finite on the check batch and the dataset's images, NaN on an image holding both saturated ends (black and
    white pixels: the random UNet's samples)."""

    def forward(self, x):
        m = x.flatten(1).mean(1, keepdim=True)
        out = torch.cat([-m, m], 1) * 10
        bright = (x.flatten(1).amax(1, keepdim=True) > 0.99) & (x.flatten(1).amin(1, keepdim=True) < -0.99)
        return torch.where(bright, torch.full_like(out, float("nan")), out)


def test_a_classifier_that_is_nan_on_the_samples_stops_with_one_line(compose, own):
    """It passes the check batch (test images) but not the generated ones: argmax of NaN used to count as class 0
    and FID was written as a bare NaN into metrics.json."""
    torch.jit.script(NanOnBright()).save(str(own / "nan_clf.pt"))
    with pytest.raises(UserError, match=r"the classifier returned NaN/inf for \d+ of \d+ images"):
        evaluate.run(compose("evaluate", _base(own, classifier=str(own / "nan_clf.pt"))), own / "out")
    assert not (own / "out" / "metrics.json").exists()
