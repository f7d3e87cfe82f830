"""`dng train` on tiny synthetic data: DDPM (conditional, class subset), exact resume, classifier."""

import json

import pytest
import torch
from safetensors.torch import load_file

from dng_cli.commands import train
from dng_cli.models import load_classifier, load_ddpm


def _ddpm_cfg(compose, root, out, **kw):
    overrides = [f"dataset.root={root}", "model=tiny_random", "batch_size=8", "checkpoint_every=2",
                 "progress=false", "warmup_steps=2", f"output_dir={out}"] + [f"{k}={v}" for k, v in kw.items()]
    return compose("train_ddpm", overrides)


def test_train_ddpm_and_resume_exactly(compose, tiny_mnist, tmp_path):
    straight = tmp_path / "straight"
    train.run_ddpm(_ddpm_cfg(compose, tiny_mnist, straight, steps=4), straight)
    resumed = tmp_path / "resumed"
    train.run_ddpm(_ddpm_cfg(compose, tiny_mnist, resumed, steps=2), resumed)
    train.run_ddpm(_ddpm_cfg(compose, tiny_mnist, resumed, steps=4, resume="true"), resumed)
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(straight / "checkpoint" / name), load_file(resumed / "checkpoint" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    card = json.loads((straight / "ema" / "card.json").read_text())
    assert card["steps"] == 4 and card["conditional"] and "hardware" in card and "final_loss_ema" in card
    unet = load_ddpm(straight / "ema")
    assert unet.config.num_class_embeds == 11
    from diffusers import DDPMScheduler

    from dng_cli.schedule import NoiseSchedule

    # the schedule travels with the weights, readable by diffusers and by our sampler
    sched = DDPMScheduler.from_pretrained(straight / "ema")
    assert sched.config.beta_schedule == "linear" and sched.config.num_train_timesteps == 1000
    ours = NoiseSchedule.from_scheduler(json.loads((straight / "ema" / "scheduler_config.json").read_text()))
    assert torch.allclose(ours.alphas_cumprod.float(), sched.alphas_cumprod)
    assert (straight / "ema" / "diffusion_pytorch_model.safetensors").is_file()


def test_train_continues_from_weights(compose, tiny_mnist, tmp_path):
    first = tmp_path / "first"
    train.run_ddpm(_ddpm_cfg(compose, tiny_mnist, first, steps=2), first)
    cont = tmp_path / "cont"
    cfg = _ddpm_cfg(compose, tiny_mnist, cont, steps=4, init_from=str(first / "ema"), lr_schedule="cosine", seed=1)
    model = train.build_unet(train.plain(cfg.model.unet) | {"num_class_embeds": 11}, seed=1)
    train._init_from(cfg, model)  # the starting point is the earlier run's EMA, not the seed-1 init
    source = load_ddpm(first / "ema").state_dict()
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items())
    train.run_ddpm(cfg, cont)
    card = json.loads((cont / "ema" / "card.json").read_text())
    assert card["steps"] == 4 and card["total_steps"] == 6 and card["init"]["init_from"] == str(first / "ema")
    assert card["total_wall_time_s"] >= card["wall_time_s"]
    # cosine: warm-up, then decays to 0 at `steps`
    lrs = [train.learning_rate(cfg, s) for s in range(4)]
    assert lrs[0] < lrs[1] == lrs[2] == cfg.lr > lrs[3] > 0
    assert train.learning_rate(cfg, 4) == 0.0


def test_train_init_from_other_architecture_is_an_error(compose, tiny_mnist, tmp_path):
    import pytest

    from dng_cli import UserError

    first = tmp_path / "first"
    train.run_ddpm(_ddpm_cfg(compose, tiny_mnist, first, steps=1, **{"model.unet.block_out_channels": "[8,8]"}), first)
    cfg = _ddpm_cfg(compose, tiny_mnist, tmp_path / "b", steps=1, init_from=str(first / "ema"))
    with pytest.raises(UserError, match="architecture"):
        train.run_ddpm(cfg, tmp_path / "b")


def test_train_unconditional_class_subset(compose, tiny_mnist, tmp_path):
    out = tmp_path / "class0"
    cfg = _ddpm_cfg(compose, tiny_mnist, out, steps=1, conditional="false", **{"dataset.classes": "[0]",
                                                                               "batch_size": 4})
    train.run_ddpm(cfg, out)
    card = json.loads((out / "ema" / "card.json").read_text())
    assert card["data"]["classes"] == [0] and card["data"]["images"] == 7 and not card["conditional"]
    assert load_ddpm(out / "ema").config.num_class_embeds is None


def test_train_classifier(compose, tiny_mnist, tmp_path):
    out = tmp_path / "clf"
    cfg = compose("train_classifier", [f"dataset.root={tiny_mnist}", "epochs=1", "batch_size=16", "width=4",
                                       "progress=false", f"output_dir={out}"])
    result = train.run_classifier(cfg, out)
    assert 0.0 <= result["test_accuracy"] <= 1.0
    clf = load_classifier(out / "classifier")
    assert clf(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert json.loads((out / "classifier" / "card.json").read_text())["test_accuracy"] == result["test_accuracy"]


def test_resume_refuses_missing_checkpoint_and_other_architecture(compose, tiny_mnist, tmp_path):
    import pytest

    from dng_cli import UserError

    with pytest.raises(UserError, match="no checkpoint in"):
        train.run_ddpm(_ddpm_cfg(compose, tiny_mnist, tmp_path / "empty", steps=2, resume="true"), tmp_path / "empty")
    out = tmp_path / "run"
    train.run_ddpm(_ddpm_cfg(compose, tiny_mnist, out, steps=2), out)
    other = _ddpm_cfg(compose, tiny_mnist, out, steps=4, resume="true", **{"model.unet.block_out_channels": "[8,8]"})
    with pytest.raises(UserError, match="does not match this model's architecture"):
        train.run_ddpm(other, out)


def test_resume_with_other_settings_is_recorded(compose, tiny_mnist, tmp_path, caplog):
    out = tmp_path / "run"
    train.run_ddpm(_ddpm_cfg(compose, tiny_mnist, out, steps=2), out)
    train.run_ddpm(_ddpm_cfg(compose, tiny_mnist, out, steps=4, resume="true", batch_size=4, lr=5e-4), out)
    card = json.loads((out / "ema" / "card.json").read_text())
    assert card["resumed_with_changes"]["batch_size"] == {"checkpoint": 8, "now": 4}
    assert card["resumed_with_changes"]["lr"] == {"checkpoint": 1e-3, "now": 5e-4}
    assert "resuming with batch_size=4" in caplog.text


@pytest.mark.slow
def test_checkpoint_survives_a_kill_during_its_replacement(compose, tiny_mnist, tmp_path):
    """SIGKILL while the new checkpoint replaces the old one (the old is renamed aside, the new not yet in
    place): `resume=true` recovers the old checkpoint and finishes exactly like an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "dng_cli.cli", "train", "ddpm", f"dataset.root={tiny_mnist}", "model=tiny_random",
            "batch_size=8", "checkpoint_every=2", "progress=false", "warmup_steps=2", "steps=4",
            f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "DNG_TEST_PAUSE": "atomic_save"})
    try:
        for line in proc.stdout:  # the first pause: replacing the step-2 checkpoint by the step-4 one
            if "DNG_TEST_PAUSED atomic_save" in line:
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert not (run_dir / "checkpoint").exists() and list(run_dir.glob(".checkpoint.old-*/checkpoint"))
    res = subprocess.run(args + ["resume=true"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "recovered" in res.stdout + res.stderr and not list(run_dir.glob(".checkpoint.*"))
    straight = tmp_path / "straight"
    train.run_ddpm(_ddpm_cfg(compose, tiny_mnist, straight, steps=4), straight)
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(straight / "checkpoint" / name), load_file(run_dir / "checkpoint" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def _eval_loss(model_dir, images, labels, null_label):
    """ε-MSE of a saved model on fixed (x_0, t, noise): the same draws for every model compared."""
    from dng_cli.schedule import NoiseSchedule

    unet = load_ddpm(model_dir)
    g = torch.Generator().manual_seed(123)
    schedule = NoiseSchedule.linear()
    t = torch.randint(0, len(schedule), (len(images),), generator=g)
    noise = torch.randn(images.shape, generator=g)
    with torch.no_grad():
        pred = unet(schedule.add_noise(images, noise, t), t, class_labels=labels, return_dict=False)[0]
    return float(((pred - noise) ** 2).mean())


def test_training_lowers_the_loss_and_uses_the_null_label(compose, tiny_mnist, tmp_path, monkeypatch):
    """60 steps lower the ε-MSE on fixed draws well below that of the 1-step model, and label dropout sends
    the null label (index num_classes) to the network — never when label_dropout=0."""
    from dng_cli.data import load_tensors

    seen = []
    real_build = train.build_unet

    def recording_build(arch, seed):
        net = real_build(arch, seed)
        forward = net.forward

        def spy(x, t, class_labels=None, **kwargs):
            seen.append(class_labels.clone())
            return forward(x, t, class_labels=class_labels, **kwargs)

        net.forward = spy
        return net

    monkeypatch.setattr(train, "build_unet", recording_build)
    images, labels = load_tensors("mnist", str(tiny_mnist), "test")
    losses = {}
    for steps in (1, 60):
        out = tmp_path / f"s{steps}"
        train.run_ddpm(_ddpm_cfg(compose, tiny_mnist, out, steps=steps, checkpoint_every=100, label_dropout=0.5,
                                 ema_decay=0.5, lr=3e-3), out)
        losses[steps] = _eval_loss(out / "ema", images, labels, 10)
    assert losses[60] < 0.7 * losses[1], losses
    used = torch.cat(seen)
    assert (used == 10).any() and (used < 10).any()  # null label and real labels both reach the network
    seen.clear()
    out = tmp_path / "nodrop"
    train.run_ddpm(_ddpm_cfg(compose, tiny_mnist, out, steps=3, label_dropout=0.0), out)
    assert not (torch.cat(seen) == 10).any()


def test_the_classifier_learns_the_synthetic_classes(compose, tiny_mnist, tmp_path):
    out = tmp_path / "clf"
    cfg = compose("train_classifier", [f"dataset.root={tiny_mnist}", "epochs=20", "batch_size=16", "width=8", "shift=0",
                                       "progress=false", f"output_dir={out}"])
    assert train.run_classifier(cfg, out)["test_accuracy"] >= 0.9  # chance is 0.1; each class a distinct blob
