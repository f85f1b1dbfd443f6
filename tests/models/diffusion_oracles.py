"""Analytically optimal denoisers for the diffusion tests (module-level, so jit caches are reused).

For data x₀ ~ N(0, s² I) and xₜ = √ᾱ x₀ + √(1−ᾱ) ε, the posterior mean gives
E[ε|xₜ] = √(1−ᾱ) xₜ / (ᾱ s² + 1 − ᾱ), E[x₀|xₜ] = √ᾱ s² xₜ / (ᾱ s² + 1 − ᾱ), and
Γₜ = E‖E[ε|xₜ]‖²/d = (1−ᾱ) / (ᾱ s² + 1 − ᾱ). For one-point data x₀ = c, ε = (xₜ − √ᾱ c)/√(1−ᾱ) exactly.
"""
import jax.numpy as jnp
import numpy as np

from models.diffusion import schedules

T = 1000
SCALE = 0.5
FULL = schedules.make_schedule("linear", T)
ALPHA_BAR64 = schedules.alpha_bar_float64("linear", T)
POINT = jnp.asarray((-1.0 + 2.0 * np.arange(16) / 16).reshape(1, 4, 4, 1), jnp.float32)  # on the 17-level grid


def _ab(t, x):
    return FULL.alpha_bar[t - 1].reshape((-1,) + (1,) * (x.ndim - 1))


def gaussian_eps(params, x, t, labels=None):
    ab = _ab(t, x)
    return jnp.sqrt(1.0 - ab) * x / (ab * SCALE**2 + 1.0 - ab)


def gaussian_x0(params, x, t, labels=None):
    ab = _ab(t, x)
    return jnp.sqrt(ab) * SCALE**2 * x / (ab * SCALE**2 + 1.0 - ab)


def gaussian_v(params, x, t, labels=None):
    ab = _ab(t, x)
    return jnp.sqrt(ab) * gaussian_eps(params, x, t) - jnp.sqrt(1.0 - ab) * gaussian_x0(params, x, t)


def gaussian_gamma(alpha_bar):
    alpha_bar = np.asarray(alpha_bar, np.float64)
    return (1.0 - alpha_bar) / (alpha_bar * SCALE**2 + 1.0 - alpha_bar)


def point_eps(params, x, t, labels=None):
    ab = _ab(t, x)
    return (x - jnp.sqrt(ab) * POINT) / jnp.sqrt(1.0 - ab)


def scaled_input(params, x, t, labels=None):
    """A deliberately imperfect predictor, ε̂ = 0.3 xₜ, for checks against float64 references."""
    return 0.3 * x
