"""Optimizers by name (`optimizer.name`), the learning-rate schedule and the parameter EMA.

Every optimizer is optax's, behind global-norm clipping, with the same schedule and decoupled weight
decay on matrices only (`weight_decay_mask`). Each reads its own hyperparameters from `config.optimizer`;
`experiments/common.py` writes each one's block (presets ':adamw', ':adafactor', ':sgd', ':lion').

  adamw      b1, b2, eps (Loshchilov & Hutter, arXiv 1711.05101)
  adafactor  decay_rate, eps, min_dim_size_to_factor, multiply_by_parameter_scale (Shazeer & Stern,
             arXiv 1804.04235): factored second moments, a row and a column vector per large matrix
  sgd        momentum, nesterov
  lion       b1, b2 (Chen et al., arXiv 2302.06675)
"""
from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from train_lib.config_lib import ConfigError, typed

# Only matrices that multiply activations are decayed: not biases, norm scales or scale-offsets.
_DECAYED_LEAVES = frozenset({"kernel", "embedding"})


def learning_rate_schedule(opt, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to `learning_rate`, then cosine decay to `end_lr_factor × learning_rate`.

    `opt` is `config.optimizer`; a non-positive or non-finite rate and a warm-up longer than `total_steps`
    are refused.
    """
    lr = float(typed(opt, "learning_rate", (int, float)))
    warmup = typed(opt, "warmup_steps", int)
    end_factor = float(typed(opt, "end_lr_factor", (int, float)))
    if not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"config: 'optimizer.learning_rate' must be a positive finite number, got {lr}")
    if not 0 <= warmup <= total_steps:
        raise ConfigError(f"config: 'optimizer.warmup_steps' {warmup} must be in 0..total_steps ({total_steps}); "
                          "a longer warm-up never reaches the peak learning rate")
    if not 0 <= end_factor <= 1:
        raise ConfigError(f"config: 'optimizer.end_lr_factor' must be in [0, 1], got {end_factor}")
    return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=lr, warmup_steps=warmup,
                                              decay_steps=max(total_steps, warmup + 1), end_value=lr * end_factor)


def weight_decay_mask(params: Any) -> Any:
    """True for leaves named 'kernel' or 'embedding' (logical boxes count as leaves)."""
    def decayed(path, _):
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        names = [n for n in names if n != "value"]  # the field of an nn.Partitioned box
        return bool(names) and names[-1] in _DECAYED_LEAVES
    return jax.tree_util.tree_map_with_path(decayed, params, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _adamw(opt, schedule, weight_decay):
    return optax.adamw(schedule, b1=typed(opt, "b1", (int, float)), b2=typed(opt, "b2", (int, float)),
                       eps=typed(opt, "eps", (int, float)), weight_decay=weight_decay, mask=weight_decay_mask)


def _adafactor(opt, schedule, weight_decay):
    return optax.adafactor(schedule, decay_rate=typed(opt, "decay_rate", (int, float)),
                           eps=typed(opt, "eps", (int, float)),
                           min_dim_size_to_factor=typed(opt, "min_dim_size_to_factor", int),
                           multiply_by_parameter_scale=typed(opt, "multiply_by_parameter_scale", bool),
                           weight_decay_rate=weight_decay or None, weight_decay_mask=weight_decay_mask)


def _sgd(opt, schedule, weight_decay):
    momentum = typed(opt, "momentum", (int, float))
    return optax.chain(optax.add_decayed_weights(weight_decay, mask=weight_decay_mask),
                       optax.sgd(schedule, momentum=momentum or None, nesterov=typed(opt, "nesterov", bool)))


def _lion(opt, schedule, weight_decay):
    return optax.lion(schedule, b1=typed(opt, "b1", (int, float)), b2=typed(opt, "b2", (int, float)),
                      weight_decay=weight_decay, mask=weight_decay_mask)


OPTIMIZERS: dict[str, Callable] = {"adamw": _adamw, "adafactor": _adafactor, "sgd": _sgd, "lion": _lion}
# Each optimizer's own keys in `config.optimizer`, besides name, learning_rate, warmup_steps, end_lr_factor,
# weight_decay and grad_clip_norm.
OWN_KEYS: dict[str, tuple[str, ...]] = {
    "adamw": ("b1", "b2", "eps"),
    "adafactor": ("decay_rate", "eps", "min_dim_size_to_factor", "multiply_by_parameter_scale"),
    "sgd": ("momentum", "nesterov"),
    "lion": ("b1", "b2"),
}


def make_optimizer(opt, total_steps: int, schedule: optax.Schedule | None = None) -> optax.GradientTransformation:
    """Global-norm clipping (`grad_clip_norm` > 0), then optimizer `opt.name` with the schedule
    (`learning_rate_schedule(opt, total_steps)` unless given).

    `opt` is `config.optimizer`. The AdamW chain is the one the checkpoints of earlier runs hold.
    """
    name = typed(opt, "name", str)
    if name not in OPTIMIZERS:
        raise ConfigError(f"config: 'optimizer.name' is {name!r}; expected one of {sorted(OPTIMIZERS)}")
    missing = [key for key in OWN_KEYS[name] if key not in opt]
    if missing:
        raise ConfigError(f"config: optimizer.name={name!r} needs {', '.join(f'optimizer.{k}' for k in missing)}, "
                          f"which this config lacks; choose the optimizer with its preset instead (e.g. "
                          f"--config=experiments/gau_lm.py:tiny,{name}), which writes its keys")
    clip = float(typed(opt, "grad_clip_norm", (int, float)))
    weight_decay = float(typed(opt, "weight_decay", (int, float)))
    if clip < 0 or weight_decay < 0:
        raise ConfigError(f"config: 'optimizer.grad_clip_norm' ({clip}) and 'optimizer.weight_decay' "
                          f"({weight_decay}) must be non-negative (0 turns them off)")
    schedule = schedule or learning_rate_schedule(opt, total_steps)
    chain = [optax.clip_by_global_norm(clip)] if clip > 0 else []
    return optax.chain(*chain, OPTIMIZERS[name](opt, schedule, weight_decay))


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
    """Warm-up-aware EMA decay `min(decay, (1 + t) / (10 + t))`: early averages forget the random init."""
    step = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def update_ema(ema_params: Any, params: Any, step: jax.Array, decay: float) -> Any:
    d = ema_decay_at(step, decay)
    return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema_params, params)
