r"""Hubness of an embedding set: the skewness of its k-occurrence distribution.

In high dimensions a few points ("hubs") are among the k nearest neighbours of very many others
while many points are nobody's neighbour. :math:`N_k(x)`, the number of points that have x among
their k nearest neighbours, has mean exactly k; its skewness measures hubness (0 for a symmetric
distribution, large and positive with hubs). Hubness degrades nearest-neighbour retrieval, and
whitening (:mod:`models.whitening`) is one of the transforms that reduce it.

Source: Radovanović, Nanopoulos & Ivanović, "Hubs in Space: Popular Nearest Neighbors in
High-Dimensional Data", JMLR 11, 2010.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array


def _cosine_similarity(queries: Array, points: Array) -> Array:
    unit = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # noqa: E731
    return jnp.matmul(unit(queries), unit(points).T, precision=jax.lax.Precision.HIGHEST)


def _negative_squared_euclidean(queries: Array, points: Array) -> Array:
    cross = jnp.matmul(queries, points.T, precision=jax.lax.Precision.HIGHEST)
    return 2 * cross - jnp.sum(queries**2, -1)[:, None] - jnp.sum(points**2, -1)[None, :]


# metric name -> similarity(queries [m, d], points [n, d]) -> [m, n], larger = nearer.
SIMILARITIES: dict[str, Callable[[Array, Array], Array]] = {
    "cosine": _cosine_similarity,
    "euclidean": _negative_squared_euclidean,
}


def k_occurrence(embeddings: Any, *, k: int = 10, metric: str = "cosine", block_size: int = 1024) -> Array:
    """:math:`N_k(x_j)`: how many other points have :math:`x_j` among their k nearest neighbours.

    A point is not its own neighbour. Neighbours are found ``block_size`` query rows at a time,
    so memory is ``block_size * num_points``, not ``num_points²``; ties go to the lower index.

    Args:
      embeddings: ``[num_points, d]``.
      k: neighbourhood size, ``1 <= k < num_points``.
      metric: a name from ``SIMILARITIES`` (``"cosine"`` or ``"euclidean"``).
      block_size: query rows per block.

    Returns:
      int32 ``[num_points]``; it sums to ``k * num_points``.
    """
    embeddings = jnp.asarray(embeddings)
    if embeddings.ndim != 2 or not jnp.issubdtype(embeddings.dtype, jnp.floating):
        raise ValueError(
            f"`embeddings` must be a floating-point [num_points, d] array, got {embeddings.dtype} "
            f"of shape {embeddings.shape}."
        )
    n = embeddings.shape[0]
    if not isinstance(k, int) or not 1 <= k < n:
        raise ValueError(f"`k` must be an int in [1, num_points - 1 = {n - 1}], got {k!r}.")
    if metric not in SIMILARITIES:
        raise ValueError(f"`metric` must be one of {sorted(SIMILARITIES)}, got {metric!r}.")
    return _k_occurrence(embeddings, k, metric, min(block_size, n))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _k_occurrence(embeddings: Array, k: int, metric: str, block_size: int) -> Array:
    x = embeddings.astype(jnp.promote_types(embeddings.dtype, jnp.float32))
    n = x.shape[0]
    num_blocks = -(-n // block_size)
    padded = jnp.pad(x, ((0, num_blocks * block_size - n), (0, 0)))

    def neighbours(start: Array) -> Array:
        queries = jax.lax.dynamic_slice_in_dim(padded, start, block_size)
        similarity = SIMILARITIES[metric](queries, x)
        rows = start + jnp.arange(block_size)
        similarity = jnp.where(rows[:, None] == jnp.arange(n), -jnp.inf, similarity)  # not itself
        return jax.lax.top_k(similarity, k)[1]  # [block_size, k]

    indices = jax.lax.map(neighbours, jnp.arange(num_blocks) * block_size).reshape(-1, k)[:n]
    return jnp.bincount(indices.reshape(-1), length=n).astype(jnp.int32)


def k_occurrence_skewness(
    embeddings: Any, *, k: int = 10, metric: str = "cosine", block_size: int = 1024
) -> Array:
    r"""Hubness: the skewness of the k-occurrence distribution.

    .. math::
      S_{N_k} = \frac{\mathbb{E}\big[(N_k - k)^3\big]}{\big(\mathbb{E}\big[(N_k - k)^2\big]\big)^{3/2}},

    (population moments; the mean of :math:`N_k` is exactly k). Values near 0 mean no hubs.
    Cosine hubness is strong when the embeddings share a common offset (as language-model
    sentence embeddings do) and weak once they are centred and whitened.

    Args:
      embeddings: ``[num_points, d]``.
      k: neighbourhood size.
      metric: ``"cosine"`` or ``"euclidean"``.
      block_size: query rows per block (memory ``block_size * num_points``).

    Returns:
      A float32 scalar.

    Example:
      >>> import numpy as np
      >>> from models.hubness import k_occurrence_skewness
      >>> from models.whitening import fit_whitening
      >>> x = np.float32(np.random.default_rng(0).normal(size=(1000, 50)) + 1.0)  # a shared offset
      >>> before = k_occurrence_skewness(x, k=10)
      >>> after = k_occurrence_skewness(fit_whitening(x)(x), k=10)
      >>> bool(before > 1.0 > 0.5 > after)
      True
    """
    counts = k_occurrence(embeddings, k=k, metric=metric, block_size=block_size).astype(jnp.float32)
    deviation = counts - k
    return jnp.mean(deviation**3) / jnp.mean(deviation**2) ** 1.5
