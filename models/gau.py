"""The Gated Attention Unit (GAU) and the GAU language model.

GAU (Hua, Dai, Liu, Le, *Transformer Quality in Linear Time*, arXiv 2202.10447; Su Jianlin,
https://kexue.fm/archives/8934 and https://kexue.fm/archives/8990):

    X̃ = Norm(X);  [U | V] = SiLU(X̃ W_uv),  Z = SiLU(X̃ W_z)
    Q = RoPE(γ_q ⊙ Z + β_q),  K = RoPE(γ_k ⊙ Z + β_k)
    O = X + (U ⊙ A V) W_o,    A = normaliser(Q Kᵀ)

with `e = expansion · d` and `s = key_dim`. U and V come from one fused `[d, 2, e]` projection (one
matmul; tensor parallelism splits both along `e` without resharding); Z from its own `[d, s]`
projection. RoPE is the last operation on Q and K. One GAU has ≈ 3de + ds parameters, so one
Transformer layer (attention + FFN) corresponds to two GAUs.

Shapes: tokens `[batch, length]`, activations `[batch, length, d]`, logits `[batch, length, vocab]`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import attention, layers

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class GAUConfig:
    """Hyperparameters of a GAU stack (the `model.*` block of an experiment config)."""

    vocab_size: int = 256
    num_layers: int = 4
    embed_dim: int = 256
    expansion_factor: int = 2
    key_dim: int = 128
    normalizer: str = "softmax"
    norm: str = "rmsnorm"
    causal: bool = True
    use_bias: bool = True
    dropout_rate: float = 0.0
    rope_base: float = 10000.0
    train_length: int = 512  # the length the model is trained at (used by length-aware normalisers)
    dtype: str = "float32"  # compute dtype; parameters stay float32
    remat: bool = False

    @property
    def expand_dim(self) -> int:
        return self.expansion_factor * self.embed_dim

    @property
    def compute_dtype(self) -> Any:
        return _DTYPES[self.dtype]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "GAUConfig":
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


class GatedAttentionUnit(nn.Module):
    """One pre-norm GAU layer with residual connection.

    In decode mode the keys and values of earlier positions live in the `cache` collection
    (`cached_key` `[batch, max_length, s]`, `cached_value` `[batch, max_length, e]`, their length set
    by the input length at initialisation), so a new token costs the same at any position.
    """

    config: GAUConfig
    deterministic: bool = True
    decode: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, sin: jax.Array, cos: jax.Array, positions: jax.Array,
                 key_valid: jax.Array | None = None, cache_index: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        dtype = cfg.compute_dtype
        e, s = cfg.expand_dim, cfg.key_dim
        proj = dict(dtype=dtype, use_bias=cfg.use_bias)

        h = layers.NORMS[cfg.norm](dtype=dtype, name="norm")(x)
        uv = nn.silu(layers.Projection((2, e), ("embed", None, "expand"), name="uv", **proj)(h))
        u = nn.with_logical_constraint(uv[..., 0, :], ("batch", "length", "act_expand"))
        v = nn.with_logical_constraint(uv[..., 1, :], ("batch", "length", "act_expand"))
        z = nn.silu(layers.Projection((s,), ("embed", "qk"), name="z", **proj)(h))
        q, k = layers.ScaleOffset(2, use_bias=cfg.use_bias, name="qk_scale_offset")(z)
        q = layers.apply_rope(q, sin, cos)
        k = layers.apply_rope(k, sin, cos)

        key_positions = positions
        if self.decode and self.has_variable("cache", "cached_key"):
            k, v, key_positions = self._update_cache(k, v, cache_index)
        elif self.decode:  # initialisation: create the cache with the input's length
            self._update_cache(k, v, None)
        mask = attention.attention_mask(positions, key_positions, causal=cfg.causal, key_valid=key_valid)

        scores = jnp.einsum("bqs,bks->bqk", q, k, preferred_element_type=jnp.float32)
        weights = attention.get_normalizer(cfg.normalizer)(
            scores, mask, key_dim=s, train_length=cfg.train_length)
        o = u * jnp.einsum("bqk,bke->bqe", weights.astype(dtype), v)
        out = layers.Projection((x.shape[-1],), ("expand", "embed"), name="out", **proj)(o)
        out = nn.Dropout(cfg.dropout_rate)(out, deterministic=self.deterministic)
        return x + out.astype(x.dtype)

    def _update_cache(self, k, v, cache_index):
        """Writes this call's keys/values at `cache_index`; returns the whole cache and its positions."""
        cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        if cache_index is None:
            return None
        cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k, (0, cache_index, 0))
        cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v, (0, cache_index, 0))
        return cached_k.value, cached_v.value, jnp.arange(cached_k.value.shape[1])


class GAULanguageModel(nn.Module):
    """Token embedding → N GAU layers → final norm → output layer.

    `causal=True` gives an autoregressive LM; `causal=False` a bidirectional encoder. With
    `decode=True`, call once with `[batch, max_length]` tokens inside `init` to create the cache,
    then with `[batch, n]` chunks (a prompt, then one token at a time); positions continue from the cache.

    Args (call): tokens `[batch, length]` int; `padding_mask` optional `[batch, length]` bool.
    Returns: logits `[batch, length, vocab]` float32.
    """

    config: GAUConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, *, train: bool = False, decode: bool = False,
                 padding_mask: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        dtype = cfg.compute_dtype
        n = tokens.shape[1]
        positions, cache_index = jnp.arange(n), None
        if decode and self.has_variable("cache", "index"):
            index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
            cache_index = index.value
            positions = cache_index + jnp.arange(n)
            index.value = cache_index + n
        elif decode:
            self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        sin, cos = layers.rope_tables(positions, cfg.key_dim, base=cfg.rope_base)

        x = nn.Embed(cfg.vocab_size, cfg.embed_dim, dtype=dtype, name="embed",
                     embedding_init=layers.partitioned(layers.DEFAULT_KERNEL_INIT, ("vocab", "embed")))(tokens)
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        layer_cls = nn.remat(GatedAttentionUnit) if cfg.remat else GatedAttentionUnit
        for i in range(cfg.num_layers):
            x = layer_cls(cfg, deterministic=not train, decode=decode, name=f"layer_{i}")(
                x, sin, cos, positions, padding_mask, cache_index)
            x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        x = layers.NORMS[cfg.norm](dtype=dtype, name="final_norm")(x)
        logits = layers.Projection((cfg.vocab_size,), ("embed", "vocab"), name="logits", dtype=dtype,
                                   use_bias=cfg.use_bias)(x)
        return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "act_vocab"))
