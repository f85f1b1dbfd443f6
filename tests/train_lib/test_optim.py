"""Optimizer pieces against closed forms: schedule, weight-decay mask, warm-up-aware EMA."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tests.train_lib.conftest import make_config
from train_lib import optim


def test_schedule_is_linear_warmup_then_cosine_to_end_factor():
    config = make_config(total_steps=100, optimizer__learning_rate=1e-3, optimizer__warmup_steps=10)
    schedule = optim.learning_rate_schedule(config)
    end = 1e-3 * config.optimizer.end_lr_factor
    for step in (0, 5, 10):
        np.testing.assert_allclose(schedule(step), 1e-3 * step / 10, rtol=1e-6)
    for step in (10, 40, 100):
        cosine = 0.5 * (1 + math.cos(math.pi * (step - 10) / 90))
        np.testing.assert_allclose(schedule(step), end + (1e-3 - end) * cosine, rtol=1e-5)


def test_weight_decay_touches_only_kernels_and_embeddings():
    params = {"layer": {"uv": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
                        "qk_scale_offset": {"gamma": jnp.ones((2, 2))}, "norm": {"scale": jnp.ones(2)}},
              "embed": {"embedding": jnp.ones((3, 2))}}
    mask = optim.weight_decay_mask(params)
    assert mask["layer"]["uv"] == {"kernel": True, "bias": False}
    assert not mask["layer"]["qk_scale_offset"]["gamma"] and not mask["layer"]["norm"]["scale"]
    assert mask["embed"]["embedding"]
    # With zero gradients, AdamW changes only the masked leaves, by -lr·wd·p.
    config = make_config(optimizer__weight_decay=0.5, optimizer__warmup_steps=0, optimizer__grad_clip_norm=0.0)
    tx = optim.make_optimizer(config)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    lr = float(optim.learning_rate_schedule(config)(0))
    np.testing.assert_allclose(updates["embed"]["embedding"], -lr * 0.5 * np.ones((3, 2)), rtol=1e-6)
    np.testing.assert_array_equal(updates["layer"]["uv"]["bias"], 0.0)


def test_ema_decay_warms_up_then_saturates():
    for step, expected in [(0, 0.1), (10, 11 / 20), (10_000, 0.999)]:
        np.testing.assert_allclose(optim.ema_decay_at(jnp.asarray(step), 0.999), expected, rtol=1e-6)
    ema = optim.update_ema({"w": jnp.zeros(2)}, {"w": jnp.ones(2)}, jnp.asarray(0), 0.999)
    np.testing.assert_allclose(ema["w"], 0.9, rtol=1e-6)  # (1 - 0.1) of the new parameters
    assert isinstance(optax.global_norm(ema), jax.Array)
