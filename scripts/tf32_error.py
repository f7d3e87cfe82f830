"""python scripts/tf32_error.py — the relative error TF32 convolutions put on the shipped MNIST UNet's ε, emulated on the CPU:
inputs and weights of every Conv2d/Linear rounded to TF32's 10-bit mantissa (round-to-nearest), fp32 accumulate.
Compare the relative errors with what scripts/posterior_noise.py shows DNG's posterior tolerates."""
import torch
from dng_cli.models import load_ddpm

torch.set_num_threads(2)

def tf32(t):
    i = t.contiguous().view(torch.int32)
    i = (i + 0x1000) & ~0x1FFF  # round to nearest on the 13 dropped mantissa bits
    return i.view(torch.float32)

unet = load_ddpm("mnist").eval()
ref_unet = load_ddpm("mnist").eval()
for m in unet.modules():
    if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
        m.weight.data = tf32(m.weight.data)
        m.register_forward_pre_hook(lambda mod, args: (tf32(args[0]),) + tuple(args[1:]))
g = torch.Generator().manual_seed(0)
x = torch.randn(64, 1, 28, 28, generator=g)
for t in (999, 500, 100, 20):
    tt = torch.full((64,), t)
    for lab in (0, 10):
        ll = torch.full((64,), lab)
        with torch.inference_mode():
            a = ref_unet(x, tt, class_labels=ll).sample
            b = unet(x, tt, class_labels=ll).sample
        rel = ((b - a).norm() / a.norm()).item()
        print(f"t {t} label {lab}: relative error of eps {rel:.2e}, max abs {(b - a).abs().max():.2e}")
    with torch.inference_mode():
        d_ref = ref_unet(x, tt, class_labels=torch.zeros(64, dtype=torch.long)).sample - ref_unet(x, tt, class_labels=torch.full((64,), 10)).sample
        d = unet(x, tt, class_labels=torch.zeros(64, dtype=torch.long)).sample - unet(x, tt, class_labels=torch.full((64,), 10)).sample
    print(f"t {t}: relative error of eps_c - eps_u {((d - d_ref).norm() / d_ref.norm()).item():.2e}")
