"""The von Mises–Fisher distribution on the unit sphere S^{d−1} with a fixed concentration κ (UniVAE's latents).

Su, "UniVAE" (https://kexue.fm/archives/8475), after the hyperspherical VAE of Davidson et al. (arXiv 1804.00891):
the posterior is vMF(μ, κ) with the encoder giving the mean direction μ and κ fixed, so the KL to the uniform prior is a constant and the loss is
the reconstruction alone.

A draw is z = w μ + √(1 − w²) v, with v uniform on the unit sphere of the tangent space at μ (built around e₁ and
reflected onto μ) and w = cos∠(z, μ)
of density p(w) ∝ e^{κw} (1 − w²)^{(d−3)/2} on [−1, 1] (Wood, "Simulation of the von Mises Fisher distribution",
1994). w is sampled by inverting its CDF: the table of its quantiles is computed once per (d, κ) in float64 by
integrating the density on a fine grid, and a draw interpolates it at a uniform u, so sampling is a few
vectorised operations with no rejection loop (the post's "inverse-CDF" sampler).

The mean resultant length E[w] = A_d(κ) = I_{d/2}(κ) / I_{d/2−1}(κ) (Bessel functions of the first kind) is the
closed form the tests check the sampler against.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["cosine_quantiles", "kl_to_uniform", "mean_resultant_length", "sample"]

_GRID = 1 << 16  # points of the grid of the angle t ∈ [0, π]


@functools.lru_cache(maxsize=32)
def cosine_quantiles(dim: int, kappa: float, size: int = 4096) -> np.ndarray:
    """The quantiles of w = cos∠(z, μ) at u = (j + ½) / size, j = 0 … size − 1 (float64 `[size]`).

    In the angle t (w = −cos t, dw = sin t dt) the density is ∝ e^{−κ cos t} sin^{d−2} t, finite at both ends
    for every d ≥ 2: its CDF is integrated by the trapezoid rule on a uniform grid of t and inverted."""
    if dim < 2 or not kappa >= 0:
        raise ValueError(f"vmf: need dim >= 2 and kappa >= 0, got dim={dim}, kappa={kappa}")
    t = np.linspace(0.0, np.pi, _GRID)
    with np.errstate(divide="ignore"):
        log_p = -kappa * np.cos(t) + ((dim - 2) * np.log(np.sin(t)) if dim > 2 else 0.0)
    p = np.exp(log_p - log_p.max())
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (p[1:] + p[:-1]) * np.diff(t))])
    u = (np.arange(size) + 0.5) / size
    return np.interp(u * cdf[-1], cdf, -np.cos(t))


def sample(rng: jax.Array, mu: jax.Array, kappa: float, *, table_size: int = 4096) -> jax.Array:
    """Draws z ~ vMF(μ, κ), one per row of `mu` `[..., d]` (normalised here; the encoder's output need not be).

    The draw around e₁ is reflected onto μ̂ (a Householder reflection, a function of μ̂ alone), so the gradient
    reaches μ through the reflection: the reparameterisation of the vMF-VAE with κ fixed.
    """
    dim = mu.shape[-1]
    table = jnp.asarray(cosine_quantiles(dim, float(kappa), table_size), jnp.float32)
    w_rng, v_rng = jax.random.split(rng)
    u = jax.random.uniform(w_rng, mu.shape[:-1]) * table_size - 0.5
    w = jnp.interp(u, jnp.arange(table_size, dtype=jnp.float32), table)[..., None]
    mu_hat = mu / jnp.linalg.norm(mu, axis=-1, keepdims=True)
    # a draw around e₁ = (1, 0, …, 0): v uniform on the unit sphere of the last d − 1 coordinates
    v = jax.random.normal(v_rng, mu.shape[:-1] + (dim - 1,), mu.dtype)
    v = v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-30)
    z = jnp.concatenate([w, jnp.sqrt(jnp.maximum(1.0 - w * w, 0.0)) * v], axis=-1)
    # then the Householder reflection that takes e₁ to μ̂ (Davidson et al.'s construction; exact norms in float32)
    e1 = jnp.zeros_like(mu_hat).at[..., 0].set(1.0)
    u = e1 - mu_hat
    norm = jnp.linalg.norm(u, axis=-1, keepdims=True)
    u = jnp.where(norm > 1e-6, u / jnp.maximum(norm, 1e-6), 0.0)  # μ̂ = e₁: no reflection
    return z - 2.0 * jnp.sum(u * z, axis=-1, keepdims=True) * u


def mean_resultant_length(dim: int, kappa: float) -> float:
    """A_d(κ) = E[cos∠(z, μ)] = I_{d/2}(κ) / I_{d/2−1}(κ) (scipy's exponentially scaled Bessel functions)."""
    from scipy import special

    if kappa == 0:
        return 0.0
    return float(special.ive(dim / 2, kappa) / special.ive(dim / 2 - 1, kappa))


def kl_to_uniform(dim: int, kappa: float) -> float:
    """KL(vMF(μ, κ) ‖ uniform on S^{d−1}) in nats: κ A_d(κ) + log C_d(κ) + log |S^{d−1}|, with the normaliser
    C_d(κ) = κ^{d/2−1} / ((2π)^{d/2} I_{d/2−1}(κ)) and |S^{d−1}| = 2π^{d/2} / Γ(d/2); the same for every μ."""
    from scipy import special

    if kappa == 0:
        return 0.0
    v = dim / 2 - 1
    log_bessel = math.log(special.ive(v, kappa)) + kappa
    log_c = v * math.log(kappa) - (dim / 2) * math.log(2 * math.pi) - log_bessel
    log_area = math.log(2.0) + (dim / 2) * math.log(math.pi) - special.gammaln(dim / 2)
    return kappa * mean_resultant_length(dim, kappa) + log_c + log_area
