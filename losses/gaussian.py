r"""Closed-form divergences between multivariate normal distributions.

All three take :math:`p = N(\mu_p, \Sigma_p)` and :math:`q = N(\mu_q, \Sigma_q)` as means
``[..., d]`` and symmetric positive-definite covariances ``[..., d, d]``; the leading (batch) dims
of the four arguments broadcast against each other. Linear algebra runs in float32 at least
(float16/bfloat16 inputs are upcast); the result has the inputs' dtype. A covariance that is not
positive definite gives NaN (its Cholesky factor does not exist).

Source: post 8512, "两个多元正态分布的KL散度、巴氏距离和W距离", https://kexue.fm/archives/8512.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

from losses import _numerics

Array = jax.Array


def _prepare(mean_p: Any, cov_p: Any, mean_q: Any, cov_q: Any):
    """Validated, broadcast, upcast arguments plus the output dtype."""
    named = {"mean_p": mean_p, "cov_p": cov_p, "mean_q": mean_q, "cov_q": cov_q}
    arrays = {name: _numerics.floating(x, name) for name, x in named.items()}
    for name in ("mean_p", "mean_q"):
        if arrays[name].ndim < 1:
            raise ValueError(f"`{name}` must have shape [..., d], got {arrays[name].shape}.")
    d = arrays["mean_p"].shape[-1]
    if arrays["mean_q"].shape[-1] != d:
        raise ValueError(f"`mean_q` must have dimension d={d} like `mean_p`, got {arrays['mean_q'].shape}.")
    for name in ("cov_p", "cov_q"):
        if arrays[name].ndim < 2 or arrays[name].shape[-2:] != (d, d):
            raise ValueError(f"`{name}` must have shape [..., {d}, {d}], got {arrays[name].shape}.")
    try:
        batch = jnp.broadcast_shapes(
            arrays["mean_p"].shape[:-1], arrays["cov_p"].shape[:-2],
            arrays["mean_q"].shape[:-1], arrays["cov_q"].shape[:-2],
        )
    except ValueError:
        shapes = {name: x.shape for name, x in arrays.items()}
        raise ValueError(f"the leading (batch) dims of the arguments do not broadcast: {shapes}.") from None
    out_dtype = jnp.result_type(*arrays.values())
    dtype = _numerics.compute_dtype(out_dtype)
    mp, mq = (jnp.broadcast_to(arrays[n], batch + (d,)).astype(dtype) for n in ("mean_p", "mean_q"))
    cp, cq = (jnp.broadcast_to(arrays[n], batch + (d, d)).astype(dtype) for n in ("cov_p", "cov_q"))
    return mp, cp, mq, cq, out_dtype


def _log_det(chol: Array) -> Array:
    return 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)


def _solve(chol: Array, b: Array) -> Array:
    return solve_triangular(chol, b, lower=True)


@jax.jit
def gaussian_kl_divergence(mean_p: Any, cov_p: Any, mean_q: Any, cov_q: Any) -> Array:
    r"""KL(p ‖ q) between two multivariate normals.

    .. math::
      \mathrm{KL}(p \| q) = \tfrac12\Big[\mathrm{tr}(\Sigma_q^{-1}\Sigma_p)
        + (\mu_q - \mu_p)^\top \Sigma_q^{-1} (\mu_q - \mu_p) - d
        + \log\det\Sigma_q - \log\det\Sigma_p\Big].

    Computed with Cholesky factors :math:`\Sigma = LL^\top`:
    :math:`\mathrm{tr}(\Sigma_q^{-1}\Sigma_p) = \|L_q^{-1}L_p\|_F^2`, no explicit inverse.

    Args:
      mean_p, cov_p: mean ``[..., d]`` and covariance ``[..., d, d]`` of p.
      mean_q, cov_q: the same for q.

    Returns:
      ``[...]`` (the broadcast batch shape), >= 0, 0 iff p = q.

    Example:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from losses import gaussian_kl_divergence
      >>> mu, eye = jnp.zeros(2), jnp.eye(2)
      >>> print(np.asarray(gaussian_kl_divergence(mu, eye, jnp.array([1.0, 0.0]), 2 * eye)).round(4))
      0.4431
    """
    mp, cp, mq, cq, out_dtype = _prepare(mean_p, cov_p, mean_q, cov_q)
    chol_p, chol_q = jnp.linalg.cholesky(cp), jnp.linalg.cholesky(cq)
    trace = jnp.sum(jnp.square(_solve(chol_q, chol_p)), axis=(-2, -1))
    mahalanobis = jnp.sum(jnp.square(_solve(chol_q, (mq - mp)[..., None])), axis=(-2, -1))
    d = mp.shape[-1]
    kl = 0.5 * (trace + mahalanobis - d + _log_det(chol_q) - _log_det(chol_p))
    return kl.astype(out_dtype)


@jax.jit
def gaussian_bhattacharyya_distance(mean_p: Any, cov_p: Any, mean_q: Any, cov_q: Any) -> Array:
    r"""Bhattacharyya distance :math:`-\log\int\sqrt{p q}` between two multivariate normals.

    .. math::
      D_B = \tfrac18 (\mu_p - \mu_q)^\top \Sigma^{-1} (\mu_p - \mu_q)
          + \tfrac12 \log\frac{\det\Sigma}{\sqrt{\det\Sigma_p \det\Sigma_q}},
      \qquad \Sigma = \tfrac12(\Sigma_p + \Sigma_q).

    Args:
      mean_p, cov_p: mean ``[..., d]`` and covariance ``[..., d, d]`` of p.
      mean_q, cov_q: the same for q.

    Returns:
      ``[...]``, symmetric in p and q, >= 0, 0 iff p = q.

    Example:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from losses import gaussian_bhattacharyya_distance
      >>> mu, eye = jnp.zeros(2), jnp.eye(2)
      >>> print(np.asarray(gaussian_bhattacharyya_distance(mu, eye, jnp.array([1.0, 0.0]), 2 * eye)).round(4))
      0.1422
    """
    mp, cp, mq, cq, out_dtype = _prepare(mean_p, cov_p, mean_q, cov_q)
    chol = jnp.linalg.cholesky(0.5 * (cp + cq))
    mahalanobis = jnp.sum(jnp.square(_solve(chol, (mp - mq)[..., None])), axis=(-2, -1))
    log_det_p = _log_det(jnp.linalg.cholesky(cp))
    log_det_q = _log_det(jnp.linalg.cholesky(cq))
    distance = mahalanobis / 8.0 + 0.5 * (_log_det(chol) - 0.5 * (log_det_p + log_det_q))
    return distance.astype(out_dtype)


@jax.jit
def gaussian_wasserstein_distance_squared(mean_p: Any, cov_p: Any, mean_q: Any, cov_q: Any) -> Array:
    r"""Squared 2-Wasserstein distance between two multivariate normals.

    .. math::
      W_2^2 = \|\mu_p - \mu_q\|^2 + \mathrm{tr}\Big(\Sigma_p + \Sigma_q
            - 2\big(\Sigma_p^{1/2}\Sigma_q\Sigma_p^{1/2}\big)^{1/2}\Big).

    The trace of the matrix square root is :math:`\sum_i \sqrt{\lambda_i}` over the eigenvalues of
    :math:`L_p^\top \Sigma_q L_p` (similar to :math:`\Sigma_p^{1/2}\Sigma_q\Sigma_p^{1/2}`, with
    :math:`\Sigma_p = L_pL_p^\top`), so no matrix square root, and no eigenvector derivative, is
    needed: the gradient exists also at repeated eigenvalues (e.g. p = q = N(0, I)).

    Args:
      mean_p, cov_p: mean ``[..., d]`` and covariance ``[..., d, d]`` of p.
      mean_q, cov_q: the same for q.

    Returns:
      ``[...]``, symmetric, >= 0 (up to rounding), 0 iff p = q.

    Example:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from losses import gaussian_wasserstein_distance_squared
      >>> mu, eye = jnp.zeros(2), jnp.eye(2)
      >>> w2 = gaussian_wasserstein_distance_squared(mu, eye, jnp.array([1.0, 0.0]), 4 * eye)
      >>> print(np.asarray(w2).round(4))
      3.0
    """
    mp, cp, mq, cq, out_dtype = _prepare(mean_p, cov_p, mean_q, cov_q)
    chol_p = jnp.linalg.cholesky(cp)
    highest = jax.lax.Precision.HIGHEST  # full float32 products also on TPU/GPU
    middle = jnp.matmul(jnp.swapaxes(chol_p, -1, -2), cq, precision=highest)
    middle = jnp.matmul(middle, chol_p, precision=highest)
    middle = 0.5 * (middle + jnp.swapaxes(middle, -1, -2))
    eigenvalues = jnp.linalg.eigvalsh(middle)
    trace_sqrt = jnp.sum(jnp.sqrt(jnp.maximum(eigenvalues, 0.0)), axis=-1)
    trace = jnp.trace(cp, axis1=-2, axis2=-1) + jnp.trace(cq, axis1=-2, axis2=-1)
    w2 = jnp.sum(jnp.square(mp - mq), axis=-1) + trace - 2.0 * trace_sqrt
    return w2.astype(out_dtype)
