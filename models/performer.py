"""Performer (FAVOR+) attention inside a gated unit: a linear-attention baseline for GAU and FLASH.

Choromanski et al., *Rethinking Attention with Performers* (arXiv 2009.14794); Su Jianlin,
https://kexue.fm/archives/7921. Positive orthogonal random features

    φ(x) = exp(ωᵀx − ‖x‖²/2) / √m,   ω_1..ω_m ~ N(0, I_s), orthogonal within blocks of s,

satisfy E[φ(q)ᵀφ(k)] = exp(qᵀk), so with q, k scaled by s^{-1/4} the attention

    A V = φ(Q) (Σ_j φ(k_j) v_jᵀ) / (φ(Q) Σ_j φ(k_j))

is an unbiased-kernel estimate of softmax(QKᵀ/√s) V in O(n·m·e). Causal attention sums only
j ≤ i, computed chunk by chunk (quadratic inside a chunk, exclusive cumulative sums across chunks:
memory b·(n/C)·m·e). The features ω are fixed per layer (drawn from a constant seed), not redrawn.
"""
from __future__ import annotations

import zlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import attention, layers
from models.gated_unit import GAUConfig, gated_output, gated_projections


def orthogonal_gaussian_features(key: jax.Array, num_features: int, dim: int) -> jax.Array:
    """ω `[m, dim]`: blocks of `dim` orthogonal rows, each row's norm drawn as a Gaussian vector's (chi_dim).

    Orthogonal rows reduce the estimator's variance; rescaling each to a chi-distributed norm keeps every
    row marginally N(0, I) (Choromanski et al., Sec. 2.4).
    """
    num_blocks = -(-num_features // dim)
    block_key, norm_key = jax.random.split(key)
    q, r = jnp.linalg.qr(jax.random.normal(block_key, (num_blocks, dim, dim), jnp.float32))
    # Fixing the signs of R's diagonal makes Q Haar-distributed (uniform directions); without it the
    # directions are biased and the kernel estimate is off by several percent at any m.
    q = q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
    rows = jnp.swapaxes(q, -1, -2).reshape(num_blocks * dim, dim)[:num_features]
    norms = jnp.linalg.norm(jax.random.normal(norm_key, (num_features, dim), jnp.float32), axis=-1, keepdims=True)
    return rows * norms


def positive_random_features(x: jax.Array, omega: jax.Array, *, is_query: bool) -> jax.Array:
    """φ(x) `[..., m]` float32 for x `[..., s]` (already scaled by s^{-1/4}).

    Queries subtract their own row maximum of `ωᵀx` before exponentiating: the factor cancels between
    numerator and denominator, and depends on nothing but the query, so causality is kept exactly.
    Keys are not shifted (a shift shared by all keys would need all of them, including future ones).
    """
    x = x.astype(jnp.float32)
    projected = jnp.einsum("...s,ms->...m", x, omega)
    exponent = projected - 0.5 * jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    if is_query:
        exponent = exponent - jax.lax.stop_gradient(jnp.max(projected, axis=-1, keepdims=True))
    return jnp.exp(exponent) / np.sqrt(omega.shape[0])


def linear_attention(q_feat: jax.Array, k_feat: jax.Array, v: jax.Array, *, causal: bool, chunk_size: int,
                     key_valid: jax.Array | None = None, epsilon: float = 1e-6) -> jax.Array:
    """`φ(Q)(Σ φ(K)ᵀV) / (φ(Q) Σ φ(K))` over valid keys (j ≤ i if causal). q/k `[b, n, m]`, v `[b, n, e]`."""
    b, n, _ = v.shape
    if key_valid is not None:
        k_feat = jnp.where(key_valid[..., None], k_feat, 0.0)
    v1 = jnp.concatenate([v.astype(jnp.float32), jnp.ones((b, n, 1), jnp.float32)], axis=-1)  # [V | 1]
    if not causal:
        out = jnp.einsum("bqm,bme->bqe", q_feat, jnp.einsum("bkm,bke->bme", k_feat, v1))
    else:
        pad = -n % chunk_size
        qc, kc, vc = (jnp.pad(t, [(0, 0), (0, pad), (0, 0)]).reshape(b, -1, chunk_size, t.shape[-1])
                      for t in (q_feat, k_feat, v1))
        local = jnp.einsum("bgqm,bgkm->bgqk", qc, kc) * jnp.tril(jnp.ones((chunk_size, chunk_size)))
        past = attention.exclusive_chunk_cumsum(jnp.einsum("bgkm,bgke->bgme", kc, vc), 1)
        out = jnp.einsum("bgqk,bgke->bgqe", local, vc) + jnp.einsum("bgqm,bgme->bgqe", qc, past)
        out = out.reshape(b, -1, v1.shape[-1])[:, :n]
    return (out[..., :-1] / (out[..., -1:] + epsilon)).astype(v.dtype)


class PerformerUnit(nn.Module):
    """A gated unit whose `A V` is FAVOR+ linear attention (same call signature as `GatedAttentionUnit`).

    Decoding is not supported (use 'gau' or 'flash' to generate).
    """

    supports_decoding = False  # class attribute, read by tasks before they try to sample

    config: GAUConfig
    deterministic: bool = True
    decode: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, rope: Any, positions: jax.Array, key_valid: jax.Array | None = None,
                 cache_index: jax.Array | None = None, residual_scores: jax.Array | None = None,
                 attention_mask: jax.Array | None = None):
        cfg = self.config
        if attention_mask is not None:
            raise ValueError("model.attention='performer' cannot take an explicit attention_mask (it knows only "
                             "model.causal's causal or bidirectional attention); use model.attention='gau'")
        del positions, residual_scores
        if self.decode and cache_index is not None:
            raise NotImplementedError("model.attention='performer' has no decoding state; generate with "
                                      "'gau' or 'flash'")
        u, v, (q, k) = gated_projections(cfg, x, 2)
        scale = cfg.key_dim ** -0.25
        q, k = layers.maybe_rope(q, rope) * scale, layers.maybe_rope(k, rope) * scale
        seed = zlib.crc32((self.name or "").encode())  # a fixed draw, distinct per layer name
        omega = orthogonal_gaussian_features(jax.random.PRNGKey(seed), cfg.performer_features, cfg.key_dim)
        o = linear_attention(positive_random_features(q, omega, is_query=True),
                             positive_random_features(k, omega, is_query=False), v, causal=cfg.causal,
                             chunk_size=cfg.chunk_size, key_valid=key_valid)
        return gated_output(cfg, x, u * o, deterministic=self.deterministic), None
