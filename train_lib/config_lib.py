"""Validation of experiment configs and paths, done at the edge before anything compiles.

Every check raises `ConfigError` with one line that names the key or path, what was wrong and what
would be right; the CLIs print it and exit with status 2, without a traceback.
"""
from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import tempfile
from typing import Any

import ml_collections


class ConfigError(ValueError):
    """A bad config value, path or command-line flag, reported to the user in one line."""


MESH_AXES = ("data", "fsdp", "model")


def lookup(config, dotted: str) -> Any:
    value = config
    for part in dotted.split("."):
        if part not in value:
            raise ConfigError(f"config: missing key '{dotted}'")
        value = value[part]
    return value


def dataclass_values(cls, node) -> dict[str, Any]:
    """{field: node[field]} for the fields of dataclass `cls` that the config node has. Only those keys are
    read, so another key of the node stays unread (and the trainer refuses it)."""
    return {f.name: node[f.name] for f in dataclasses.fields(cls) if f.name in node}


def read_dataclass(cls, node, prefix: str):
    """An instance of dataclass `cls` from a config node; fields with defaults may be missing (a config
    written before they existed)."""
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in node and f.default is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"config: missing key '{prefix}.{missing[0]}'")
    return cls(**dataclass_values(cls, node))


_ANNOTATED_TYPES = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,)}


def read_typed_dataclass(cls, node, prefix: str):
    """`read_dataclass`, then every field annotated bool, int, float or str checked to be one (a bool is never
    taken for a number, an int is a float) and every float finite: one line naming `prefix.field` otherwise."""
    value = read_dataclass(cls, node, prefix)
    for f in dataclasses.fields(cls):
        types = _ANNOTATED_TYPES.get(f.type if isinstance(f.type, str) else getattr(f.type, "__name__", ""))
        if types is None:
            continue
        v = getattr(value, f.name)
        if ((isinstance(v, bool) and bool not in types) or not isinstance(v, types)
                or (isinstance(v, float) and not math.isfinite(v))):
            raise ConfigError(f"config: '{prefix}.{f.name}' must be {'a finite ' if f.type == 'float' else ''}"
                              f"{f.type}, got {v!r} ({type(v).__name__})")
    return value


def typed(config, key: str, types: type | tuple[type, ...]) -> Any:
    """`config[key]` (dotted), checked to be of `types` (a bool is never taken for an int or a float)."""
    value = lookup(config, key)
    types = types if isinstance(types, tuple) else (types,)
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        expected = " or ".join(t.__name__ for t in types)
        raise ConfigError(f"config: '{key}' must be {expected}, got {value!r} ({type(value).__name__})")
    return value


@dataclasses.dataclass(frozen=True)
class TrainerSettings:
    """The keys the generic trainer reads, typed and checked (`trainer_settings`); each task reads its own."""

    task: str
    seed: int
    total_steps: int
    batch_size: int  # global, over all devices and processes
    grad_accum_steps: int
    log_every_steps: int
    eval_every_steps: int
    checkpoint_every_steps: int
    keep_checkpoints: int
    ema_decay: float  # 0: no EMA copy
    skip_nonfinite_steps: bool
    start_fresh_if_checkpoints_unusable: bool
    mesh: dict[str, int]  # as configured: one axis may be -1 (`resolve_mesh_shape`)
    logical_axis_rules: tuple[tuple[str, Any], ...]
    nan_at_step: int  # debug.nan_at_step: test-only fault injection; -1 leaves it out of the step entirely
    trainable: tuple[str, ...] = ()  # optimizer.trainable: patterns of the parameters that train (empty: all)


_POSITIVE = ("total_steps", "batch_size", "log_every_steps", "eval_every_steps", "checkpoint_every_steps",
             "keep_checkpoints", "grad_accum_steps")


def trainer_settings(config) -> TrainerSettings:
    """Reads and validates the trainer's keys of `config`."""
    values = {key: typed(config, key, int) for key in ("seed",) + _POSITIVE}
    for key in _POSITIVE:
        if values[key] <= 0:
            raise ConfigError(f"config: '{key}' must be a positive integer, got {values[key]}")
    ema_decay = float(typed(config, "ema_decay", (int, float)))
    if not 0.0 <= ema_decay < 1.0:
        raise ConfigError(f"config: 'ema_decay' must be in [0, 1) (0 turns EMA off), got {ema_decay}")
    return TrainerSettings(
        task=typed(config, "task", str), ema_decay=ema_decay,
        skip_nonfinite_steps=typed(config, "skip_nonfinite_steps", bool),
        start_fresh_if_checkpoints_unusable=typed(config, "start_fresh_if_checkpoints_unusable", bool),
        mesh={axis: typed(config, f"mesh.{axis}", int) for axis in MESH_AXES},
        logical_axis_rules=logical_axis_rules(config),
        nan_at_step=typed(config, "debug.nan_at_step", int), **values)


def logical_axis_rules(config) -> tuple[tuple[str, Any], ...]:
    """`config.logical_axis_rules` as ((logical name, mesh axis | (mesh axes) | None), ...), checked."""
    rules = lookup(config, "logical_axis_rules")
    expected = ("a sequence of (logical name, mesh axis, tuple of mesh axes or None) pairs with mesh axes "
                f"from {MESH_AXES}, e.g. (('batch', ('data', 'fsdp')), ('embed', 'fsdp'), ('length', None))")
    if isinstance(rules, (str, bytes)) or not isinstance(rules, (tuple, list)):
        raise ConfigError(f"config: 'logical_axis_rules' is {rules!r}; expected {expected}")
    parsed = []
    for rule in rules:
        ok = isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
        axes = rule[1] if ok else None
        axes = tuple(axes) if isinstance(axes, list) else axes
        names = (axes,) if isinstance(axes, str) else (axes or ())
        if not ok or not isinstance(names, tuple) or any(name not in MESH_AXES for name in names):
            raise ConfigError(f"config: 'logical_axis_rules' has the entry {rule!r}; expected {expected}")
        parsed.append((rule[0], axes))
    return tuple(parsed)


def check_stop_at_step(stop_at_step: int | None) -> None:
    if stop_at_step is not None and stop_at_step <= 0:
        raise ConfigError(f"--stop_at_step must be a positive step number, got {stop_at_step}; leave it out to "
                          "train to total_steps")


def resolve_mesh_shape(mesh: dict[str, int], num_devices: int) -> dict[str, int]:
    """Mesh axis sizes from `config.mesh`; one axis may be -1, meaning the remaining devices."""
    sizes = {axis: mesh[axis] for axis in MESH_AXES}
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


def validate_batch(settings: TrainerSettings, mesh_shape: dict[str, int], process_count: int) -> None:
    """The global batch must split evenly over data-parallel devices, processes and accumulation steps."""
    data_parallel = mesh_shape["data"] * mesh_shape["fsdp"]
    batch, accum = settings.batch_size, settings.grad_accum_steps
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


# --------------------------------------------------------------------------------------------------
# Which keys were read. A key that nothing reads is a mistake (a name the config's lock could not catch,
# or a switch the code ignores), so the trainer refuses it rather than train without it.
# --------------------------------------------------------------------------------------------------
class ReadRecorder:
    """A read-only view of a config (`.config`) that records which leaf keys are read through it.

    The trainer hands the view to everything that reads the config (its own settings, the task, the
    optimizer) and then calls `check()`. Testing for a key (`in`, `keys()`) does not count as reading it.
    """

    def __init__(self, config: ml_collections.ConfigDict):
        self._root = config
        self._read: set[str] = set()
        self.config = RecordingView(config, "", self._read)

    def unread(self) -> list[str]:
        return sorted(set(leaf_keys(self._root)) - self._read)

    def check(self) -> None:
        """Raises ConfigError naming every key nothing has read."""
        unread = self.unread()
        if unread:
            one = len(unread) == 1
            raise ConfigError(f"config: {', '.join(repr(k) for k in unread)} {'is' if one else 'are'} read by "
                              f"nothing in this run, so {'it' if one else 'they'} would change nothing; remove "
                              f"{'it' if one else 'them'} from the experiment file (or, for optimizer settings, "
                              "choose the optimizer with its preset, e.g. ':tiny,sgd')")


def leaf_keys(config, prefix: str = "") -> list[str]:
    """Dotted names of the config's leaves (an empty sub-config counts as a leaf)."""
    keys = []
    for key in config.keys():
        value = config[key]
        if isinstance(value, ml_collections.ConfigDict) and len(value.keys()):
            keys += leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


class RecordingView:
    """Read-only mapping view of one ConfigDict node; reading a leaf records its dotted key."""

    def __init__(self, node, prefix: str, read: set[str]):
        object.__setattr__(self, "_node", node)
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "_read", read)

    def __getitem__(self, key: str) -> Any:
        if "." in key:
            head, rest = key.split(".", 1)
            return self[head][rest]
        value = self._node[key]
        if isinstance(value, ml_collections.ConfigDict) and len(value.keys()):
            return RecordingView(value, f"{self._prefix}{key}.", self._read)
        self._read.add(self._prefix + key)
        return value

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(e) from None

    def __setattr__(self, name, value):
        raise TypeError(f"the config is read-only here (setting '{self._prefix}{name}')")

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self._node else default

    def __contains__(self, key: str) -> bool:
        return key in self._node

    def keys(self):
        return self._node.keys()

    def __iter__(self):
        return iter(self._node.keys())

    def __len__(self) -> int:
        return len(self._node.keys())

    def items(self):
        return [(key, self[key]) for key in self._node.keys()]

    def to_dict(self) -> dict:
        return self._node.to_dict()

    def __repr__(self) -> str:
        return f"RecordingView({self._prefix or '<root>'}: {self._node.to_dict()!r})"


def check_study(config, *, positive: tuple[str, ...] = (), choices: dict[str, Any] | None = None) -> None:
    """Checks a study script's config before it trains anything: each key of `positive` is a positive number
    or a non-empty sequence of them, and each key of `choices` a non-empty sequence of names from its choices."""
    for key in positive:
        value = lookup(config, key)
        values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
        if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 for v in values):
            raise ConfigError(f"config: '{key}' must be {'positive numbers' if len(values) > 1 else 'positive'}, "
                              f"got {value!r}")
    for key, allowed in (choices or {}).items():
        value = lookup(config, key)
        values = (value,) if isinstance(value, str) else tuple(value)
        unknown = [v for v in values if v not in allowed]
        if not values or unknown:
            raise ConfigError(f"config: '{key}' is {value!r}; expected some of {sorted(allowed)}")
