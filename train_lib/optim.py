"""Optimizers by name (`optimizer.name`), the learning-rate schedule and the parameter EMA.

Every optimizer is optax's, behind global-norm clipping, with the same schedule and decoupled weight
decay on matrices only (`weight_decay_mask`). Each reads its own hyperparameters from `config.optimizer`;
`experiments/common.py` writes each one's block (presets ':adamw', ':adafactor', ':sgd', ':lion').

  adamw      b1, b2, eps (Loshchilov & Hutter, arXiv 1711.05101)
  adafactor  decay_rate, eps, min_dim_size_to_factor, multiply_by_parameter_scale (Shazeer & Stern,
             arXiv 1804.04235): factored second moments, a row and a column vector per large matrix
  sgd        momentum, nesterov
  lion       b1, b2 (Chen et al., arXiv 2302.06675)
  adamax     b1, b2, eps (Kingma & Ba, arXiv 1412.6980 §7.1: Adam with the infinity norm; NVAE trains with it)

Freezing: `optimizer.trainable`, a tuple of regular expressions over parameter names ('encoder/layer_3/mlp/
output/kernel'; `re.fullmatch`), trains only the parameters one matches (empty: all). The rest get
`optax.set_to_zero()` through `optax.multi_transform`, so they hold no optimizer state and are stored once,
in the parameters; clipping and weight decay see the trainable ones only; and the trainer differentiates the
loss with respect to the trainable parameters alone (`restricted_value_and_grad`), so backpropagation stops
where the last frozen parameter's input no longer depends on a trainable one (Ladder Side-Tuning's point,
https://kexue.fm/archives/9138).
"""
from __future__ import annotations

import math
import re
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


def _adamax(opt, schedule, weight_decay):
    # Decoupled weight decay as in AdamW: added to the Adamax direction, then scaled by the learning rate.
    return optax.chain(optax.scale_by_adamax(b1=typed(opt, "b1", (int, float)), b2=typed(opt, "b2", (int, float)),
                                             eps=typed(opt, "eps", (int, float))),
                       optax.add_decayed_weights(weight_decay, mask=weight_decay_mask),
                       optax.scale_by_learning_rate(schedule))


OPTIMIZERS: dict[str, Callable] = {"adamw": _adamw, "adafactor": _adafactor, "sgd": _sgd, "lion": _lion,
                                   "adamax": _adamax}
# Each optimizer's own keys in `config.optimizer`, besides name, learning_rate, warmup_steps, end_lr_factor,
# weight_decay and grad_clip_norm.
OWN_KEYS: dict[str, tuple[str, ...]] = {
    "adamw": ("b1", "b2", "eps"),
    "adafactor": ("decay_rate", "eps", "min_dim_size_to_factor", "multiply_by_parameter_scale"),
    "sgd": ("momentum", "nesterov"),
    "lion": ("b1", "b2"),
    "adamax": ("b1", "b2", "eps"),
}


def trainable_patterns(opt) -> tuple[str, ...]:
    """`optimizer.trainable` checked: a tuple of valid regular expressions (empty if the key is absent)."""
    if "trainable" not in opt:
        return ()
    patterns = opt.trainable
    if isinstance(patterns, str) or not isinstance(patterns, (tuple, list)) or not all(
            isinstance(p, str) and p for p in patterns):
        raise ConfigError(f"config: 'optimizer.trainable' is {patterns!r}; expected a tuple of regular expressions "
                          "over parameter names, e.g. ('encoder/layer_\\d+/.*adapter/.*', 'classifier/.*'), or () "
                          "to train every parameter")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ConfigError(f"config: 'optimizer.trainable' pattern {pattern!r} is not a regular expression "
                              f"({error})") from None
    return tuple(patterns)


def _names(params: Any) -> list[str]:
    from train_lib.state import path_name

    leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    return [path_name(path) for path, _ in leaves]


def trainable_mask(params: Any, patterns: tuple[str, ...]) -> Any:
    """A tree like `params` (boxes count as leaves): True where a parameter's name fully matches a pattern."""
    compiled = [re.compile(p) for p in patterns]

    def matches(path, _):
        from train_lib.state import path_name

        name = path_name([k for k in path if getattr(k, "name", None) != "value"])
        return any(c.fullmatch(name) for c in compiled)
    return jax.tree_util.tree_map_with_path(matches, params, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def check_trainable(patterns: tuple[str, ...], params: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts of `params` (shapes suffice) under `patterns`; raises ConfigError
    naming a pattern that matches no parameter, or patterns that leave nothing to train."""
    names = _names(params)
    for pattern in patterns:
        if not any(re.fullmatch(pattern, name) for name in names):
            raise ConfigError(f"config: 'optimizer.trainable' pattern {pattern!r} matches no parameter (names look "
                              f"like {names[0]!r}, {names[-1]!r}; the pattern must match a whole name)")
    mask = jax.tree.leaves(trainable_mask(params, patterns))
    sizes = [math.prod(getattr(leaf, "value", leaf).shape) for leaf in
             jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))]
    return sum(s for s, m in zip(sizes, mask) if m), sum(sizes)


def freeze(tx: optax.GradientTransformation, patterns: tuple[str, ...]) -> optax.GradientTransformation:
    """`tx` on the parameters `patterns` match, `optax.set_to_zero()` (no state) on the others."""
    def labels(params):
        return jax.tree.map(lambda m: "train" if m else "frozen", trainable_mask(params, patterns))
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def restricted_value_and_grad(loss_fn: Callable, patterns: tuple[str, ...]) -> Callable:
    """`jax.value_and_grad(loss_fn, has_aux=True)` differentiated with respect to the trainable parameters only;
    the frozen ones' gradients are zeros (which `freeze` discards). `loss_fn(params, batch, rng)`."""
    def value_and_grad(params, batch, rng):
        leaves, treedef = jax.tree_util.tree_flatten(params)
        mask = jax.tree.leaves(trainable_mask(params, patterns))
        trainable = [leaf for leaf, m in zip(leaves, mask) if m]

        def rebuild(trainable_leaves):
            it = iter(trainable_leaves)
            return jax.tree_util.tree_unflatten(treedef, [next(it) if m else leaf for leaf, m in zip(leaves, mask)])

        out, grads = jax.value_and_grad(lambda t: loss_fn(rebuild(t), batch, rng), has_aux=True)(trainable)
        it = iter(grads)
        full = [next(it) if m else jnp.zeros_like(leaf) for leaf, m in zip(leaves, mask)]
        return out, jax.tree_util.tree_unflatten(treedef, full)
    return value_and_grad


def make_optimizer(opt, total_steps: int, schedule: optax.Schedule | None = None) -> optax.GradientTransformation:
    """Global-norm clipping (`grad_clip_norm` > 0), then optimizer `opt.name` with the schedule
    (`learning_rate_schedule(opt, total_steps)` unless given), on the `optimizer.trainable` parameters only
    when that is set (`freeze`).

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
    tx = optax.chain(*chain, OPTIMIZERS[name](opt, schedule, weight_decay))
    patterns = trainable_patterns(opt)
    return freeze(tx, patterns) if patterns else tx


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
    """Warm-up-aware EMA decay `min(decay, (1 + t) / (10 + t))`: early averages forget the random init."""
    step = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def update_ema(ema_params: Any, params: Any, step: jax.Array, decay: float) -> Any:
    d = ema_decay_at(step, decay)
    return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema_params, params)
