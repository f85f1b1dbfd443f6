"""Optimizer, learning-rate schedule and parameter EMA, built from `config.optimizer`."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

# Only matrices that multiply activations are decayed: not biases, norm scales or scale-offsets.
_DECAYED_LEAVES = frozenset({"kernel", "embedding"})


def learning_rate_schedule(config) -> optax.Schedule:
    """Linear warm-up from 0 to `learning_rate`, then cosine decay to `end_lr_factor × learning_rate`."""
    opt = config.optimizer
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt.learning_rate, warmup_steps=opt.warmup_steps,
        decay_steps=max(config.total_steps, opt.warmup_steps + 1),
        end_value=opt.learning_rate * opt.end_lr_factor)


def weight_decay_mask(params: Any) -> Any:
    """True for leaves named 'kernel' or 'embedding'."""
    def decayed(path, _):
        last = path[-1]
        return getattr(last, "key", getattr(last, "name", None)) in _DECAYED_LEAVES
    return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(config) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with the schedule and the weight-decay mask."""
    opt = config.optimizer
    chain = []
    if opt.grad_clip_norm > 0:
        chain.append(optax.clip_by_global_norm(opt.grad_clip_norm))
    chain.append(optax.adamw(learning_rate_schedule(config), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                             weight_decay=opt.weight_decay, mask=weight_decay_mask))
    return optax.chain(*chain)


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
    """Warm-up-aware EMA decay `min(decay, (1 + t) / (10 + t))`: early averages forget the random init."""
    step = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def update_ema(ema_params: Any, params: Any, step: jax.Array, decay: float) -> Any:
    d = ema_decay_at(step, decay)
    return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema_params, params)
