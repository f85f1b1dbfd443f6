"""The train state and how it is initialised: parameters, optimizer state, EMA, model state, step and RNG.

The state is first built with the parameters in their logical boxes (`boxed_init`), so that one
`jax.eval_shape` gives every array's shape *and* logical names (`train_lib.sharding.state_shardings`);
the arrays the trainer holds are the same tree unboxed (`init`).
"""
from __future__ import annotations

import functools
import logging
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

log = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
    """Everything that must be checkpointed to resume a run exactly."""

    step: jax.Array  # int32 scalar: optimizer steps taken (= batches consumed)
    params: Any
    opt_state: Any
    ema_params: Any  # None when ema_decay == 0
    rng: jax.Array  # base key; step t uses fold_in(rng, t), so resuming needs no RNG bookkeeping
    # Variables the step updates but does not differentiate (flax collections other than 'params', e.g.
    # BatchNorm's 'batch_stats'): `Task.init_model_state`; None for a task without them.
    model_state: Any = None


def to_checkpoint(state: TrainState) -> dict[str, Any]:
    """The state as the dict a checkpoint holds: its fields by name, without `model_state` when it is None,
    so the checkpoints of runs without model state keep the layout they had before the field existed."""
    fields = {name: getattr(state, name) for name in ("step", "params", "opt_state", "ema_params", "rng")}
    if state.model_state is not None:
        fields["model_state"] = state.model_state
    return fields


def from_checkpoint(tree: dict[str, Any]) -> TrainState:
    """`to_checkpoint`'s inverse."""
    return TrainState(**tree)


def boxed_init(rng: jax.Array, batch: dict[str, jax.Array], *, task, optimizer: optax.GradientTransformation,
               ema: bool) -> TrainState:
    """The initial state with the parameters, and everything optax and the EMA derive from them, still in
    their `nn.Partitioned` boxes."""
    params_rng, state_rng = jax.random.split(rng)
    params = task.init_params(params_rng, batch)
    # The same key as the parameters': a family initialises both from one `model.init` (flax's variables).
    model_state = task.init_model_state(params_rng, batch)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      ema_params=jax.tree.map(jnp.copy, params) if ema else None, rng=state_rng,
                      model_state=model_state)


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


def path_name(path) -> str:
    """'a/b/c' for a pytree key path (the names `with_pretrained` and the tasks' pretrained arrays use)."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def with_pretrained(state: TrainState, pretrained: dict[str, np.ndarray]) -> TrainState:
    """`state` with the parameters named in `pretrained` ('a/b/c' → host array) replaced, in place of their
    initial values, in `params` and the EMA copy; every other parameter keeps its initialisation.

    Every process calls this with the same arrays (each reads the pretrained files), and each array is laid
    out by the parameter's own sharding (`jax.make_array_from_callback`), so it is symmetric across processes.
    Raises ValueError naming an array whose shape differs, or a name the parameters do not have.
    """
    leaves = {path_name(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)}
    unknown = sorted(set(pretrained) - set(leaves))
    if unknown:
        raise ValueError(f"pretrained arrays {unknown[:5]} are not parameters of this model")
    wrong = [f"{name} {tuple(pretrained[name].shape)} vs the model's {tuple(leaves[name].shape)}"
             for name in sorted(pretrained) if tuple(pretrained[name].shape) != tuple(leaves[name].shape)]
    if wrong:
        raise ValueError(f"pretrained array shapes differ from the model's: {'; '.join(wrong[:5])}")

    def replace(path, leaf):
        value = pretrained.get(path_name(path))
        if value is None:
            return leaf
        value = np.asarray(value, leaf.dtype)
        return jax.make_array_from_callback(value.shape, leaf.sharding, lambda index: value[index])

    params = jax.tree_util.tree_map_with_path(replace, state.params)
    ema = None if state.ema_params is None else jax.tree_util.tree_map_with_path(replace, state.ema_params)
    return state.replace(params=params, ema_params=ema)
