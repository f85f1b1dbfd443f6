"""The train state and how it is initialised: parameters, optimizer state, EMA, step and RNG.

The state is first built with the parameters in their logical boxes (`boxed_init`), so that one
`jax.eval_shape` gives every array's shape *and* logical names (`train_lib.sharding.state_shardings`);
the arrays the trainer holds are the same tree unboxed (`init`).
"""
from __future__ import annotations

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """Everything that must be checkpointed to resume a run exactly."""

    step: jax.Array  # int32 scalar: optimizer steps taken (= batches consumed)
    params: Any
    opt_state: Any
    ema_params: Any  # None when ema_decay == 0
    rng: jax.Array  # base key; step t uses fold_in(rng, t), so resuming needs no RNG bookkeeping


def boxed_init(rng: jax.Array, batch: dict[str, jax.Array], *, task, optimizer: optax.GradientTransformation,
               ema: bool) -> TrainState:
    """The initial state with the parameters, and everything optax and the EMA derive from them, still in
    their `nn.Partitioned` boxes."""
    params_rng, state_rng = jax.random.split(rng)
    params = task.init_params(params_rng, batch)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      ema_params=jax.tree.map(jnp.copy, params) if ema else None, rng=state_rng)


def unbox(tree: Any) -> Any:
    """The arrays of `tree` without their logical boxes. Unlike `nn.unbox` this adds no sharding constraint
    (the jitted init's output shardings place every array), so a box whose array has fewer dimensions than
    its names (Adafactor's factored moments) is fine."""
    return jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, tree,
                        is_leaf=lambda x: isinstance(x, nn.Partitioned))


def init(rng: jax.Array, batch: dict[str, jax.Array], *, task, optimizer, ema: bool) -> TrainState:
    """The initial state, unboxed: what the trainer jits with the state's shardings as outputs."""
    return unbox(boxed_init(rng, batch, task=task, optimizer=optimizer, ema=ema))


def abstract_boxed(task, optimizer, *, ema: bool, batch_size: int, seed: int = 0) -> TrainState:
    """`jax.eval_shape` of `boxed_init` for a global batch of `batch_size`: shapes and names, nothing allocated."""
    init_fn = functools.partial(boxed_init, task=task, optimizer=optimizer, ema=ema)
    return jax.eval_shape(init_fn, jax.random.PRNGKey(seed), task.batch_spec(batch_size))
