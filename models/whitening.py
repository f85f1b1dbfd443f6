r"""BERT-whitening with the two hyperparameters β and γ: a fitted linear transform of embeddings.

Post 9079, "当BERT-whitening引入超参数：总有一款适合你", https://kexue.fm/archives/9079, which
extends BERT-whitening (Su et al., "Whitening Sentence Representations for Better Semantics and
Faster Retrieval", arXiv 2103.15316; post 8069):

.. math::
  \tilde x = (x - \beta\mu)\, U \Lambda^{-\gamma/2}, \qquad
  U \Lambda U^\top = \frac1N \sum_n (x_n - \beta\mu)(x_n - \beta\mu)^\top,

keeping the ``dim`` directions of largest :math:`\Lambda`. β = γ = 1 is full whitening (zero mean,
identity covariance); β = γ = 0 is a rotation, which keeps every cosine similarity (and with
``dim < d``, a PCA-like truncation without rescaling). Intermediate values trade the two.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array


@flax.struct.dataclass
class Whitening:
    """A fitted whitening transform: ``apply(x) = (x - shift) @ kernel``.

    Attributes:
      shift: ``[d]``, β times the mean of the fitting embeddings.
      kernel: ``[d, dim]``, :math:`U \\Lambda^{-\\gamma/2}` restricted to the top ``dim`` directions.
    """

    shift: Array
    kernel: Array

    def __call__(self, embeddings: Array) -> Array:
        """``[..., d] -> [..., dim]``, computed in float32 at least, returned in the input dtype."""
        dtype = jnp.promote_types(embeddings.dtype, jnp.float32)
        centred = embeddings.astype(dtype) - self.shift
        out = jnp.matmul(centred, self.kernel, precision=jax.lax.Precision.HIGHEST)
        return out.astype(embeddings.dtype)


def fit_whitening(
    embeddings: Any, *, beta: float = 1.0, gamma: float = 1.0, dim: int | None = None
) -> Whitening:
    """Fit BERT-whitening with hyperparameters β, γ and output dimension ``dim``.

    Args:
      embeddings: ``[num_examples, d]`` floating-point sentence embeddings to fit on.
      beta: how much of the mean to remove (0: none, 1: all).
      gamma: how much to equalise the variances (0: rotation only, 1: unit variances).
      dim: number of output dimensions (directions of largest variance); None keeps all d.

    Returns:
      The fitted :class:`Whitening` (a pytree; apply it with ``whitening(x)``).

    Example:
      >>> import numpy as np
      >>> from models.whitening import fit_whitening
      >>> x = np.float32(np.random.default_rng(0).normal(size=(1000, 4)) * [5.0, 2.0, 1.0, 0.5] + 3)
      >>> y = np.asarray(fit_whitening(x, beta=1.0, gamma=1.0)(x), np.float64)
      >>> bool(np.allclose(y.T @ y / len(y), np.eye(4), atol=1e-4))
      True
    """
    embeddings = jnp.asarray(embeddings)
    if embeddings.ndim != 2 or not jnp.issubdtype(embeddings.dtype, jnp.floating):
        raise ValueError(
            f"`embeddings` must be a floating-point [num_examples, d] array, got {embeddings.dtype} "
            f"of shape {embeddings.shape}."
        )
    d = embeddings.shape[1]
    dim = d if dim is None else dim
    if not isinstance(dim, int) or not 1 <= dim <= d:
        raise ValueError(f"`dim` must be an int in [1, d={d}] (or None for d), got {dim!r}.")
    return _fit(embeddings, beta, gamma, dim)


@functools.partial(jax.jit, static_argnums=3)
def _fit(embeddings: Array, beta: Array, gamma: Array, dim: int) -> Whitening:
    x = embeddings.astype(jnp.promote_types(embeddings.dtype, jnp.float32))
    shift = beta * jnp.mean(x, axis=0)
    centred = x - shift
    covariance = jnp.matmul(centred.T, centred, precision=jax.lax.Precision.HIGHEST) / x.shape[0]
    eigenvalues, eigenvectors = jnp.linalg.eigh(covariance)  # ascending
    eigenvalues, eigenvectors = eigenvalues[::-1][:dim], eigenvectors[:, ::-1][:, :dim]
    # A rank-deficient covariance (fewer examples than dimensions) has ~0 eigenvalues; floor them at
    # a relative epsilon so γ > 0 gives large but finite scales instead of inf/NaN.
    floor = jnp.finfo(x.dtype).eps * jnp.maximum(eigenvalues[0], jnp.finfo(x.dtype).tiny)
    scales = jnp.maximum(eigenvalues, floor) ** (-gamma / 2)
    return Whitening(shift=shift, kernel=eigenvectors * scales)
