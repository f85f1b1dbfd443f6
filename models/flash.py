"""FLASH: the gated attention unit with mixed chunk attention, linear in the sequence length.

Hua, Dai, Liu, Le, *Transformer Quality in Linear Time* (arXiv 2202.10447, Sec. 3 and App. A);
Su Jianlin, https://kexue.fm/archives/8934. The sequence is cut into G = ⌈n/C⌉ chunks of C tokens
(the last one padded and masked). Four scale-offsets of the shared Z give Q_quad, K_quad, Q_lin,
K_lin, all rotated by RoPE at their *global* positions. For chunk g:

    local:  V̂_quad_g = A(Q_quad_g K_quad_gᵀ) V_g     A = the configured normaliser inside the chunk
                                                      (the paper's relu²(·/C) is `relu2_paper`), causal
                                                      mask inside the chunk when causal
    global, non-causal:  V̂_lin_g = (1/n) Q_lin_g Σ_h K_lin_hᵀ V_h          n = valid tokens
    global, causal:      V̂_lin_g = Q_lin_g Σ_{h<g} K_lin_hᵀ V_h / l         l = tokens visible to the query
    O_g = [U_g ⊙ (V̂_quad_g + V̂_lin_g)] W_o

The causal global part divides each query by the number of tokens it can see (its position + 1,
padding excluded), not by n: post 8934 points out that the appendix's `/n` leaks the total length
into a causal model. The causal sum is an exclusive cumulative sum of per-chunk `K_linᵀ V`
`[batch, G, s, e]`, so memory is b·(n/C)·s·e, not b·n·s·e.

Decoding keeps a constant-size state per layer (`FlashDecodeState`): Σ K_linᵀV over finished
chunks, the same sum over the current chunk so far, and the current chunk's K_quad and V. Each new
token costs O(C·(s + e) + s·e), whatever its position.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import attention, layers
from models.gated_unit import GAUConfig, gated_output, gated_projections


def _pad_to_chunks(x: jax.Array, chunk_size: int) -> jax.Array:
    """`[b, n, ...]` → `[b, G, C, ...]`, zero-padding n up to G·C."""
    n = x.shape[1]
    groups = -(-n // chunk_size)
    padding = [(0, 0), (0, groups * chunk_size - n)] + [(0, 0)] * (x.ndim - 2)
    x = jnp.pad(x, padding)
    return x.reshape((x.shape[0], groups, chunk_size) + x.shape[2:])


def mixed_chunk_attention(q_quad: jax.Array, k_quad: jax.Array, q_lin: jax.Array, k_lin: jax.Array,
                          v: jax.Array, *, chunk_size: int, causal: bool, normalizer: Callable[..., jax.Array],
                          train_length: int, key_valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """`V̂_quad + V̂_lin` of FLASH (see the module docstring for the formulas).

    Args:
      q_quad, k_quad, q_lin, k_lin: `[batch, n, s]`, RoPE already applied at global positions.
      v: `[batch, n, e]`.
      chunk_size: C; n need not be a multiple of it.
      causal: mask future tokens (inside chunks) and sum only earlier chunks globally.
      normalizer: an `attention.NORMALIZERS` entry for the local part; called with sequence length C.
      key_valid: optional `[batch, n]` booleans, False for padding.
    Returns:
      (`[batch, n, e]` in v's dtype, the local attention weights `[batch, G, C, C]` float32).
    """
    b, n, _ = v.shape
    if key_valid is None:
        key_valid = jnp.ones((b, n), bool)
    valid = _pad_to_chunks(key_valid, chunk_size)  # padding of the last chunk is invalid too
    q_quad, k_quad, q_lin, k_lin, v = (_pad_to_chunks(t, chunk_size) for t in (q_quad, k_quad, q_lin, k_lin, v))
    k_lin = jnp.where(valid[..., None], k_lin, 0)

    local = jnp.arange(chunk_size)
    mask = (local[None, :] <= local[:, None]) if causal else jnp.ones((chunk_size, chunk_size), bool)
    mask = mask & valid[:, :, None, :]
    scores = jnp.einsum("bgqs,bgks->bgqk", q_quad, k_quad, preferred_element_type=jnp.float32)
    weights = normalizer(scores, mask, key_dim=q_quad.shape[-1], train_length=train_length,
                         sequence_length=chunk_size)
    # Both parts in one batched matmul per chunk: [A_g | Q_lin_g / l] @ [V_g ; M_g], contracting over
    # C + s, where M_g is Σ_{h<g} K_lin_hᵀV_h (causal) or Σ_h K_lin_hᵀV_h (not), and l counts the tokens
    # each query may see. One large product instead of two and their sum (about 10% of a FLASH train
    # step on a CPU); the running sums stay float32 until this matmul.
    kv = jnp.einsum("bgks,bgke->bgse", k_lin, v, preferred_element_type=jnp.float32)
    visible = attention.visible_key_counts(valid.size // b, causal=causal, key_valid=valid.reshape(b, -1), batch=b)
    past = (attention.exclusive_chunk_cumsum(kv, 1) if causal
            else jnp.broadcast_to(jnp.sum(kv, axis=1, keepdims=True), kv.shape))
    q_scaled = q_lin.astype(jnp.float32) / visible.reshape(valid.shape)[..., None]
    lhs = jnp.concatenate([weights.astype(v.dtype), q_scaled.astype(v.dtype)], axis=-1)
    rhs = jnp.concatenate([v, past.astype(v.dtype)], axis=-2)
    out = jnp.einsum("bgqk,bgke->bgqe", lhs, rhs, preferred_element_type=jnp.float32)
    out = out.reshape(b, -1, v.shape[-1])[:, :n]
    return out.astype(v.dtype), weights


class FlashDecodeState(NamedTuple):
    """Constant-size decoding state of one FLASH layer (the `cache` collection).

    past_kv `[b, s, e]` f32: Σ K_linᵀV over finished chunks. chunk_kv `[b, s, e]` f32: the same over
    the current chunk's tokens so far. chunk_key `[b, C, s]`, chunk_value `[b, C, e]`: the current
    chunk's K_quad and V, slot = position mod C (slots past the current one are stale and masked).
    """

    past_kv: jax.Array
    chunk_kv: jax.Array
    chunk_key: jax.Array
    chunk_value: jax.Array


def decode_step(state: FlashDecodeState, q_quad, k_quad, q_lin, k_lin, v, position, *,
                normalizer: Callable[..., jax.Array], train_length: int) -> tuple[FlashDecodeState, jax.Array]:
    """One causal token at `position` (scalar) through the state: q/k `[b, s]`, v `[b, e]` → `[b, e]`."""
    chunk_size = state.chunk_key.shape[1]
    slot = position % chunk_size
    new_chunk = slot == 0  # the previous chunk is complete: fold its sum into the past
    past_kv = jnp.where(new_chunk, state.past_kv + state.chunk_kv, state.past_kv)
    chunk_kv = jnp.where(new_chunk, 0.0, state.chunk_kv)
    chunk_kv = chunk_kv + jnp.einsum("bs,be->bse", k_lin, v, preferred_element_type=jnp.float32)
    chunk_key = jax.lax.dynamic_update_slice_in_dim(state.chunk_key, k_quad[:, None], slot, axis=1)
    chunk_value = jax.lax.dynamic_update_slice_in_dim(state.chunk_value, v[:, None], slot, axis=1)

    scores = jnp.einsum("bs,bks->bk", q_quad, chunk_key, preferred_element_type=jnp.float32)[:, None]
    mask = (jnp.arange(chunk_size) <= slot)[None, None, :]
    weights = normalizer(scores, mask, key_dim=q_quad.shape[-1], train_length=train_length,
                         sequence_length=chunk_size)
    quad = jnp.einsum("bqk,bke->be", weights.astype(v.dtype), chunk_value, preferred_element_type=jnp.float32)
    lin = jnp.einsum("bs,bse->be", q_lin.astype(jnp.float32), past_kv) / (position + 1).astype(jnp.float32)
    return FlashDecodeState(past_kv, chunk_kv, chunk_key, chunk_value), (quad + lin).astype(v.dtype)


def decode_tokens(state: FlashDecodeState, q_quad, k_quad, q_lin, k_lin, v, positions, **kwargs):
    """`decode_step` over n new tokens in order (a `lax.scan`): `[b, n, ·]` → (state, `[b, n, e]`)."""
    def step(carry, inputs):
        return decode_step(carry, *inputs, **kwargs)

    time_major = tuple(jnp.swapaxes(t, 0, 1) for t in (q_quad, k_quad, q_lin, k_lin, v))
    state, out = jax.lax.scan(step, state, (*time_major, positions))
    return state, jnp.swapaxes(out, 0, 1)


class FlashLayer(nn.Module):
    """One FLASH layer (mixed chunk attention) with residual connection; a sibling of `GatedAttentionUnit`.

    Same call signature as `GatedAttentionUnit`. In decode mode (causal only) the `cache` collection
    holds a `FlashDecodeState` whose size does not depend on the sequence length.
    """

    config: GAUConfig
    deterministic: bool = True
    decode: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, rope: Any, positions: jax.Array, key_valid: jax.Array | None = None,
                 cache_index: jax.Array | None = None, residual_scores: jax.Array | None = None,
                 attention_mask: jax.Array | None = None):
        cfg = self.config
        if attention_mask is not None:
            raise ValueError("model.attention='flash' cannot take an explicit attention_mask (it knows only "
                             "model.causal's causal or bidirectional attention); use model.attention='gau'")
        del residual_scores  # RealFormer residual scores are a GAU option (validated in the task)
        u, v, qk = gated_projections(cfg, x, 4)
        q_quad, k_quad, q_lin, k_lin = (layers.maybe_rope(t, rope) for t in qk)
        normalizer = attention.get_normalizer(cfg.normalizer)
        if self.decode:
            state = self._state_variables(x.shape[0], k_quad.dtype)
        if self.decode and cache_index is not None:
            new_state, o = decode_tokens(FlashDecodeState(*(s.value for s in state)), q_quad, k_quad, q_lin,
                                         k_lin, v, jnp.broadcast_to(positions, (x.shape[1],)),
                                         normalizer=normalizer, train_length=cfg.train_length)
            for variable, value in zip(state, new_state):
                variable.value = value
        else:
            o, weights = mixed_chunk_attention(q_quad, k_quad, q_lin, k_lin, v, chunk_size=cfg.chunk_size,
                                               causal=cfg.causal, normalizer=normalizer,
                                               train_length=cfg.train_length, key_valid=key_valid)
            self.sow("intermediates", "attention_weights", weights)
        return gated_output(cfg, x, u * o, deterministic=self.deterministic), None

    def _state_variables(self, batch: int, dtype) -> list[Any]:
        cfg = self.config
        s, e, c = cfg.key_dim, cfg.expand_dim, cfg.chunk_size
        if not cfg.causal:
            raise ValueError("FLASH decoding needs model.causal=True: a bidirectional encoder has no next token")
        shapes = {"past_kv": ((batch, s, e), jnp.float32), "chunk_kv": ((batch, s, e), jnp.float32),
                  "chunk_key": ((batch, c, s), dtype), "chunk_value": ((batch, c, e), dtype)}
        return [self.variable("cache", name, jnp.zeros, shape, dt) for name, (shape, dt) in shapes.items()]
