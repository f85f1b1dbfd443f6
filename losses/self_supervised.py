r"""Self-supervised learning without negatives: SimSiam's and BYOL's symmetric negative cosine."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def _float32(x: Any) -> tuple[Array, Any]:
    x = jnp.asarray(x)
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    return x.astype(jnp.promote_types(dtype, jnp.float32)), dtype


def negative_cosine_similarity(predictions: Any, targets: Any, *, epsilon: float = 1e-12) -> Array:
    r"""SimSiam's :math:`D(p, z) = -\frac{p}{\lVert p\rVert_2}\cdot\frac{z}{\lVert z\rVert_2}`, per example.

    BYOL's loss :math:`\lVert \bar p - \bar z\rVert_2^2 = 2 + 2D(p, z)` is the same up to an affine map. The norms
    are clamped below by ``epsilon``: a zero vector has similarity 0 with everything, and a finite gradient.

    Source: Chen & He, "Exploring Simple Siamese Representation Learning", arXiv 2011.10566, Eq. 1; Grill et
    al., "Bootstrap Your Own Latent", arXiv 2006.07733, Eq. 2; post 7980, https://kexue.fm/archives/7980.

    Args:
      predictions: ``[..., d]``.
      targets: ``[..., d]``, the same shape.
    Returns:
      ``[...]`` values in [−1, 1], in the inputs' floating dtype.
    """
    p, dtype = _float32(predictions)
    z, _ = _float32(targets)
    if p.shape != z.shape or p.ndim < 1:
        raise ValueError(f"`predictions` {p.shape} and `targets` {z.shape} must have the same shape [..., d].")
    # rsqrt of the clamped squared norm: finite value and gradient at a zero vector (the norm's gradient is not).
    inverse = (jax.lax.rsqrt(jnp.maximum(jnp.sum(p * p, axis=-1), epsilon**2))
               * jax.lax.rsqrt(jnp.maximum(jnp.sum(z * z, axis=-1), epsilon**2)))
    return (-jnp.sum(p * z, axis=-1) * inverse).astype(dtype)


def simsiam_loss(p1: Any, p2: Any, z1: Any, z2: Any, *, stop_gradient: bool = True) -> Array:
    r"""The symmetric loss :math:`\tfrac12 D(p_1, \mathrm{sg}(z_2)) + \tfrac12 D(p_2, \mathrm{sg}(z_1))`, per example.

    ``p_i`` are the predictor's outputs on view i and ``z_i`` the targets of view i: the same network's
    projections (SimSiam) or an EMA target network's (BYOL). ``stop_gradient=False`` lets the gradient flow
    into the targets too, SimSiam's ablation that collapses (arXiv 2011.10566, Fig. 2).

    Args:
      p1, p2: ``[..., d]`` predictions on the two views.
      z1, z2: ``[..., d]`` targets on the two views.
    Returns:
      ``[...]`` values in [−1, 1].
    """
    if stop_gradient:
        z1, z2 = jax.lax.stop_gradient(z1), jax.lax.stop_gradient(z2)
    return 0.5 * negative_cosine_similarity(p1, z2) + 0.5 * negative_cosine_similarity(p2, z1)
