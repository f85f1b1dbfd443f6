"""The platform a computation is being compiled for, which is not always the one JAX runs on here.

Layers that choose a kernel by platform (GAU attention: the Pallas kernel on GPU and TPU, the XLA path on
CPU) ask `current()`, not `jax.default_backend()`, so that compiling ahead of time for another machine's
devices (`train_lib.pods`: a TPU pod's step compiled on a CPU from libtpu's topology description) traces
the program that machine would run:

    with backend.compiling_for("tpu"):
        jax.jit(step).lower(...).compile()   # traced as on a TPU: 'auto' attention picks the Pallas kernel
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import jax

__all__ = ["PLATFORMS", "compiling_for", "current"]

PLATFORMS = ("cpu", "gpu", "tpu")
_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("kexue_target_platform", default=None)


def current() -> str:
    """'cpu', 'gpu' or 'tpu': the target of an enclosing `compiling_for`, else JAX's default backend."""
    return _TARGET.get() or jax.default_backend()


@contextlib.contextmanager
def compiling_for(platform: str) -> Iterator[None]:
    """Traces inside this block choose their kernels as on `platform`."""
    if platform not in PLATFORMS:
        raise ValueError(f"compiling_for: platform must be one of {PLATFORMS}, got {platform!r}")
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)
