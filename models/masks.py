"""Attention masks from segment ids and padding: one factory for every attention layer, chosen by name.

A mask is boolean `[batch, n_q, n_k]`, True where query q may attend to key k. Every kind is built
from per-token *segment ids* s (0 = source, 1 = target), their running count c = cumsum(s) along the
sequence, and positions, so the same rule gives the training mask of a whole sequence and the
decoding mask of one new token against a key/value cache:

- `bidirectional`: every valid key (BERT).
- `causal`: keys at positions ≤ the query's (GPT).
- `unilm`: key visible iff c_k ≤ c_q (Dong et al., *Unified Language Model Pre-training*, arXiv 1905.03197;
  Su, "从语言模型到Seq2Seq:Transformer如戏,全靠Mask", https://kexue.fm/archives/6933): the source
  (c = 0) sees itself bidirectionally, target token j (c = j) sees the whole source and targets ≤ j.
  This needs the target's segment ids to be 1 and the source's 0, with the source first.
- `uniae`: the UniLM rule restricted to the query's own segment (Su, UniVAE, https://kexue.fm/archives/8475):
  segment 0 bidirectional, segment 1 causal, no attention across segments.

Padding (`padding_mask` False) hides a key from every query; padded queries still see the valid keys,
as in Hugging Face's BERT, so no row is empty unless a whole sequence is padding. Rows with no visible
key give zero attention in `models.attention.masked_softmax`, never NaN.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

__all__ = ["MASKS", "make_mask", "mask_from_tokens", "segment_counts"]


def segment_counts(segment_ids: jax.Array) -> jax.Array:
    """c = cumsum(segment ids) along the sequence, `[batch, n]` int32 (post 6933's UniLM construction)."""
    return jnp.cumsum(segment_ids.astype(jnp.int32), axis=-1)


def _bidirectional(q_seg, q_count, q_pos, k_seg, k_count, k_pos):
    del q_seg, q_count, k_seg, k_count
    return jnp.ones(jnp.broadcast_shapes(q_pos[..., :, None].shape, k_pos[..., None, :].shape), bool)


def _causal(q_seg, q_count, q_pos, k_seg, k_count, k_pos):
    del q_seg, q_count, k_seg, k_count
    return k_pos[..., None, :] <= q_pos[..., :, None]


def _unilm(q_seg, q_count, q_pos, k_seg, k_count, k_pos):
    del q_seg, q_pos, k_seg, k_pos
    return k_count[..., None, :] <= q_count[..., :, None]


def _uniae(q_seg, q_count, q_pos, k_seg, k_count, k_pos):
    same_segment = k_seg[..., None, :] == q_seg[..., :, None]
    return same_segment & _unilm(q_seg, q_count, q_pos, k_seg, k_count, k_pos)


# name → rule(query segment, count, position, key segment, count, position) → `[batch, n_q, n_k]` bool.
MASKS: dict[str, Callable[..., jax.Array]] = {
    "bidirectional": _bidirectional,
    "causal": _causal,
    "unilm": _unilm,
    "uniae": _uniae,
}


def _check_kind(kind: str) -> Callable[..., jax.Array]:
    try:
        return MASKS[kind]
    except KeyError:
        raise ValueError(f"unknown attention mask {kind!r}; expected one of {sorted(MASKS)}") from None


def make_mask(kind: str, *, query_segments: jax.Array, query_counts: jax.Array, query_positions: jax.Array,
              key_segments: jax.Array, key_counts: jax.Array, key_positions: jax.Array,
              key_valid: jax.Array | None = None) -> jax.Array:
    """The mask `[batch, n_q, n_k]` of `kind` between queries and keys described by their segment ids,
    segment counts (`segment_counts` over the whole sequence) and positions, each `[batch, n]`.

    Decoding calls this with the new token(s) as queries and the whole cache as keys (`key_valid` False
    for slots not written yet and for padding).
    """
    rule = _check_kind(kind)
    mask = rule(query_segments, query_counts, query_positions, key_segments, key_counts, key_positions)
    if key_valid is not None:
        mask = mask & key_valid.astype(bool)[..., None, :]
    return mask


def mask_from_tokens(kind: str, *, segment_ids: jax.Array | None = None, padding_mask: jax.Array | None = None,
                     shape: tuple[int, int] | None = None) -> jax.Array:
    """The training mask `[batch, n, n]` of a whole sequence from its segment ids and padding (`[batch, n]`).

    Without segment ids every token is segment 0 (so 'unilm' and 'uniae' become bidirectional); `shape`
    (batch, n) is needed only when neither array is given.

    >>> import numpy as np
    >>> m = mask_from_tokens("unilm", segment_ids=jnp.array([[0, 0, 1, 1]]))
    >>> np.asarray(m[0]).astype(int)
    array([[1, 1, 0, 0],
           [1, 1, 0, 0],
           [1, 1, 1, 0],
           [1, 1, 1, 1]])
    """
    _check_kind(kind)
    for array in (segment_ids, padding_mask):
        if array is not None:
            shape = tuple(array.shape)
    if shape is None or len(shape) != 2:
        raise ValueError(f"mask_from_tokens needs [batch, n] segment_ids or padding_mask, or shape=(batch, n); "
                         f"got shape {shape}")
    if segment_ids is None:
        segment_ids = jnp.zeros(shape, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(shape[1]), shape)
    counts = segment_counts(segment_ids)
    return make_mask(kind, query_segments=segment_ids, query_counts=counts, query_positions=positions,
                     key_segments=segment_ids, key_counts=counts, key_positions=positions, key_valid=padding_mask)
