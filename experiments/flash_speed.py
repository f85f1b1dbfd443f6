r"""Throughput of quadratic GAU vs FLASH (and the Performer baseline) as the sequence grows.

Question: FLASH's mixed chunk attention is linear in n (arXiv 2202.10447): from which length does it
beat quadratic GAU on this hardware, and by how much at 8192?

Each model (4 layers, d=128, e=256, s=64 — the length-generalisation study's size — causal, float32)
processes 8192 tokens per batch: 16 sequences of 512, …, 1 of 8192. Timed: the jitted forward pass
(inference) and the jitted gradient of the LM loss (training's compute), median of `repeats` runs
after one compiling run. FLASH uses C = 256, as the paper.

Run:

  python -m experiments.flash_speed
  python -m experiments.flash_speed --config.lengths="(512, 1024)" --config.repeats=5

Result: not yet final. The study's run was still going when the session that wrote this file ended;
partial numbers are in the issue notes, and this section gets the table from a complete run.
"""
from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from models.gau import GAUConfig, GAULanguageModel

MODELS = {
    "gau": {"attention": "gau", "normalizer": "softmax"},
    "flash": {"attention": "flash", "normalizer": "relu2_paper"},
    "performer": {"attention": "performer", "normalizer": "softmax"},
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.lengths = (512, 1024, 2048, 4096, 8192)
    config.tokens_per_batch = 8192
    config.repeats = 3
    config.models = tuple(MODELS)
    config.chunk_size = 256
    config.num_layers, config.embed_dim, config.key_dim = 4, 128, 64
    if arg == "quick":
        config.lengths, config.tokens_per_batch, config.repeats = (64, 128), 256, 1
        config.chunk_size, config.num_layers, config.embed_dim, config.key_dim = 32, 1, 32, 16
    elif arg is not None:
        raise ValueError(f"unknown variant {arg!r} of experiments/flash_speed.py; expected None or 'quick'")
    return config


def _median_seconds(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def tokens_per_second(config, model_name: str, length: int) -> tuple[float, float]:
    """(forward tokens/s, forward+backward tokens/s) at `length`."""
    cfg = GAUConfig(num_layers=config.num_layers, embed_dim=config.embed_dim, key_dim=config.key_dim,
                    chunk_size=config.chunk_size, train_length=length, **MODELS[model_name])
    model = GAULanguageModel(cfg)
    batch = max(1, config.tokens_per_batch // length)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (batch, length + 1), 0, 256)
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(1), tokens[:1, :8])["params"])

    def loss(params, tokens):
        logits = model.apply({"params": params}, tokens[:, :-1])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]))

    forward = jax.jit(lambda p, t: model.apply({"params": p}, t[:, :-1]))
    backward = jax.jit(jax.grad(loss))
    count = batch * length
    return (count / _median_seconds(forward, params, tokens, repeats=config.repeats),
            count / _median_seconds(backward, params, tokens, repeats=config.repeats))


def run(config: ml_collections.ConfigDict) -> str:
    start = time.time()
    header = "| model | " + " | ".join(f"n={n}" for n in config.lengths) + " |"
    tables = {"forward": [header, "|---|" + "---|" * len(config.lengths)],
              "forward+backward": [header, "|---|" + "---|" * len(config.lengths)]}
    for name in config.models:
        rates = [tokens_per_second(config, name, n) for n in config.lengths]
        for i, key in enumerate(tables):
            tables[key].append(f"| {name} | " + " | ".join(f"{r[i]:,.0f}" for r in rates) + " |")
        print(name, [tuple(round(x) for x in r) for r in rates], flush=True)
    return "\n\n".join(f"Tokens/s, {key} ({config.tokens_per_batch} tokens per batch):\n\n" + "\n".join(lines)
                       for key, lines in tables.items()) + (
        f"\n\n{jax.device_count()} {jax.devices()[0].platform} device(s); total {time.time() - start:.0f} s.")


def main(argv: list[str]) -> None:
    del argv
    print(run(_CONFIG.value))


if __name__ == "__main__":
    from absl import app
    from ml_collections import config_flags

    # Defined here, not at import: config_flags re-imports this file to call get_config.
    _CONFIG = config_flags.DEFINE_config_file("config", default=__file__, help_string="experiment config")
    app.run(main)
