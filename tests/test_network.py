"""The network adapter the sampler calls: memory format, micro-batches and torch.compile change
speed only, never the numbers (beyond float rounding)."""

import pytest
import torch

from dng_cli import UserError
from dng_cli.models import ClassConditionalEps, PairEps, build_unet

ARCH = dict(sample_size=28, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(4, 8),
            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
            norm_num_groups=4)


def _unet(**kw):
    return build_unet({**ARCH, **kw}, seed=0).eval().requires_grad_(False)


def _inputs(b=5):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, 1, 28, 28, generator=g), torch.randint(0, 1000, (b,), generator=g)


@pytest.mark.parametrize("channels_last,max_batch", [(False, 3), (True, None), (True, 4), (False, 1)])
def test_layout_and_micro_batches_do_not_change_eps(channels_last, max_batch):
    x, t = _inputs()
    with torch.inference_mode():
        ref_u, ref_c = ClassConditionalEps(_unet(num_class_embeds=11), [0, 6])(x, t)
        eps_u, eps_c = ClassConditionalEps(_unet(num_class_embeds=11), [0, 6], channels_last=channels_last,
                                           max_batch=max_batch)(x, t)
    assert eps_c.shape == (2, 5, 1, 28, 28)
    torch.testing.assert_close(eps_u, ref_u, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(eps_c, ref_c, atol=1e-5, rtol=1e-4)


def test_pair_micro_batches():
    x, t = _inputs()
    with torch.inference_mode():
        ref = PairEps(_unet(), [_unet()])(x, t)
        out = PairEps(_unet(), [_unet()], channels_last=True, max_batch=2)(x, t)
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[1], ref[1], atol=1e-5, rtol=1e-4)


def test_bad_max_batch():
    with pytest.raises(UserError, match="max_batch=0"):
        ClassConditionalEps(_unet(num_class_embeds=11), [0], max_batch=0)


@pytest.mark.e2e
def test_compiled_network_pads_to_one_shape():
    """torch.compile + max_batch: a 5-image call is two calls of 4 (the second padded), same numbers."""
    x, t = _inputs()
    with torch.inference_mode():
        ref_u, ref_c = ClassConditionalEps(_unet(num_class_embeds=11), [0])(x, t)
        fn = ClassConditionalEps(_unet(num_class_embeds=11), [0], compile=True, max_batch=4)
        eps_u, eps_c = fn(x, t)
        eps_u2, _ = fn(x[:3], t[:3])  # another batch size: still 4-row calls
    torch.testing.assert_close(eps_u, ref_u, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(eps_c, ref_c, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(eps_u2, ref_u[:3], atol=1e-4, rtol=1e-3)
