"""Device mesh, logical-to-mesh shardings and global batches (after flax `examples/lm1b/utils.py`).

Models name their parameter and activation axes logically ('embed', 'expand', 'batch', ...); the
config's `logical_axis_rules` maps those names to the mesh axes ('data', 'fsdp', 'model'). Data
parallelism, FSDP and tensor parallelism are therefore a config edit: a mesh axis of size 1 shards nothing.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from train_lib.config_lib import MESH_AXES, ConfigError

log = logging.getLogger(__name__)

Rules = Sequence[tuple[str, Any]]


def make_mesh(mesh_shape: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'model') mesh over `devices` (default: all devices), laid out by `jax.make_mesh` so
    that 'model', the innermost axis, spans the most closely connected devices (a TPU's ICI neighbours).
    `devices` may be another machine's (`train_lib.pods`: a TPU topology's, to compile for it here)."""
    shape = tuple(mesh_shape[axis] for axis in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def logical_shardings(abstract_boxed: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a tree of (boxed, logically annotated) abstract values."""
    specs = nn.get_partition_spec(abstract_boxed)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def _is_box(x) -> bool:
    return isinstance(x, nn.Partitioned)


def state_shardings(boxed_state: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings of every array of a train state whose parameters are logical boxes.

    `boxed_state` is `jax.eval_shape` of an init that keeps the boxes (`train_lib.state.boxed_init`):
    optax builds its state with `tree_map` over the parameters, and the EMA is a copy, so every moment,
    trace and average sits in a box with its parameter's logical names (flax lm1b's recipe). Leaves
    outside boxes (step, RNG key, counts) are replicated. A box whose array has fewer dimensions than
    its names is a reduced statistic of its parameter, such as Adafactor's factored second moments
    (one row and one column vector per matrix): it keeps the names of the parameter's dimensions it
    still has, matched by size in order (`_kept_names`); a placeholder of size 1 is replicated.
    """
    params = {path: box.value.shape for path, box in _boxes_with_path(boxed_state.params)}

    def spec(path, leaf):
        if not _is_box(leaf):
            return PartitionSpec()
        names, shape = tuple(leaf.names), tuple(leaf.value.shape)
        param_shape = _parameter_shape(tuple(path), params)
        if len(names) != len(shape) or (param_shape is not None and shape != param_shape):
            names = _kept_names(names, shape, param_shape, jax.tree_util.keystr(path))
        return nn.logical_to_mesh_axes(names, rules)

    specs = jax.tree_util.tree_map_with_path(spec, boxed_state, is_leaf=_is_box)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def _boxes_with_path(tree):
    return [(tuple(p), leaf) for p, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=_is_box)
            if _is_box(leaf)]


def _parameter_shape(path: tuple, params: dict[tuple, tuple]) -> tuple | None:
    """The shape of the parameter whose key path ends `path` (the longest such suffix), or None."""
    for start in range(len(path)):
        if path[start:] in params:
            return params[path[start:]]
    return None


def _kept_names(names: tuple, shape: tuple, param_shape: tuple | None, where: str) -> tuple:
    """Logical names for an array of `shape` holding a reduction of a parameter of `param_shape`."""
    if math.prod(shape) <= 1 or param_shape is None:
        return (None,) * len(shape)
    kept, start = [], 0
    for size in shape:  # the first parameter dimension of each size, in order
        index = next((i for i in range(start, len(param_shape)) if param_shape[i] == size), None)
        if index is None:
            log.warning("optimizer state %s %s is not a reduction of its parameter %s: replicated", where,
                        shape, param_shape)
            return (None,) * len(shape)
        kept.append(names[index])
        start = index + 1
    return tuple(kept)


def check_divisible(abstract: Any, shardings: Any, mesh: Mesh) -> None:
    """Each sharded dimension must divide evenly over its mesh axes; names the array if not."""
    flat_values = jax.tree_util.tree_flatten_with_path(abstract)[0]
    flat_shardings = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, value), sharding in zip(flat_values, flat_shardings):
        for dim, axes in zip(value.shape, sharding.spec):
            axes = (axes,) if isinstance(axes, str) else (axes or ())
            ways = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
            if dim % ways:
                name = jax.tree_util.keystr(path)
                raise ConfigError(f"config: {name} has a dimension of {dim}, which mesh axes {axes} "
                                  f"cannot split {ways} ways; change the model size or the mesh")


def host_local(tree: Any) -> Any:
    """The full value of every array of `tree` as NumPy on this host. Every process must call it: arrays
    spread over several processes are gathered (`multihost_utils.process_allgather`, a collective)."""
    from jax.experimental import multihost_utils

    def local(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)
    return jax.tree.map(local, tree)


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int) -> NamedSharding:
    """Sharding of a batch array: first axis over the logical 'batch' mesh axes, the rest replicated."""
    spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules)
    return NamedSharding(mesh, spec)


def local_rows(sharding: NamedSharding, global_batch: int) -> tuple[int, int]:
    """The contiguous rows `[start, stop)` of a global batch that this process's devices hold."""
    index_map = sharding.addressable_devices_indices_map((global_batch,))
    starts = [idx[0].start or 0 for idx in index_map.values()]
    stops = [global_batch if idx[0].stop is None else idx[0].stop for idx in index_map.values()]
    start, stop = min(starts), max(stops)
    if sum(b - a for a, b in {(a, b) for a, b in zip(starts, stops)}) != stop - start:
        raise ConfigError("mesh: this process's devices hold non-contiguous batch rows; put the 'data' and "
                          "'fsdp' axes outermost in the device order")
    return start, stop


def make_global_batch(local_batch: dict[str, np.ndarray], shardings: dict[str, NamedSharding],
                      global_batch: int) -> dict[str, jax.Array]:
    """Assembles each process's rows into global arrays (`jax.make_array_from_process_local_data`)."""
    return {key: jax.make_array_from_process_local_data(shardings[key], value, (global_batch,) + value.shape[1:])
            for key, value in local_batch.items()}
