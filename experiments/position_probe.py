r"""The zeros → positions probe of post 9105 (https://kexue.fm/archives/9105).

Question: can a bidirectional gated-attention encoder whose *only* position information is relative
(RoPE inside attention) recover absolute positions? The input is n identical tokens (all zeros) and
the target at position i is i itself (n classes). With a row-normalised softmax every row averages
identical values, so every output is the same and accuracy is at most 1/n, whatever RoPE does to the
weights. relu²/l (rows need not sum to one) and the l2 normaliser (rows have unit ℓ2 norm, so the sum
varies with how peaked the row is) let the boundary of the sequence leak into the output: the post
says they solve it. Learned absolute positions solve it trivially.

Variants: rope_softmax, rope_relu2, rope_l2, absolute (learned table, softmax). 2 GAU layers, d=64,
s=32, n=64, γ = 1 at init for Q and K, Adam 3e-3, 2000 full-batch steps (the batch is the one
all-zeros sequence).

Run (3 min 15 s wall, 73 s of CPU, on the 2-core CPU shared with other jobs):

  python -m experiments.position_probe
  python -m experiments.position_probe --config.length=128 --config.steps=4000

Result of `python -m experiments.position_probe` (accuracy after 2000 steps; chance 1/64 = 0.016):

  | probe | accuracy, mean [min, max] | seeds 0, 1, 2 |
  |---|---|---|
  | rope_softmax | 0.016 [0.016, 0.016] | 0.016, 0.016, 0.016 |
  | rope_relu2 | 0.823 [0.656, 1.000] | 0.812, 0.656, 1.000 |
  | rope_l2 | 0.958 [0.906, 0.984] | 0.984, 0.984, 0.906 |
  | absolute | 1.000 [1.000, 1.000] | 1.000, 1.000, 1.000 |

Reading: as post 9105 argues, RoPE + softmax is stuck at chance exactly (every output is the same
vector, whatever the weights), while relu²/l and the l2 normaliser recover most positions from the
sequence boundary alone; l2 more reliably than relu² here. They are still learning at 2000 steps
(600 steps gave 0.62 and 0.47 on average), and learned absolute positions solve the probe at once.
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

PROBES = {
    "rope_softmax": {"position": "rope", "normalizer": "softmax"},
    "rope_relu2": {"position": "rope", "normalizer": "relu2"},
    "rope_l2": {"position": "rope", "normalizer": "l2"},
    "absolute": {"position": "learned", "normalizer": "softmax"},
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Default config; 'quick' is a seconds-long smoke run."""
    config = ml_collections.ConfigDict()
    config.length = 64
    config.steps = 2000
    config.learning_rate = 3e-3
    config.seeds = (0, 1, 2)
    config.probes = tuple(PROBES)
    config.num_layers = 2
    config.embed_dim = 64
    config.key_dim = 32
    config.qk_scale_init = "ones"  # relu² cannot learn from γ ~ N(0, 0.02²): see models/layers.ScaleOffset
    if arg == "quick":
        config.length, config.steps, config.seeds = 16, 20, (0,)
    elif arg is not None:
        raise ValueError(f"unknown variant {arg!r} of experiments/position_probe.py; expected None or 'quick'")
    return config


def probe_accuracy(config: ml_collections.ConfigDict, probe: str, seed: int) -> float:
    """Trains the probe from scratch; returns the fraction of positions whose argmax is the position."""
    n = config.length
    cfg = GAUConfig(vocab_size=n, num_layers=config.num_layers, embed_dim=config.embed_dim, key_dim=config.key_dim,
                    causal=False, max_positions=n, train_length=n, qk_scale_init=config.qk_scale_init,
                    **PROBES[probe])
    model = GAULanguageModel(cfg)
    zeros, targets = jnp.zeros((1, n), jnp.int32), jnp.arange(n)[None]
    params = nn.unbox(model.init(jax.random.PRNGKey(seed), zeros)["params"])
    optimizer = optax.adam(config.learning_rate)

    def loss_fn(params):
        logits = model.apply({"params": params}, zeros)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets)), logits

    @jax.jit
    def train(params):
        def step(carry, _):
            params, opt_state = carry
            grads = jax.grad(lambda p: loss_fn(p)[0])(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None
        (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), None, length=config.steps)
        return jnp.mean(jnp.argmax(loss_fn(params)[1], -1) == targets)

    return float(train(params))


def run(config: ml_collections.ConfigDict) -> str:
    from train_lib import config_lib
    config_lib.check_study(config, choices={"probes": PROBES}, positive=(
        "length", "steps", "learning_rate", "num_layers", "embed_dim", "key_dim"))
    start = time.time()
    lines = [f"Accuracy of predicting the position from {config.length} zeros (chance 1/{config.length} = "
             f"{1 / config.length:.3f}), {config.steps} Adam steps; mean, [min, max] over seeds {tuple(config.seeds)}:",
             "", "| probe | accuracy | per seed |", "|---|---|---|"]
    for probe in config.probes:
        accuracies = [probe_accuracy(config, probe, seed) for seed in config.seeds]
        lines.append(f"| {probe} | {np.mean(accuracies):.3f} [{min(accuracies):.3f}, {max(accuracies):.3f}] | "
                     + ", ".join(f"{a:.3f}" for a in accuracies) + " |")
        print(lines[-1], flush=True)
    lines += ["", f"Total {time.time() - start:.0f} s."]
    return "\n".join(lines)


if __name__ == "__main__":
    from train_lib import cli

    cli.run_study(__file__, run)
