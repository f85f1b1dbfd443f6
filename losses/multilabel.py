r"""Multi-label "softmax + cross-entropy" (ZLPR), dense and sparse.

ZLPR (zero-bounded log-sum-exp & pairwise rank-based) loss, from Su Jianlin's posts:

* 7359, "将“softmax+交叉熵”推广到多标签分类问题" (extending softmax + cross-entropy to multi-label
  classification), https://kexue.fm/archives/7359;
* 9064, "多标签“Softmax+交叉熵”的软标签版本" (its soft-label version), https://kexue.fm/archives/9064;
* 8888, "GPLinker：基于GlobalPointer的实体关系联合抽取" (the sparse version), https://kexue.fm/archives/8888;
* Su et al., "ZLPR: A Novel Loss for Multi-label Classification", arXiv 2208.02955.

Classes with a positive score are predicted; the threshold 0 is learned through the appended zero
logit, so no per-class threshold needs tuning. For soft labels the loss is minimised at
:math:`t_i = \sigma(2 s_i)`, which is the calibration map to use (not :math:`\sigma(s_i)`).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from losses import _numerics

Array = jax.Array


def multilabel_categorical_crossentropy(logits: Any, labels: Any, *, where: Any = None) -> Array:
    r"""ZLPR loss with hard (0/1) or soft (in [0, 1]) labels.

    .. math::
      \ell(s, t) = \log\Big(1 + \sum_i t_i e^{-s_i}\Big)
                 + \log\Big(1 + \sum_i (1 - t_i) e^{s_i}\Big),

    which for hard labels is :math:`\log(1 + \sum_{i \in \Omega_{neg}} e^{s_i}) + \log(1 +
    \sum_{j \in \Omega_{pos}} e^{-s_j})`. Each term is a weighted logsumexp with a zero logit
    appended (weights :math:`t_i` resp. :math:`1 - t_i`), computed without taking log t, so
    t = 0 and t = 1 need no clipping. With a single class and hard labels it equals the sigmoid
    binary cross-entropy :math:`\log(1 + e^{-s})` / :math:`\log(1 + e^{s})`; with soft labels it
    does not (its minimiser is :math:`\sigma(2s) = t`, not :math:`\sigma(s) = t`).

    Args:
      logits: scores, shape ``[..., num_classes]``, floating point. Predict classes with s > 0.
      labels: same shape as ``logits``; hard 0/1 or soft targets in [0, 1] (bool and integer
        0/1 arrays are accepted). The range is checked only for concrete arrays (outside
        ``jax.jit``/``vmap``/``grad``); under tracing out-of-range labels are not detected.
      where: optional boolean class mask broadcastable to ``logits.shape``; masked classes are
        left out of both sums (a row with every class masked has loss 0). Mask with ``where``,
        not with -inf logits (bert4keras' convention): an infinite logit gives NaN here.

    Returns:
      Per-example loss, shape ``logits.shape[:-1]``, dtype of ``logits`` (computed in float32 for
      float16/bfloat16 inputs).

    Example:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from losses import multilabel_categorical_crossentropy
      >>> logits = jnp.array([[2.0, -1.0, 0.5], [-3.0, -2.0, -1.0]])
      >>> labels = jnp.array([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
      >>> print(np.asarray(multilabel_categorical_crossentropy(logits, labels)).round(4))
      [0.8682 0.4402]
    """
    _numerics.check_unit_interval(labels, "labels")  # values: eager calls only
    return _dense(logits, labels, where)


@jax.jit
def _dense(logits: Array, labels: Array, where: Array | None) -> Array:
    logits = _numerics.floating(logits, "logits")
    _numerics.check_num_classes(logits)
    labels = jnp.asarray(labels)
    _numerics.check_same_shape(logits, labels, "logits", "labels")
    mask = _numerics.class_mask(where, logits.shape)

    dtype = _numerics.compute_dtype(logits.dtype)
    s = logits.astype(dtype)
    t = jnp.where(mask, labels.astype(dtype), 0.0)
    not_t = jnp.where(mask, 1.0 - labels.astype(dtype), 0.0)
    loss = _numerics.log1p_weighted_sum_exp(-s, t) + _numerics.log1p_weighted_sum_exp(s, not_t)
    return loss.astype(logits.dtype)


def sparse_multilabel_categorical_crossentropy(
    logits: Any, label_indices: Any, *, mask_zero: bool = False
) -> Array:
    r"""ZLPR loss with the positive classes given as indices, for huge label sets.

    .. math::
      \ell = \log\Big(1 + \sum_{j \in P} e^{-s_j}\Big) + \log\Big(1 + \sum_{i \notin P} e^{s_i}\Big),

    equal to :func:`multilabel_categorical_crossentropy` on the multi-hot labels of ``P``. The
    labels never exist as a dense float array; the positive term gathers only ``k`` logits.

    Numerics: post 8888 writes the negative term as :math:`a + \log(1 - e^{b - a})`,
    :math:`a = \log(1 + \sum_{all} e^{s})`, :math:`b = \log \sum_P e^{s}`. That subtraction cancels
    catastrophically once the positive scores dominate (at s = 1e4 in float32, :math:`a - b`
    rounds to 0 and the term becomes :math:`-\infty`, or a clipped wrong value, instead of the
    true small number). Here the positives are instead excluded exactly, through a boolean
    ``[..., num_classes]`` mask built by a scatter (one byte per class).

    Args:
      logits: scores, shape ``[..., num_classes]``.
      label_indices: integer indices of the positive classes, shape ``[..., k]`` with the same
        leading shape as ``logits``. Indices within a row must be distinct (a repeated index is
        counted twice in the positive term).
      mask_zero: if True, index 0 is padding: class 0 is reserved (never positive, never
        negative, its logit is ignored) and zeros in ``label_indices`` pad rows with fewer
        positives, as in bert4keras. Range (and, for concrete inputs, distinctness) is checked
        only for concrete arrays.

    Returns:
      Per-example loss, shape ``logits.shape[:-1]``, dtype of ``logits``.

    Example:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from losses import sparse_multilabel_categorical_crossentropy
      >>> from losses import multilabel_categorical_crossentropy
      >>> logits = jnp.array([[2.0, -1.0, 0.5], [-3.0, -2.0, -1.0]])
      >>> positives = jnp.array([[0, 2], [2, 1]])        # rows' positive classes
      >>> print(np.asarray(sparse_multilabel_categorical_crossentropy(logits, positives)).round(4))
      [0.8682 2.4562]
      >>> multi_hot = jnp.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
      >>> print(np.asarray(multilabel_categorical_crossentropy(logits, multi_hot)).round(4))
      [0.8682 2.4562]
    """
    _check_concrete_indices(label_indices, jnp.shape(logits)[-1:], mask_zero)
    return _sparse(logits, label_indices, mask_zero)


@functools.partial(jax.jit, static_argnames="mask_zero")
def _sparse(logits: Array, label_indices: Array, mask_zero: bool) -> Array:
    logits = _numerics.floating(logits, "logits")
    num_classes = _numerics.check_num_classes(logits)
    indices = _numerics.integer(label_indices, "label_indices")
    if indices.ndim != logits.ndim or indices.shape[:-1] != logits.shape[:-1]:
        raise ValueError(
            f"`label_indices` must have shape [..., k] with leading shape logits.shape[:-1] = "
            f"{logits.shape[:-1]}, got {indices.shape}."
        )
    dtype = _numerics.compute_dtype(logits.dtype)
    s = logits.astype(dtype)
    rows, k = int(np.prod(indices.shape[:-1], dtype=np.int64)), indices.shape[-1]
    is_positive = (
        jnp.zeros((rows, num_classes), dtype=bool)
        .at[jnp.arange(rows)[:, None], indices.reshape(rows, k)]
        .set(True)
        .reshape(s.shape)
    )
    is_class = jnp.arange(num_classes) != 0 if mask_zero else jnp.ones(num_classes, dtype=bool)
    positive_valid = indices != 0 if mask_zero else jnp.ones(indices.shape, dtype=bool)

    positive_logits = jnp.take_along_axis(s, indices, axis=-1)
    pos_loss = _numerics.log1p_weighted_sum_exp(-positive_logits, positive_valid.astype(dtype))
    neg_loss = _numerics.log1p_weighted_sum_exp(s, (is_class & ~is_positive).astype(dtype))
    return (pos_loss + neg_loss).astype(logits.dtype)


def _check_concrete_indices(indices: Any, num_classes: tuple[int, ...], mask_zero: bool) -> None:
    """Range and distinctness of concrete indices (silently clamped / double counted otherwise)."""
    if not num_classes or not _numerics.is_concrete(indices) or jnp.ndim(indices) < 1:
        return  # shape errors are reported by the traced check
    _numerics.check_index_range(indices, num_classes[0], "label_indices")
    values = np.asarray(indices)
    ordered = np.sort(values, axis=-1)
    repeated = ordered[..., 1:] == ordered[..., :-1]
    if mask_zero:
        repeated &= ordered[..., 1:] != 0
    if repeated.any():
        raise ValueError(
            "`label_indices` repeats a class within a row; each positive must appear once"
            + (" (only the padding index 0 may repeat)." if mask_zero else ".")
        )
