"""Attention normalisers for single-head gated attention, chosen by name from `NORMALIZERS`.

Each normaliser maps float32 scores `QKᵀ` `[..., n_q, n_k]` and a boolean mask of the same
(broadcastable) shape to attention weights, and is mask-aware: `l`, the number of valid keys in a
row (the visible tokens under causal masking, the unpadded ones under padding), replaces the
sequence length wherever a formula divides by it. Masked weights are exactly zero, and a fully
masked row gives zeros, never NaN. Formulas: REFERENCES.md, GAU section; Hua et al., *Transformer
Quality in Linear Time* (arXiv 2202.10447); https://kexue.fm/archives/8934 (relu², FLASH),
https://kexue.fm/archives/8823 and https://kexue.fm/archives/9019 (softmax_plus),
https://kexue.fm/archives/9105 (l2).

Callers pass scores in float32 whatever the compute dtype (`preferred_element_type=jnp.float32`):
relu² squares them and softmax exponentiates them, both of which lose bf16 inputs' precision.
"""
from __future__ import annotations

import math
from typing import Callable, Protocol

import jax
import jax.numpy as jnp

# A large negative score for masked keys: finite, so fully masked rows give zeros, not NaN.
_MASKED_SCORE = -1e30
# softmax_plus: the length below which the scale stops shrinking, and the length at which it is 1.
_SOFTMAX_PLUS_MIN_LENGTH = 16
_SOFTMAX_PLUS_REFERENCE_LENGTH = 512


class Normalizer(Protocol):
    def __call__(self, scores: jax.Array, mask: jax.Array, *, key_dim: int, train_length: int,
                 sequence_length: jax.Array | int | None = None) -> jax.Array:
        ...


def valid_key_counts(mask: jax.Array) -> jax.Array:
    """`l`: valid keys per row, `[..., n_q, 1]` float32, at least 1 so empty rows divide safely."""
    return jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True, dtype=jnp.float32), 1.0)


def visible_key_counts(n: int, *, causal: bool, key_valid: jax.Array | None = None, batch: int = 1) -> jax.Array:
    """l_i, the keys query i sees, `[batch, n]` float32 (≥ 1), from the causal flag and padding alone:
    `valid_key_counts` without forming the n×n mask (blockwise and chunked attention use it)."""
    valid = jnp.ones((batch, n), bool) if key_valid is None else key_valid.astype(bool)
    if causal:
        counts = jnp.cumsum(valid, axis=-1, dtype=jnp.float32)
    else:
        counts = jnp.broadcast_to(jnp.sum(valid, axis=-1, keepdims=True, dtype=jnp.float32), valid.shape)
    return jnp.maximum(counts, 1.0)


def softmax_plus_scale(counts: jax.Array) -> jax.Array:
    """softmax_plus's factor log(max(l, 16)) / log 512 for visible-key counts l (posts 8823, 9019)."""
    return jnp.log(jnp.maximum(counts, _SOFTMAX_PLUS_MIN_LENGTH)) / math.log(_SOFTMAX_PLUS_REFERENCE_LENGTH)


def sequence_key_count(mask: jax.Array) -> jax.Array:
    """`n` of the paper's `relu²(QKᵀ/n)`: keys visible to *some* row, `[..., 1, 1]` float32, at least 1.

    Without padding this is the static length (a causal mask's last row sees every key); with padding,
    the unpadded length. It is the same for every row, unlike `valid_key_counts`.
    """
    seen = jnp.any(mask, axis=-2, keepdims=True)
    return jnp.maximum(jnp.sum(seen, axis=-1, keepdims=True, dtype=jnp.float32), 1.0)


def masked_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax over the last axis restricted to `mask`; fully masked rows give all zeros."""
    logits = jnp.where(mask, logits, _MASKED_SCORE)
    weights = jax.nn.softmax(logits, axis=-1)
    return jnp.where(mask, weights, 0.0)


def softmax(scores, mask, *, key_dim, train_length, sequence_length=None):
    """`softmax(QKᵀ/√s)`."""
    del train_length, sequence_length
    return masked_softmax(scores / math.sqrt(key_dim), mask)


def softmax_plus(scores, mask, *, key_dim, train_length, sequence_length=None):
    """Entropy-invariant softmax `softmax(QKᵀ/√s · log(max(l, 16)) / log 512)`, l = valid keys in the row.

    The scale grows like log l, which keeps the attention's entropy roughly constant as the visible
    length grows (posts https://kexue.fm/archives/8823, https://kexue.fm/archives/9019; bert4keras).
    """
    del train_length, sequence_length
    return masked_softmax(scores / math.sqrt(key_dim) * softmax_plus_scale(valid_key_counts(mask)), mask)


def relu2(scores, mask, *, key_dim, train_length, sequence_length=None):
    """`relu²(QKᵀ/√s) / l` (bert4keras `squared_relu`; post 8934 with n replaced by the valid count l)."""
    del train_length, sequence_length
    weights = jnp.square(jax.nn.relu(scores / math.sqrt(key_dim))) / valid_key_counts(mask)
    return jnp.where(mask, weights, 0.0)


def relu2_fixed(scores, mask, *, key_dim, train_length, sequence_length=None):
    """`relu²(QKᵀ/√s) / T` with T the configured training length, the same at every length and row."""
    del sequence_length
    weights = jnp.square(jax.nn.relu(scores / math.sqrt(key_dim))) / float(train_length)
    return jnp.where(mask, weights, 0.0)


def relu2_paper(scores, mask, *, key_dim, train_length, sequence_length=None):
    """`relu²(QKᵀ/n)`, as the paper's pseudo-code writes it (`relu(qk / seq_len)²`, arXiv 2202.10447 App. A).

    What n is under masks (a decision, since the paper's code never masks): n is the length of the
    *sequence*, not of the row: the same for every query, causal or not, with padding left out. So
    padding changes nothing, but a causal token's output depends on the total length, as in the
    paper. `sequence_length` gives n explicitly (`[batch]` or a scalar; FLASH passes its chunk size C,
    as the paper's local attention does; decoding passes the cache length); by default it is
    `sequence_key_count(mask)`. `key_dim` is unused: the paper divides by n instead of √s.
    """
    del key_dim, train_length
    if sequence_length is None:
        n = sequence_key_count(mask)
    else:
        n = jnp.asarray(sequence_length, jnp.float32)
        n = n.reshape(n.shape + (1,) * (scores.ndim - n.ndim)) if n.ndim else n
    weights = jnp.square(jax.nn.relu(scores / n))
    return jnp.where(mask, weights, 0.0)


def l2(scores, mask, *, key_dim, train_length, sequence_length=None):
    """`a_ij = e^{b_ij} / sqrt(Σ_j e^{2 b_ij})`, `b = QKᵀ/√s` (https://kexue.fm/archives/9105).

    Rows are unit vectors in ℓ2, not ℓ1, so identical values no longer average to themselves: the
    zeros → positions probe becomes solvable. Computed stably as `e^{b − m} / sqrt(Σ e^{2(b − m)})`
    with m the row maximum over valid keys: the largest term is then exactly 1, so the sum is ≥ 1 in
    every non-empty row and clamping it at 1 only affects empty rows (which give zeros).
    """
    del train_length, sequence_length
    logits = jnp.where(mask, scores / math.sqrt(key_dim), _MASKED_SCORE)
    shifted = jnp.where(mask, jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True)), 0.0)
    norm = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(shifted), axis=-1, keepdims=True), 1.0))
    return shifted / norm


NORMALIZERS: dict[str, Callable[..., jax.Array]] = {
    "softmax": softmax,
    "softmax_plus": softmax_plus,
    "relu2": relu2,
    "relu2_fixed": relu2_fixed,
    "relu2_paper": relu2_paper,
    "l2": l2,
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


def exclusive_chunk_cumsum(x: jax.Array, axis: int = 1) -> jax.Array:
    """`y_g = Σ_{h<g} x_h` along `axis` (zeros for the first chunk).

    Shifted inclusive cumsum rather than `cumsum(x) − x`: the subtraction would round differently
    depending on x_g itself, so a later token could move an earlier output by an ulp and causality
    would hold only approximately.
    """
    axis = axis % x.ndim
    inclusive = jnp.cumsum(x, axis=axis)
    zeros = jnp.zeros_like(jax.lax.slice_in_dim(x, 0, 1, axis=axis))
    return jnp.concatenate([zeros, jax.lax.slice_in_dim(inclusive, 0, x.shape[axis] - 1, axis=axis)], axis=axis)
