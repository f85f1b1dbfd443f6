"""Attention normalisers for single-head gated attention, chosen by name from `NORMALIZERS`.

Each normaliser maps float32 scores `QKᵀ` `[batch, n_q, n_k]` and a boolean mask of the same
(broadcastable) shape to attention weights, and is mask-aware: `l`, the number of valid keys in a
row (the visible tokens under causal masking, the unpadded ones under padding), replaces the
sequence length wherever a formula divides by it. Formulas: REFERENCES.md, GAU section; Hua et al.,
*Transformer Quality in Linear Time* (arXiv 2202.10447); https://kexue.fm/archives/8934 .
"""
from __future__ import annotations

import math
from typing import Callable, Protocol

import jax
import jax.numpy as jnp

# A large negative score for masked keys: finite, so fully masked rows give zeros, not NaN.
_MASKED_SCORE = -1e30


class Normalizer(Protocol):
    def __call__(self, scores: jax.Array, mask: jax.Array, *, key_dim: int, train_length: int) -> jax.Array:
        ...


def valid_key_counts(mask: jax.Array) -> jax.Array:
    """`l`: valid keys per row, `[..., n_q, 1]` float32, at least 1 so empty rows divide safely."""
    return jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True, dtype=jnp.float32), 1.0)


def masked_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax over the last axis restricted to `mask`; fully masked rows give all zeros."""
    logits = jnp.where(mask, logits, _MASKED_SCORE)
    weights = jax.nn.softmax(logits, axis=-1)
    return jnp.where(mask, weights, 0.0)


def softmax(scores, mask, *, key_dim, train_length):
    """`softmax(QKᵀ/√s)`."""
    del train_length
    return masked_softmax(scores / math.sqrt(key_dim), mask)


def relu2(scores, mask, *, key_dim, train_length):
    """`relu²(QKᵀ/√s) / l` (bert4keras `squared_relu`; post 8934 with n replaced by the valid count l)."""
    del train_length
    weights = jnp.square(jax.nn.relu(scores / math.sqrt(key_dim))) / valid_key_counts(mask)
    return jnp.where(mask, weights, 0.0)


NORMALIZERS: dict[str, Callable[..., jax.Array]] = {
    "softmax": softmax,
    "relu2": relu2,
}


def get_normalizer(name: str) -> Callable[..., jax.Array]:
    """The normaliser registered as `name`; a `ValueError` lists the valid names otherwise."""
    try:
        return NORMALIZERS[name]
    except KeyError:
        raise ValueError(f"unknown attention normaliser {name!r}; expected one of {sorted(NORMALIZERS)}") from None


def attention_mask(query_positions: jax.Array, key_positions: jax.Array, *, causal: bool,
                   key_valid: jax.Array | None = None) -> jax.Array:
    """Boolean mask `[batch or 1, n_q, n_k]`: key visible to query (causal) and not padding.

    Args:
      query_positions: `[n_q]` or `[batch, n_q]` global positions of the queries.
      key_positions: `[n_k]` or `[batch, n_k]` global positions of the keys.
      causal: whether a query may only see keys at positions ≤ its own.
      key_valid: optional `[batch, n_k]` booleans, False for padding (or unwritten cache slots).
    """
    q = jnp.atleast_2d(query_positions)[..., :, None]
    k = jnp.atleast_2d(key_positions)[..., None, :]
    mask = (k <= q) if causal else jnp.ones(jnp.broadcast_shapes(q.shape, k.shape), bool)
    if key_valid is not None:
        mask = mask & key_valid[:, None, :]
    return mask
