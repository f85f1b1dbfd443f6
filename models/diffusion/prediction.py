"""What the network predicts (ε, x₀ or v) and how that becomes (ε̂, x̂₀): the one place for it.

With xₜ = √ᾱ x₀ + √(1−ᾱ) ε:
- "eps": the network predicts ε (Ho et al., arXiv 2006.11239; posts 9119/9164), x̂₀ = (xₜ − √(1−ᾱ) ε̂)/√ᾱ;
- "x0":  it predicts x₀, ε̂ = (xₜ − √ᾱ x̂₀)/√(1−ᾱ);
- "v":   it predicts v = √ᾱ ε − √(1−ᾱ) x₀ (Salimans & Ho, *Progressive Distillation*, arXiv 2202.00512),
         x̂₀ = √ᾱ xₜ − √(1−ᾱ) v̂, ε̂ = √(1−ᾱ) xₜ + √ᾱ v̂.

`alpha_bar` is per example `[B]` (or a scalar) and broadcast over `x` `[B, H, W, C]`.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax.numpy as jnp

from models.diffusion.schedules import broadcast_to


class Parameterization(NamedTuple):
    """`to_eps_x0(output, x_t, alpha_bar) -> (eps, x0)` and `target(x0, eps, alpha_bar) -> target`."""

    to_eps_x0: Callable
    target: Callable


def _eps_to_eps_x0(out, x_t, ab):
    return out, (x_t - jnp.sqrt(1.0 - ab) * out) / jnp.sqrt(ab)


def _x0_to_eps_x0(out, x_t, ab):
    return (x_t - jnp.sqrt(ab) * out) / jnp.sqrt(1.0 - ab), out


def _v_to_eps_x0(out, x_t, ab):
    return jnp.sqrt(1.0 - ab) * x_t + jnp.sqrt(ab) * out, jnp.sqrt(ab) * x_t - jnp.sqrt(1.0 - ab) * out


PREDICTIONS: dict[str, Parameterization] = {
    "eps": Parameterization(_eps_to_eps_x0, lambda x0, eps, ab: eps),
    "x0": Parameterization(_x0_to_eps_x0, lambda x0, eps, ab: x0),
    "v": Parameterization(_v_to_eps_x0, lambda x0, eps, ab: jnp.sqrt(ab) * eps - jnp.sqrt(1.0 - ab) * x0),
}


def check_prediction(prediction: str) -> Parameterization:
    """The `Parameterization` named `prediction`, or a ValueError naming the choices."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"Unknown prediction type {prediction!r}; choose one of {sorted(PREDICTIONS)}.")
    return PREDICTIONS[prediction]


def eps_and_x0(output: jnp.ndarray, x_t: jnp.ndarray, alpha_bar, prediction: str = "eps"):
    """(ε̂, x̂₀), each `[B, ...]` float32, from the network `output` for `x_t` at noise level `alpha_bar`."""
    ab = broadcast_to(alpha_bar, x_t)
    return check_prediction(prediction).to_eps_x0(output.astype(x_t.dtype), x_t, ab)


def prediction_target(x0: jnp.ndarray, eps: jnp.ndarray, alpha_bar, prediction: str = "eps"):
    """The regression target of the network for clean `x0` and noise `eps` at `alpha_bar`."""
    ab = broadcast_to(alpha_bar, x0)
    return check_prediction(prediction).target(x0, eps, ab)


def eps_from_x0(x_t: jnp.ndarray, x0: jnp.ndarray, alpha_bar) -> jnp.ndarray:
    """ε implied by `x_t` and `x0` at `alpha_bar` (used after clipping x̂₀, and for q's own ε)."""
    return _x0_to_eps_x0(x0, x_t, broadcast_to(alpha_bar, x_t))[0]
