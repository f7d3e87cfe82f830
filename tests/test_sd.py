"""`dng sd` offline on a tiny randomly initialised Stable Diffusion (UNet, VAE, CLIP text encoder)."""

import pytest
import torch

from dng_cli import cli
from dng_cli.commands import sd


def test_prompt_eps_is_one_forward_and_cfg():
    comps = sd.tiny_random(0)
    emb = sd.encode(comps, ["", "a cat", "a dog"], "cpu")
    calls = []
    comps.unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    eps_fn = sd.PromptEps(comps.unet, emb, cfg_scale=3.0)
    z = torch.randn(2, 4, 8, 8)
    t = torch.full((2,), 500)
    with torch.inference_mode():
        eps_u, eps_c = eps_fn(z, t)
        e = [comps.unet(z, t, encoder_hidden_states=emb[i:i + 1].repeat(2, 1, 1)).sample for i in range(3)]
    assert calls[0] == 6  # one batched forward of [z; z; z]
    assert torch.allclose(eps_u, e[0] + 3.0 * (e[1] - e[0]), atol=1e-4)
    assert torch.allclose(eps_c, e[2], atol=1e-4)


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["dng", "np", "sld"])
def test_sd_command_offline(tmp_path, method):
    run_dir = tmp_path / method
    cli_args = ["sd", "sd_model=tiny_random", "prompt=a cat", "negative_prompt=a dog", f"method={method}", "steps=3",
                "n_samples=2", "batch_size=2", "device=cpu", "progress=false", f"hydra.run.dir={run_dir}"]
    cli.main(cli_args)
    for name in ("samples.png", "samples.npz", "trajectory.csv", "guidance.png"):
        assert (run_dir / name).is_file()
    import numpy as np

    assert np.load(run_dir / "samples.npz")["images"].shape == (2, 3, 16, 16)


def test_sd_needs_negative_prompt(capsys, tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["sd", "sd_model=tiny_random", "prompt=a cat", "method=dng", f"hydra.run.dir={tmp_path / 'r'}"])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "negative_prompt" in err
