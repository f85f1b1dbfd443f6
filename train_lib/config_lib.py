"""Validation of experiment configs and paths, done at the edge before anything compiles.

Every check raises `ConfigError` with one line that names the key or path, what was wrong and what
would be right; `train_lib.main` prints it and exits with status 2, without a traceback.
"""
from __future__ import annotations

import math
import os
import pathlib
import tempfile
from typing import Any

import ml_collections


class ConfigError(ValueError):
    """A bad config value, path or command-line flag, reported to the user in one line."""


# Top-level keys every trainable experiment has, with their expected types.
_REQUIRED_TYPES: dict[str, type | tuple[type, ...]] = {
    "task": str,
    "seed": int,
    "total_steps": int,
    "batch_size": int,
    "log_every_steps": int,
    "eval_every_steps": int,
    "eval_batches": int,
    "checkpoint_every_steps": int,
    "keep_checkpoints": int,
    "grad_accum_steps": int,
    "ema_decay": (int, float),
    "mesh.data": int,
    "mesh.fsdp": int,
    "mesh.model": int,
    "data.path": str,
    "optimizer.learning_rate": (int, float),
    "optimizer.warmup_steps": int,
    "optimizer.weight_decay": (int, float),
    "optimizer.grad_clip_norm": (int, float),
}
_POSITIVE = ("total_steps", "batch_size", "log_every_steps", "eval_every_steps", "checkpoint_every_steps",
             "keep_checkpoints", "grad_accum_steps")
MESH_AXES = ("data", "fsdp", "model")


def lookup(config: ml_collections.ConfigDict, dotted: str) -> Any:
    value = config
    for part in dotted.split("."):
        if part not in value:
            raise ConfigError(f"config: missing key '{dotted}'")
        value = value[part]
    return value


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Types and ranges of the keys the trainer relies on."""
    for key, types in _REQUIRED_TYPES.items():
        value = lookup(config, key)
        if isinstance(value, bool) or not isinstance(value, types):
            expected = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
            raise ConfigError(f"config: '{key}' must be {expected}, got {value!r} ({type(value).__name__})")
    for key in _POSITIVE:
        if lookup(config, key) <= 0:
            raise ConfigError(f"config: '{key}' must be a positive integer, got {lookup(config, key)}")
    if not 0.0 <= config.ema_decay < 1.0:
        raise ConfigError(f"config: 'ema_decay' must be in [0, 1) (0 turns EMA off), got {config.ema_decay}")
    if config.data.path and not os.path.exists(config.data.path):
        raise ConfigError(f"config: 'data.path' {config.data.path!r} does not exist; give a text file, a "
                          "directory of text files, or '' for the embedded corpus")


def resolve_mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Mesh axis sizes from `config.mesh`; one axis may be -1, meaning the remaining devices."""
    sizes = {axis: mesh_config[axis] for axis in MESH_AXES}
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ConfigError(f"config: at most one of mesh.data/fsdp/model may be -1, got {sizes}")
    for axis, size in sizes.items():
        if size == 0 or size < -1:
            raise ConfigError(f"config: 'mesh.{axis}' must be a positive integer or -1, got {size}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if num_devices % fixed:
            raise ConfigError(f"config: mesh {sizes} cannot fill {num_devices} devices: the fixed axes' product "
                              f"{fixed} does not divide {num_devices}")
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(f"config: mesh {sizes} has {fixed} devices but {num_devices} are available; make the "
                          "product of mesh.data, mesh.fsdp and mesh.model equal the device count, or set one to -1")
    return sizes


def validate_batch(config: ml_collections.ConfigDict, mesh_shape: dict[str, int], process_count: int) -> None:
    """The global batch must split evenly over data-parallel devices, processes and accumulation steps."""
    data_parallel = mesh_shape["data"] * mesh_shape["fsdp"]
    batch, accum = config.batch_size, config.grad_accum_steps
    if batch % data_parallel:
        raise ConfigError(f"config: 'batch_size' {batch} is not divisible by the data-parallel size "
                          f"{data_parallel} (mesh.data × mesh.fsdp); use a multiple of {data_parallel}")
    if batch % process_count:
        raise ConfigError(f"config: 'batch_size' {batch} is not divisible by the {process_count} processes")
    if (batch // data_parallel) % accum:
        raise ConfigError(f"config: 'grad_accum_steps' {accum} must divide the per-device batch "
                          f"{batch // data_parallel} (batch_size / data-parallel size)")


def ensure_writable_dir(path: str | os.PathLike, *, what: str = "workdir") -> pathlib.Path:
    """Creates `path` if needed and proves it writable by writing and removing a probe file."""
    directory = pathlib.Path(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-probe-"):
            pass
    except OSError as e:
        raise ConfigError(f"{what}: {str(directory)!r} is not writable ({e.strerror or e}); choose a directory "
                          "you can write to") from None
    return directory


def apply_overrides(config: ml_collections.ConfigDict, values: dict) -> ml_collections.ConfigDict:
    """Sets dotted keys (`{"model.num_layers": 2}`) in `config`, in place, as `--config.KEY=VALUE` would;
    returns `config`. Unknown keys raise, as on the command line once the config is locked."""
    for key, value in values.items():
        node = config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config
