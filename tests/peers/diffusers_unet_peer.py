"""Speed peer: one DDPM train step of a diffusers `UNet2DModel` (PyTorch), timed on this machine.

Runs under the peers' own PyTorch venv, not the project's (it imports torch and diffusers, never jax):

    make peers-venv
    .venv-peers/bin/python tests/peers/diffusers_unet_peer.py --steps 10
    .venv/bin/python tests/peers/compare.py unet       # alternates this and our `unet_peer` benchmark

Not part of `make test` (pytest.ini ignores tests/peers). Prints one JSON line:

    {"peer": "diffusers", "version", "torch", "threads", "step_ms" (median), "step_ms_min", "step_ms_max",
     "images_per_sec" (batch / median seconds), "params"}

The model is the one experiments/ddpm_digits.py names for `unet_peer`, built from this config (nothing
is downloaded); diffusers 0.42.1 accepts every argument as given, `dropout` included:

    UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64),
                layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                attention_head_dim=64, dropout=0.1)

Its other defaults, from the installed source: positional (sinusoidal) time embedding of 32 channels with
flip_sin_to_cos=True, freq_shift=0, then a 2-layer SiLU MLP to 128 (= 4 × 32); a `UNetMidBlock2D` (two
ResNet blocks around one self-attention, add_attention=True); the up blocks have layers_per_block + 1 = 2
ResNet blocks each; stride-2 conv downsampling and nearest-upsample + conv; SiLU, GroupNorm eps 1e-5,
resnet_time_scale_shift='default' (time embedding added, not FiLM), mid_block_scale_factor=1. Attention
runs only at 4×4 (4 self-attentions: 1 in AttnDownBlock2D, 1 mid, 2 in AttnUpBlock2D), one head of 64 channels, via
torch's scaled_dot_product_attention.

Train step, as in our benchmark: x0 ~ N(0, 1) of shape (batch, 1, 8, 8) (random, not the digits: the
step costs the same), t uniform in [0, 1000), ε ~ N(0, 1), x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε with DDPM's linear
β schedule 1e-4 … 0.02 over 1000 steps; loss = MSE(model(x_t, t).sample, ε); Adam(lr=1e-3). Step =
zero_grad, sampling t/ε and forming x_t, forward, loss, backward, optimizer.step. torch's Adam defaults
(betas (0.9, 0.999), eps 1e-8) are our config's; unlike ours: no gradient clipping, learning-rate
schedule or parameter EMA (all cost little). Both sides reuse one x0 batch for every step.
Float32 on CPU, `torch.set_num_threads(os.cpu_count())` (`--threads` overrides it; with every core taken
and another process busy, PyTorch's OpenMP threads wait on each other and small ops get many times slower).
After `--warmup` untimed steps, each of `--steps` steps is timed to completion (on CUDA the step ends with
a synchronize).
"""
from __future__ import annotations

import argparse
import json
import os
from importlib import metadata

from peer_timing import time_steps, train_step  # this script's folder is on sys.path

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel

NUM_TIMESTEPS = 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed train steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--batch", type=int, default=64, help="images per step")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: os.cpu_count())")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.batch < 1 or args.threads < 0:
        parser.error("--steps and --batch must be ≥ 1, --warmup and --threads ≥ 0")

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    model = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64),
                        layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                        attention_head_dim=64, dropout=0.1).to(device)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    betas = torch.linspace(1e-4, 0.02, NUM_TIMESTEPS, dtype=torch.float64)
    alpha_bar = torch.cumprod(1.0 - betas, dim=0).to(device=device, dtype=torch.float32)
    x0 = torch.randn(args.batch, 1, 8, 8, device=device)

    def loss_fn():
        t = torch.randint(0, NUM_TIMESTEPS, (args.batch,), device=device)
        eps = torch.randn_like(x0)
        ab = alpha_bar[t].view(-1, 1, 1, 1)
        x_t = ab.sqrt() * x0 + (1.0 - ab).sqrt() * eps
        return F.mse_loss(model(x_t, t).sample, eps)

    step = train_step(optimizer, loss_fn, device)
    timing = time_steps(step, warmup=args.warmup, steps=args.steps)
    median, loss = timing.pop("median_s"), timing.pop("loss")
    print(json.dumps({
        "peer": "diffusers", "version": metadata.version("diffusers"), "torch": torch.__version__,
        "device": device.type, "threads": threads, "batch": args.batch,
        **timing,
        "images_per_sec": args.batch / median, "params": params, "loss": loss,
    }), flush=True)


if __name__ == "__main__":
    main()
