"""What every trainable experiment shares (after big_vision's configs/common.py): the trainer's keys with
their defaults, the optimizers' blocks, and the `variant,preset,...` argument parser.

An experiment file states only what is its own:

    def get_config(arg=None):
        variant, presets = common.parse_arg(arg, default="tiny", variants=_VARIANTS, presets=_PRESETS,
                                            file=__file__)
        config = common.trainer_config(task="lm", total_steps=1000, batch_size=16, ...)
        config.data = ...; config.model = ...
        return common.apply_presets(config, variant, presets, _PRESETS)

Every key is read by the trainer (`train_lib.config_lib.trainer_settings`), the optimizer
(`train_lib.optim`) or the task; the trainer refuses a key that nothing reads.
"""
from __future__ import annotations

import pathlib
from typing import Any, Callable

import ml_collections

# The trainer's keys (train_lib.config_lib.TrainerSettings) and their defaults.
TRAINER_DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "grad_accum_steps": 1,
    "log_every_steps": 50,
    "eval_every_steps": 500,
    "eval_batches": 8,  # global batches per evaluation (read by the task's eval data)
    "checkpoint_every_steps": 500,
    "keep_checkpoints": 3,
    "ema_decay": 0.999,  # warm-up aware: min(decay, (1 + t)/(10 + t)); 0 keeps no EMA copy
    "skip_nonfinite_steps": False,  # True: skip a step whose loss/gradient is NaN/Inf and go on
    "start_fresh_if_checkpoints_unusable": False,  # True: train from scratch if no checkpoint loads
}

# Hyperparameters of each optimizer of train_lib.optim, besides the shared schedule, weight decay and
# clipping; the `:adamw`, `:adafactor`, `:sgd`, `:lion` and `:adamax` presets of every experiment switch to them.
OPTIMIZER_DEFAULTS: dict[str, dict[str, Any]] = {
    "adamw": {"b1": 0.9, "b2": 0.999, "eps": 1e-8},
    "adafactor": {"decay_rate": 0.8, "eps": 1e-30, "min_dim_size_to_factor": 128,
                  "multiply_by_parameter_scale": False},
    "sgd": {"momentum": 0.9, "nesterov": False},
    "lion": {"b1": 0.9, "b2": 0.99},
    "adamax": {"b1": 0.9, "b2": 0.999, "eps": 1e-8},
}


def trainer_config(*, task: str, total_steps: int, batch_size: int, logical_axis_rules, **values) -> \
        ml_collections.ConfigDict:
    """A config with the trainer's keys: TRAINER_DEFAULTS updated by `values`, a data-parallel mesh over
    all devices, `debug.nan_at_step` = -1 (the fault tests' NaN injection, absent from the step when -1)."""
    unknown = set(values) - set(TRAINER_DEFAULTS)
    if unknown:
        raise KeyError(f"trainer_config: unknown trainer keys {sorted(unknown)}; known: {sorted(TRAINER_DEFAULTS)}")
    config = ml_collections.ConfigDict()
    config.task = task
    config.total_steps = total_steps
    config.batch_size = batch_size  # global, over all devices and processes
    for key, default in TRAINER_DEFAULTS.items():
        config[key] = values.get(key, default)
    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1})
    config.logical_axis_rules = logical_axis_rules
    config.debug = ml_collections.ConfigDict({"nan_at_step": -1})
    return config


def optimizer_config(name: str, *, learning_rate: float, warmup_steps: int, end_lr_factor: float = 0.1,
                     weight_decay: float = 0.0, grad_clip_norm: float = 1.0, **values) -> ml_collections.ConfigDict:
    """`config.optimizer` for optimizer `name`: the shared schedule, decay and clipping, then its own
    hyperparameters (OPTIMIZER_DEFAULTS[name] updated by `values`)."""
    if name not in OPTIMIZER_DEFAULTS:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {sorted(OPTIMIZER_DEFAULTS)}")
    own = OPTIMIZER_DEFAULTS[name]
    unknown = set(values) - set(own)
    if unknown:
        raise KeyError(f"optimizer_config: {name} takes {sorted(own)}, not {sorted(unknown)}")
    return ml_collections.ConfigDict({
        "name": name, "learning_rate": learning_rate, "warmup_steps": warmup_steps, "end_lr_factor": end_lr_factor,
        "weight_decay": weight_decay, "grad_clip_norm": grad_clip_norm,
        **{k: values.get(k, v) for k, v in own.items()}})


def _switch_optimizer(name: str) -> Callable:
    def preset(config, variant):
        del variant
        opt = config.optimizer
        config.optimizer = optimizer_config(name, learning_rate=opt.learning_rate, warmup_steps=opt.warmup_steps,
                                            end_lr_factor=opt.end_lr_factor, weight_decay=opt.weight_decay,
                                            grad_clip_norm=opt.grad_clip_norm)
    return preset


# Presets every experiment accepts after its variant: switch the optimizer, keeping the schedule.
COMMON_PRESETS: dict[str, Callable] = {name: _switch_optimizer(name) for name in OPTIMIZER_DEFAULTS}


def parse_arg(arg: str | None, *, default: str, variants, presets, file: str) -> tuple[str, list[str]]:
    """'variant,preset,preset' → (variant, [presets]), each checked; an unknown one names the choices."""
    variant, *chosen = [part.strip() for part in (arg or default).split(",")]
    name = f"experiments/{pathlib.Path(file).name}"
    all_presets = {**COMMON_PRESETS, **presets}
    if variant not in variants:
        raise ValueError(f"unknown variant {variant!r} of {name}; expected one of {sorted(variants)} (then "
                         f"optional presets after commas: {sorted(all_presets)})")
    for preset in chosen:
        if preset not in all_presets:
            raise ValueError(f"unknown preset {preset!r} of {name}; expected some of {sorted(all_presets)}")
    return variant, chosen


def apply_presets(config: ml_collections.ConfigDict, variant: str, chosen: list[str],
                  presets: dict[str, Callable]) -> ml_collections.ConfigDict:
    """Applies each preset `fn(config, variant)` in order (the experiment's own, then the common ones)."""
    for preset in chosen:
        {**COMMON_PRESETS, **presets}[preset](config, variant)
    return config
