"""Model FLOPs (counted, not profiled) and the machine's measured matmul peak, for MFU.

Model FLOPs follow the usual MFU convention (PaLM, arXiv 2204.02311, App. B): 2 FLOPs per
multiply-add of every matrix product the model needs, attention included (causal attention counted
over the full n×n square, as it is computed), elementwise work (norms, activations, the optimizer)
not counted; a training step costs 3× the forward pass (the backward pass is two matmuls per matmul);
recomputation under remat is not model FLOPs.

Two counters:
  * `lm_forward_flops_per_token` — the closed form for the gated-attention LMs (GAU, FLASH, Performer).
  * `count_matmul_flops` — the same count read from a function's jaxpr (every `dot_general` and
    convolution, through jit, scan, remat and custom-derivative boundaries). The diffusion U-Net uses
    it; the tests check that it agrees with the closed form on the LMs.

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

from models.gated_unit import GAUConfig


def lm_forward_flops_per_token(cfg: GAUConfig, seq_len: int) -> float:
    """Forward FLOPs per token of `models.gau.GAULanguageModel` at length `seq_len` (closed form).

    Per layer, with d = embed_dim, e = expansion·d, s = key_dim, n = seq_len, C = chunk_size:
      projections   2·(d·2e + d·s + e·d)            U,V (fused), Z, output
      GAU           2·n·s + 2·n·e                   QKᵀ and A·V over all n keys
      FLASH         2·C·s + 2·C·e + 2·s·e + 2·s·e   local QKᵀ, A·V in the chunk; K_linᵀV and Q_lin·ΣK_linᵀV
      Performer     FLASH-style chunks of C over m = performer_features random features, plus the
                    feature maps φ(Q), φ(K): 2·2·s·m + 2·C·m + 2·C·e + 2·m·e + 2·m·e (+ the causal/
                    non-causal normaliser's products, 2·C·m + 2·m)
    plus the output layer 2·d·V. The last FLASH chunk is computed padded, so n is rounded up to C.
    """
    d, e, s, vocab = cfg.embed_dim, cfg.expand_dim, cfg.key_dim, cfg.vocab_size
    projections = 2 * (d * 2 * e + d * s + e * d)
    chunks = -(-seq_len // cfg.chunk_size)
    padded = chunks * cfg.chunk_size / seq_len  # FLASH computes the padded tail of the last chunk
    c = cfg.chunk_size
    if cfg.attention == "gau":
        attention = 2 * seq_len * s + 2 * seq_len * e
    elif cfg.attention == "flash":
        attention = padded * (2 * c * s + 2 * c * e + 4 * s * e)
    elif cfg.attention == "performer":
        m = cfg.performer_features
        features = 2 * 2 * s * m
        if cfg.causal:
            # local φ(Q)φ(K)ᵀ and its products with V and with ones (the normaliser), past sums of
            # φ(K)ᵀV and φ(K), and φ(Q) times them.
            attention = features + padded * (2 * c * m + 2 * c * (e + 1) + 2 * m * (e + 1) + 2 * m * (e + 1))
        else:
            attention = features + 2 * m * (e + 1) + 2 * m * (e + 1)
    else:
        raise ValueError(f"no FLOP count for model.attention={cfg.attention!r}")
    return cfg.num_layers * (projections + attention) + 2 * d * vocab


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

