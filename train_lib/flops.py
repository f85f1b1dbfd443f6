"""Model FLOPs (counted, not profiled) and the machine's measured matmul peak, for MFU.

Model FLOPs follow the usual MFU convention (PaLM, arXiv 2204.02311, App. B): 2 FLOPs per
multiply-add of every matrix product the model needs, attention included (causal attention counted
over the full n×n square, as it is computed), elementwise work (norms, activations, the optimizer)
not counted; a training step costs 3× the forward pass (the backward pass is two matmuls per matmul);
recomputation under remat is not model FLOPs.

`count_matmul_flops` reads the count from a function's jaxpr (every `dot_general` and convolution,
through jit, scan, remat and custom-derivative boundaries); `train_lib.task.TaskBase` applies it to a
task's loss. A family may give a closed form instead (`train_lib.lm.flops` for the gated-attention LMs,
tested against this count).

`peak_matmul_flops` times a large matmul on one device: the ceiling MFU is measured against.
"""
from __future__ import annotations

import functools
import math
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core


# --------------------------------------------------------------------------------------------------
# Counting from a jaxpr.
# --------------------------------------------------------------------------------------------------
def _dot_flops(eqn) -> float:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    out = eqn.outvars[0].aval.shape
    return 2.0 * math.prod(out) * math.prod(lhs[i] for i in lhs_contract)


def _conv_flops(eqn) -> float:
    rhs = eqn.invars[1].aval.shape
    out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
    # Each output element is a dot product over kernel window × (input channels / groups).
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) / rhs[out_feature_dim]


def _sub_jaxprs(value) -> list:
    if isinstance(value, jex_core.ClosedJaxpr):
        return [value.jaxpr]
    if isinstance(value, jex_core.Jaxpr):
        return [value]
    if isinstance(value, (tuple, list)):
        return [j for v in value for j in _sub_jaxprs(v)]
    return []


def _jaxpr_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "cond":
            total += max(_jaxpr_flops(b.jaxpr) for b in eqn.params["branches"])
        elif name == "while":
            raise ValueError("count_matmul_flops cannot count a while loop (its trip count is dynamic)")
        else:
            inner = sum(_jaxpr_flops(j) for key, v in eqn.params.items()
                        if key not in ("jvp_jaxpr_fun", "jvp_jaxpr_thunk", "fwd_jaxpr_thunk", "bwd")
                        for j in _sub_jaxprs(v))
            total += inner * (eqn.params["length"] if name == "scan" else 1)
    return total


def count_matmul_flops(fn: Callable, *args, **kwargs) -> float:
    """FLOPs of every matrix product and convolution `fn(*args, **kwargs)` performs (from its jaxpr).

    Arguments may be arrays or `jax.ShapeDtypeStruct`s; nothing is computed.
    """
    return _jaxpr_flops(jax.make_jaxpr(functools.partial(fn, **kwargs))(*args).jaxpr)


# --------------------------------------------------------------------------------------------------
# The machine's peak.
# --------------------------------------------------------------------------------------------------
PEAK_FLOPS_ENV = "KEXUE_PEAK_FLOPS"  # set to a number (FLOP/s per device) to skip the measurement


@functools.lru_cache(maxsize=None)
def peak_matmul_flops(dtype: str = "float32", *, min_seconds: float = 0.2, repeats: int = 5) -> float:
    """FLOP/s of one device on a square float matmul, grown until one product takes `min_seconds`.

    The median of `repeats` timed runs after a warm-up, on this process's first device (about 4 s on
    a 2-core CPU, where it ends at 4096²). Cached per process; the environment variable
    `KEXUE_PEAK_FLOPS` replaces the measurement with a given value (the tests set it).
    """
    if os.environ.get(PEAK_FLOPS_ENV):
        return float(os.environ[PEAK_FLOPS_ENV])
    device = jax.local_devices()[0]
    size = 1024
    matmul = jax.jit(lambda x, y: x @ y)
    while True:
        a = jax.device_put(jnp.ones((size, size), dtype), device)
        jax.block_until_ready(matmul(a, a))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(matmul(a, a))
            times.append(time.perf_counter() - start)
        seconds = float(np.median(times))
        if seconds >= min_seconds or size >= 16384:
            return 2.0 * size**3 / seconds
        size *= 2


def global_peak_flops(dtype: str = "float32", *, min_seconds: float = 0.2) -> float:
    """Peak of all devices of all processes together, from one device's measurement (`peak_matmul_flops`).
    CPU "devices" (real or fake) share their host's cores, so a CPU host counts once, whatever its device count."""
    per_device = peak_matmul_flops(dtype, min_seconds=min_seconds)
    cpu = jax.devices()[0].platform == "cpu"
    return per_device * (jax.process_count() if cpu else jax.device_count())


def mfu(model_flops_per_step: float, step_seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak."""
    return model_flops_per_step / step_seconds / peak_flops if step_seconds > 0 and peak_flops > 0 else float("nan")


def describe(value: float, unit: str = "FLOP") -> str:
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value:.0f} {unit}"

