r"""Dense + softmax output layers in closed form: fitting one, and auditing one.

* :func:`fit_closed_form_logistic_regression`: if the features of each class are Gaussian with a
  shared covariance, the Bayes posterior is exactly a softmax of a linear layer, whose weights
  follow from class means and the pooled covariance, no gradient descent (post 8578).
* :func:`unargmaxable_classes`: which classes of a layer ``z -> z @ kernel + bias`` can never
  win the argmax, for any input (post 9046); one small linear program per class.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

Array = jax.Array


@flax.struct.dataclass
class LinearClassifier:
    """``logits = features @ kernel + bias``; kernel ``[d, num_classes]``, bias ``[num_classes]``.

    The same layout as ``flax.linen.Dense`` parameters, so ``{"kernel": c.kernel, "bias": c.bias}``
    can initialise one.
    """

    kernel: Array
    bias: Array

    def __call__(self, features: Array) -> Array:
        return jnp.matmul(features, self.kernel, precision=jax.lax.Precision.HIGHEST) + self.bias


def fit_closed_form_logistic_regression(
    features: Any, labels: Any, *, num_classes: int, ridge: float = 0.0
) -> LinearClassifier:
    r"""Softmax classifier from class means and the pooled within-class covariance (LDA).

    .. math::
      W_k = \Sigma^{-1}\mu_k, \qquad b_k = \log p_k - \tfrac12 \mu_k^\top \Sigma^{-1}\mu_k,

    with :math:`p_k` the class frequencies, :math:`\mu_k` the class means and
    :math:`\Sigma = \frac1N\sum_n (x_n - \mu_{y_n})(x_n - \mu_{y_n})^\top + \text{ridge}\cdot I`.
    For whitened features (zero mean, identity covariance) this is the post's
    :math:`\Sigma = I - \sum_k p_k \mu_k\mu_k^\top`. Exact for Gaussian classes with a shared
    covariance; a strong initialisation (or baseline) otherwise.

    Source: post 8578 (closed-form solution of "dense + softmax", with its bert4keras test
    script), https://kexue.fm/archives/8578; the classical derivation is linear discriminant
    analysis (Hastie, Tibshirani & Friedman, *The Elements of Statistical Learning*, §4.3).

    Args:
      features: ``[num_examples, d]`` floating point.
      labels: ``[num_examples]`` integer classes in ``[0, num_classes)``; every class must occur.
      num_classes: number of classes K.
      ridge: added to the covariance's diagonal (for singular or ill-conditioned Σ).

    Returns:
      The :class:`LinearClassifier` (kernel ``[d, K]``, bias ``[K]``).

    Example:
      >>> import numpy as np
      >>> from models.linear_classifiers import fit_closed_form_logistic_regression
      >>> rng = np.random.default_rng(0)
      >>> y = rng.integers(0, 3, 2000)
      >>> means = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
      >>> x = np.float32(rng.normal(size=(2000, 2)) + means[y])
      >>> classifier = fit_closed_form_logistic_regression(x, y, num_classes=3)
      >>> bool(np.mean(np.argmax(classifier(x), -1) == y) > 0.85)
      True
    """
    features, labels = jnp.asarray(features), jnp.asarray(labels)
    if features.ndim != 2 or not jnp.issubdtype(features.dtype, jnp.floating):
        raise ValueError(f"`features` must be a floating-point [num_examples, d] array, got {features.dtype} "
                         f"of shape {features.shape}.")
    if labels.shape != features.shape[:1] or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"`labels` must be integers of shape [{features.shape[0]}], got {labels.dtype} "
                         f"of shape {labels.shape}.")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"`num_classes` must be an int >= 2, got {num_classes!r}.")
    if not isinstance(labels, jax.core.Tracer):
        counts = np.bincount(np.asarray(labels), minlength=num_classes)
        if counts.size > num_classes or np.asarray(labels).min() < 0 or np.any(counts == 0):
            raise ValueError(
                f"`labels` must cover every class in [0, {num_classes}) (class counts: {counts})."
            )
    return _fit(features, labels, ridge, num_classes)


@functools.partial(jax.jit, static_argnums=3)
def _fit(features: Array, labels: Array, ridge: Array, num_classes: int) -> LinearClassifier:
    x = features.astype(jnp.promote_types(features.dtype, jnp.float32))
    highest = jax.lax.Precision.HIGHEST
    counts = jnp.bincount(labels, length=num_classes).astype(x.dtype)
    means = jax.ops.segment_sum(x, labels, num_segments=num_classes) / counts[:, None]  # [K, d]
    centred = x - means[labels]
    covariance = jnp.matmul(centred.T, centred, precision=highest) / x.shape[0]
    covariance = covariance + ridge * jnp.eye(x.shape[1], dtype=x.dtype)
    kernel = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(covariance), means.T)  # Σ⁻¹ μ_k
    bias = jnp.log(counts / x.shape[0]) - 0.5 * jnp.sum(means.T * kernel, axis=0)
    return LinearClassifier(kernel=kernel, bias=bias)


def unargmaxable_classes(kernel: Any, bias: Any = None, *, tol: float = 1e-7) -> np.ndarray:
    r"""Classes that are never the (strict) argmax of ``z @ kernel + bias``, whatever ``z``.

    Class k can win iff some :math:`z` has :math:`(w_k - w_i)^\top z + b_k - b_i > 0` for all
    :math:`i \ne k`. Per class this is the linear program

    .. math::
      \max_{z,\, t \le 1}\; t \quad \text{s.t.} \quad (w_i - w_k)^\top z + t \le b_k - b_i
      \quad (i \ne k),

    and k is argmaxable iff the optimum t exceeds ``tol``. Without bias, k is unargmaxable iff
    :math:`w_k` lies in the convex hull of the other weight vectors; only a layer with more
    classes than dimensions + 1 can have such classes, and one whose weights all have the same
    norm cannot. (The post decides the same max-min problem through the minimax theorem and
    Frank-Wolfe; a linear program gives it exactly.)

    Source: post 9046, "你的语言模型有没有“无法预测的词”？" (does your language model have words
    it can never predict?), https://kexue.fm/archives/9046; Grivas, Bogoychev & Lopez,
    "Low-Rank Softmax Can Have Unargmaxable Classes in Theory but Rarely in Practice",
    ACL 2022, arXiv 2203.06462. Solved with ``scipy.optimize.linprog`` (HiGHS); K programs of
    K - 1 constraints and d + 1 variables, so meant for audits, not for inner loops.

    Args:
      kernel: ``[d, num_classes]`` (``flax.linen.Dense`` layout).
      bias: ``[num_classes]`` or None (zeros).
      tol: margin below which a class counts as unargmaxable (ties are not wins).

    Returns:
      Sorted int array of the unargmaxable class indices (empty if every class can win).

    Example:
      >>> import numpy as np
      >>> from models.linear_classifiers import unargmaxable_classes
      >>> # The post's example: w_1..w_4 = w_5 + (0, 1), (1, 0), (0, -1), (-1, 0); w_5 = (1, 1).
      >>> kernel = np.array([[1.0, 2.0], [2.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]).T
      >>> unargmaxable_classes(kernel)
      array([4])
      >>> unargmaxable_classes(kernel, np.array([0.0, 0.0, 0.0, 0.0, 0.5]))  # a bias rescues it
      array([], dtype=int64)
    """
    w = np.asarray(kernel, np.float64)
    if w.ndim != 2 or w.shape[1] < 2:
        raise ValueError(f"`kernel` must have shape [d, num_classes >= 2], got {w.shape}.")
    num_classes = w.shape[1]
    b = np.zeros(num_classes) if bias is None else np.asarray(bias, np.float64)
    if b.shape != (num_classes,):
        raise ValueError(f"`bias` must have shape [{num_classes}], got {b.shape}.")
    never = [k for k in range(num_classes) if _best_margin(w, b, k) <= tol]
    return np.array(never, dtype=np.int64)


def _best_margin(w: np.ndarray, b: np.ndarray, k: int) -> float:
    """max over z of min_{i≠k} (w_k - w_i)·z + b_k - b_i, capped at 1."""
    others = np.arange(w.shape[1]) != k
    d = w.shape[0]
    a_ub = np.hstack([(w[:, others] - w[:, [k]]).T, np.ones((others.sum(), 1))])  # [(w_i - w_k)ᵀ, 1]
    b_ub = b[k] - b[others]
    cost = np.zeros(d + 1)
    cost[-1] = -1.0  # maximise t
    bounds = [(None, None)] * d + [(None, 1.0)]
    result = scipy.optimize.linprog(cost, A_ub=a_ub, b_ub=b_ub, bounds=bounds, method="highs")
    if result.status != 0:
        raise RuntimeError(f"linear program for class {k} failed: {result.message}")
    return -result.fun
