"""Input validation and the masked log-sum-exp kernels shared by the losses.

Validation runs at trace time on shapes and dtypes, so a bad call fails before anything compiles
and the message names the argument. Checks on *values* (labels in [0, 1], indices in range, a
positive prior) need concrete arrays: they run when the argument is not a tracer (eager calls)
and are skipped inside `jax.jit`, `jax.vmap` and `jax.grad`, where the values are unknown.

Nothing here creates a JAX array at import time, so importing `losses` never initialises a
backend (tests set the fake-device count before JAX starts).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def is_concrete(x: Any) -> bool:
    """True when `x` holds values (not a tracer inside jit/vmap/grad)."""
    return not isinstance(x, jax.core.Tracer)


def floating(x: Any, name: str) -> Array:
    """`x` as a JAX array, or a ValueError naming `name` if it is not floating point."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"`{name}` must be a floating-point array (float16/bfloat16/float32/float64), "
            f"got dtype {x.dtype}; cast it, e.g. `{name}.astype(jnp.float32)`."
        )
    return x


def integer(x: Any, name: str) -> Array:
    """`x` as a JAX array, or a ValueError naming `name` if it is not of integer dtype."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"`{name}` must hold integer class indices, got dtype {x.dtype}.")
    return x


def compute_dtype(dtype: Any) -> Any:
    """float16/bfloat16 compute in float32; float32 and float64 stay as they are."""
    return jnp.promote_types(dtype, jnp.float32)


def check_num_classes(logits: Array, name: str = "logits", minimum: int = 1) -> int:
    if logits.ndim < 1 or logits.shape[-1] < minimum:
        raise ValueError(
            f"`{name}` must have shape [..., num_classes] with num_classes >= {minimum}, "
            f"got shape {logits.shape}."
        )
    return logits.shape[-1]


def check_same_shape(a: Array, b: Array, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"`{name_b}` must have the same shape as `{name_a}` {a.shape}, got {b.shape}."
        )


def check_index_labels(labels: Any, logits: Array, name: str = "labels") -> Array:
    """Integer labels of shape logits.shape[:-1], values checked in [0, num_classes) if concrete."""
    labels = integer(labels, name)
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"`{name}` must have shape logits.shape[:-1] = {logits.shape[:-1]} (one class index "
            f"per example), got {labels.shape}."
        )
    return labels


def check_index_range(indices: Any, num_classes: int, name: str = "labels") -> None:
    """ValueError if concrete `indices` leave [0, num_classes); no-op under tracing.

    Out-of-range indices would otherwise be clamped silently by JAX's gather.
    """
    if is_concrete(indices):
        values = np.asarray(indices)
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(
                f"`{name}` must be class indices in [0, {num_classes}), got values in "
                f"[{values.min()}, {values.max()}]."
            )


def check_unit_interval(x: Any, name: str) -> None:
    """ValueError if concrete `x` has a value outside [0, 1] (or NaN); no-op under tracing."""
    if is_concrete(x):
        values = np.asarray(x, dtype=np.float64)
        if values.size and not np.all((values >= 0.0) & (values <= 1.0)):
            raise ValueError(
                f"`{name}` must lie in [0, 1] (hard 0/1 or soft labels), got values in "
                f"[{np.nanmin(values)}, {np.nanmax(values)}]"
                + (" and NaN" if np.isnan(values).any() else "")
                + "."
            )


def class_mask(where: Any, shape: tuple[int, ...], name: str = "where") -> Array:
    """A boolean class mask broadcast to `shape`; None means every class is included."""
    if where is None:
        return jnp.ones(shape, dtype=bool)
    where = jnp.asarray(where)
    if not (where.dtype == jnp.bool_ or jnp.issubdtype(where.dtype, jnp.integer)):
        raise ValueError(f"`{name}` must be a boolean (or 0/1 integer) mask, got dtype {where.dtype}.")
    try:
        return jnp.broadcast_to(where.astype(bool), shape)
    except ValueError:
        raise ValueError(
            f"`{name}` of shape {where.shape} does not broadcast to the logits' shape {shape}; "
            "it masks classes, e.g. [num_classes] or [batch, num_classes]."
        ) from None


def masked_logsumexp_parts(x: Array, mask: Array, axis: int = -1) -> tuple[Array, Array]:
    """log Σ_{mask} e^{x} along `axis` as `(shift, log_total)`, the logsumexp being their sum.

    Keeping the two apart lets callers form differences such as log softmax as
    `(x - shift) - log_total`: with float32 logits of size 1e4, `shift + log_total` would be
    rounded to a spacing of ~1e-3, and every log-probability with it. `shift` (the masked max,
    0 for an empty row) carries no gradient; `log_total` is -inf for an empty row, with zero
    gradient. Masked entries never reach `exp`, so huge masked values cannot overflow and an
    empty row gives no 0/0 in the backward pass (which `jax.nn.logsumexp(where=...)` can).
    Both outputs keep the reduced axis (size 1).
    """
    shift = jnp.max(jnp.where(mask, x, -jnp.inf), axis=axis, keepdims=True, initial=-jnp.inf)
    shift = jax.lax.stop_gradient(jnp.where(jnp.isfinite(shift), shift, 0.0))
    total = jnp.sum(jnp.exp(jnp.where(mask, x - shift, -jnp.inf)), axis=axis, keepdims=True)
    nonempty = total > 0
    log_total = jnp.where(nonempty, jnp.log(jnp.where(nonempty, total, 1.0)), -jnp.inf)
    return shift, log_total


def masked_log_softmax(x: Array, mask: Array, axis: int = -1) -> Array:
    """log softmax over the masked entries; 0 (not -inf) at masked ones, so 0 * it stays 0."""
    shift, log_total = masked_logsumexp_parts(x, mask, axis)
    return jnp.where(mask, (x - shift) - log_total, 0.0)


def log1p_weighted_sum_exp(x: Array, weights: Array, axis: int = -1) -> Array:
    """log(1 + Σ_i w_i e^{x_i}) along `axis`, for weights w_i >= 0.

    This is the weighted logsumexp over x with a zero logit (weight 1) appended, computed without
    materialising the concatenation and without log(w) (so w = 0 needs no clipping). The shift
    max(0, max_{w>0} x) keeps every exponent <= 0, and the sum is >= the shifted appended term or
    the largest weighted term, so the log never sees 0 for weights that are not themselves
    denormal.
    """
    include = weights > 0
    shift = jnp.max(jnp.where(include, x, -jnp.inf), axis=axis, keepdims=True, initial=-jnp.inf)
    shift = jax.lax.stop_gradient(jnp.maximum(shift, 0.0))
    terms = weights * jnp.exp(jnp.where(include, x - shift, -jnp.inf))
    total = jnp.exp(-shift) + jnp.sum(terms, axis=axis, keepdims=True)
    return jnp.squeeze(shift + jnp.log(total), axis)


def take_class(x: Array, labels: Array) -> Array:
    """x[..., labels] for one class index per example: [..., n], [...] -> [...]."""
    return jnp.take_along_axis(x, labels[..., None], axis=-1)[..., 0]


def softmax_parts(logits: Array, labels: Array, mask: Array) -> tuple[Array, Array, Array]:
    """Shared pieces of the softmax losses, safe for masked rows.

    Returns `(log_p_target, log_one_minus_p_target, valid)`, each of shape logits.shape[:-1].
    `valid` is False where the target class is masked out (this includes fully masked rows); there
    the mask is replaced by "all classes" so every intermediate stays finite, and callers must
    zero the loss with `valid`. `log_one_minus_p_target` = logsumexp over the other classes minus
    logsumexp over all: exact where p_t is close to 1 (no 1 - p cancellation), -inf where the
    target is the only class. Differences of large logits are formed before any rounding of a
    logsumexp (see `masked_logsumexp_parts`).
    """
    valid = take_class(mask, labels)
    mask = mask | ~valid[..., None]
    is_target = jnp.arange(logits.shape[-1]) == labels[..., None]
    shift, log_total = masked_logsumexp_parts(logits, mask)
    other_shift, other_log_total = masked_logsumexp_parts(logits, mask & ~is_target)
    log_p_target = (take_class(logits, labels) - shift[..., 0]) - log_total[..., 0]
    log_one_minus_p = (other_shift - shift)[..., 0] + (other_log_total - log_total)[..., 0]
    return log_p_target, log_one_minus_p, valid
