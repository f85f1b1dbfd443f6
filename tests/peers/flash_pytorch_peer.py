"""Speed peer: one train step of FLASH-pytorch's `FLASHTransformer` (PyTorch), timed on this machine.

Runs under the peers' own PyTorch venv, not the project's (it imports torch only, never jax):

    make peers-venv
    .venv-peers/bin/python tests/peers/flash_pytorch_peer.py --steps 10
    .venv/bin/python tests/peers/compare.py flash      # alternates this and our `flash_peer` benchmark

Not part of `make test` (pytest.ini ignores tests/peers). Prints one JSON line:

    {"peer": "FLASH-pytorch", "version", "torch", "threads", "step_ms" (median), "step_ms_min",
     "step_ms_max", "tokens_per_sec" (batch × length / median seconds), "params"}

The model (FLASH-pytorch 0.1.9, lucidrains; arXiv 2202.10447) matches experiments/gau_lm.py:flash_peer:

    FLASHTransformer(num_tokens=256, dim=256, depth=4, group_size=128, query_key_dim=128,
                     expansion_factor=2.0, causal=True)

and keeps the package's defaults for everything else, which are:
  * attn_dropout=0.0, norm_type='scalenorm' (pre-norm ScaleNorm, one learned gain per layer),
    shift_tokens=True (half of the normed features shifted one position), laplace_attn_fn=False
    (relu²(q·k / group_size) in the quadratic part), reduce_group_non_causal_attn=True (unused when causal);
  * positions: a scaled sinusoidal absolute embedding added to the token embedding, partial rotary
    embeddings (rotary-embedding-torch `RotaryEmbedding(dim=min(32, query_key_dim)=32)`, theta 10000) on the
    four query/key variants, and a T5 relative-position bias (32 buckets, max distance 128, scale
    √query_key_dim) inside each group;
  * per layer: to_hidden Linear(dim, 2·hidden)+SiLU, to_qk Linear(dim, query_key_dim)+SiLU, OffsetScale with
    4 heads (quadratic/linear × query/key), to_out Linear(hidden, dim), residual; causal linear attention
    over groups by an exclusive cumulative sum; output LayerNorm + untied Linear to the 256 logits.

Train step, as in our benchmark: random byte tokens of shape (batch, length + 1), input the first
`length`, next-token cross-entropy on the last `length`; AdamW with our config's hyperparameters
(lr 2e-3, betas (0.9, 0.98), eps 1e-9, weight decay 0.01). Step = zero_grad, forward, loss, backward,
optimizer.step. Unlike ours: no gradient clipping, learning-rate schedule or parameter EMA (all cost little).
Float32 on CPU, `torch.set_num_threads(os.cpu_count())` (`--threads` overrides it; with every core taken
and another process busy, PyTorch's OpenMP threads wait on each other and small ops get many times slower).
After `--warmup` untimed steps, each of `--steps` steps is timed to completion (CPU ops are synchronous; on
CUDA the step ends with a synchronize).
"""
from __future__ import annotations

import argparse
import json
import os
from importlib import metadata

from peer_timing import time_steps, train_step  # this script's folder is on sys.path

import torch
import torch.nn.functional as F
from flash_pytorch import FLASHTransformer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed train steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512, help="input tokens per sequence")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: os.cpu_count())")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.batch < 1 or args.length < 1 or args.threads < 0:
        parser.error("--steps, --batch and --length must be ≥ 1, --warmup and --threads ≥ 0")

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    model = FLASHTransformer(num_tokens=256, dim=256, depth=4, group_size=128, query_key_dim=128,
                             expansion_factor=2.0, causal=True).to(device)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.01)
    tokens = torch.randint(0, 256, (args.batch, args.length + 1), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def loss_fn():
        logits = model(inputs)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    step = train_step(optimizer, loss_fn, device)
    timing = time_steps(step, warmup=args.warmup, steps=args.steps)
    median, loss = timing.pop("median_s"), timing.pop("loss")
    print(json.dumps({
        "peer": "FLASH-pytorch", "version": metadata.version("FLASH-pytorch"), "torch": torch.__version__,
        "device": device.type, "threads": threads, "batch": args.batch, "length": args.length,
        **timing,
        "tokens_per_sec": args.batch * args.length / median, "params": params, "loss": loss,
    }), flush=True)


if __name__ == "__main__":
    main()
