"""Device mesh, logical-to-mesh shardings and global batches (after flax `examples/lm1b/utils.py`).

Models name their parameter and activation axes logically ('embed', 'expand', 'batch', ...); the
config's `logical_axis_rules` maps those names to the mesh axes ('data', 'fsdp', 'model'). Data
parallelism, FSDP and tensor parallelism are therefore a config edit: a mesh axis of size 1 shards nothing.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from train_lib.config_lib import MESH_AXES, ConfigError

Rules = Sequence[tuple[str, Any]]


def make_mesh(mesh_shape: dict[str, int]) -> Mesh:
    """A ('data', 'fsdp', 'model') mesh over all devices, in the order that keeps 'model' innermost."""
    shape = tuple(mesh_shape[axis] for axis in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_rules(config) -> tuple[tuple[str, Any], ...]:
    """The config's rules as a tuple of (logical name, mesh axis or axes or None)."""
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in config.logical_axis_rules)


def logical_shardings(abstract_boxed: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a tree of (boxed, logically annotated) abstract values."""
    specs = nn.get_partition_spec(abstract_boxed)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def check_divisible(abstract: Any, shardings: Any, mesh: Mesh) -> None:
    """Each sharded dimension must divide evenly over its mesh axes; names the parameter if not."""
    flat_values = jax.tree_util.tree_flatten_with_path(abstract)[0]
    flat_shardings = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, value), sharding in zip(flat_values, flat_shardings):
        for dim, axes in zip(value.shape, sharding.spec):
            axes = (axes,) if isinstance(axes, str) else (axes or ())
            ways = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
            if dim % ways:
                name = jax.tree_util.keystr(path)
                raise ConfigError(f"config: parameter {name} has a dimension of {dim}, which mesh axes {axes} "
                                  f"cannot split {ways} ways; change the model size or the mesh")


def _path_suffix_map(params: Any, param_shardings: Any) -> dict[tuple, NamedSharding]:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    shard_leaves = jax.tree_util.tree_leaves(param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    return {tuple(path): (leaf.shape, sharding) for (path, leaf), sharding in zip(flat, shard_leaves)}


def mirrored_shardings(tree: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for a tree whose leaves mirror parameters (optimizer moments, EMA): a leaf whose key path
    ends with a parameter's path, and has its shape, gets that parameter's sharding; others are replicated."""
    by_path = _path_suffix_map(params, param_shardings)
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path, leaf):
        path = tuple(path)
        for start in range(len(path)):
            match = by_path.get(path[start:])
            if match is not None and match[0] == getattr(leaf, "shape", None):
                return match[1]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, tree)


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
