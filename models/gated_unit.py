"""What every gated attention layer shares: the config, the U/V/Z projections and the residual output.

A gated attention layer (GAU, FLASH, the Performer baseline) differs only in how it computes `A V`
from Q, K and V; around that it is always (Hua et al., arXiv 2202.10447; https://kexue.fm/archives/8934)

    X̃ = Norm(X) (pre-norm) or X (post-norm)
    [U | V] = SiLU(X̃ W_uv),  Z = SiLU(X̃ W_z),  (Q_1, …, Q_k) = scale-offsets of Z
    Y = X + (U ⊙ A V) W_o     then Y ← Norm(Y) under post-norm (GAU-α, https://kexue.fm/archives/9052)

with `e = expansion · d`, `s = key_dim`. U and V come from one fused `[d, 2, e]` projection (one
matmul; tensor parallelism splits both along `e`), Z from its own `[d, s]` projection. These two
functions create the shared sub-modules inside the calling layer's scope (flax binds a module created
during a parent's call to that parent), so every layer's parameters have the same names.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
NORM_POSITIONS = ("pre", "post")
# How the GAU computes its attention (`model.attention_impl`): 'xla' (the score matrix and a normaliser
# of models.attention), 'pallas' (the blockwise kernel of models.pallas_attention; softmax and
# softmax_plus only) or 'auto' (pallas on GPU/TPU where supported, else xla); see models.gau.
ATTENTION_IMPLS = ("xla", "pallas", "auto")


@dataclasses.dataclass(frozen=True)
class GAUConfig:
    """Hyperparameters of a gated-attention stack (the `model.*` block of an experiment config)."""

    vocab_size: int = 256
    type_vocab_size: int = 0  # segment ids 0 … type_vocab_size − 1 embedded (`segment_embed`); 0: none
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
    scan_layers: bool = False  # one nn.scan over the layers: params stacked under "layers" (models.gau)
    attention: str = "gau"  # layer type, a key of models.gau.ATTENTION_LAYERS: 'gau', 'flash', 'performer'
    chunk_size: int = 256  # FLASH's chunk (group) size C
    position: str = "rope"  # a key of models.positions.POSITIONS
    max_positions: int = 512  # rows of the learned position table (learned positions only)
    hierarchical_alpha: float = 0.4  # α of the hierarchical position extension (post 7947)
    norm_position: str = "pre"  # 'pre' (FLASH, default) or 'post' (GAU-α)
    kernel_init: str = "normal"  # a key of models.layers.KERNEL_INITS
    residual_scores: bool = False  # RealFormer: add the previous layer's scores (post 8027); GAU only
    performer_features: int = 128  # m, random features of the Performer baseline
    qk_scale_init: str = "normal"  # γ of the Q/K scale-offsets: 'normal' (N(0, 0.02²)) or 'ones'; see ScaleOffset
    attention_impl: str = "xla"  # GAU attention: 'xla', 'pallas' or 'auto' (ATTENTION_IMPLS; models.gau)
    condition_size: int = 0  # > 0: Conditional LayerNorm on every norm, from a [batch, k] condition (GAU layers)

    @property
    def expand_dim(self) -> int:
        return self.expansion_factor * self.embed_dim

    @property
    def compute_dtype(self) -> Any:
        return _DTYPES[self.dtype]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "GAUConfig":
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


def _projection(cfg: GAUConfig, features: tuple[int, ...], axes: tuple[str | None, ...], name: str):
    init = layers.KERNEL_INITS[cfg.kernel_init](cfg.num_layers)
    return layers.Projection(features, axes, use_bias=cfg.use_bias, dtype=cfg.compute_dtype, kernel_init=init,
                             name=name)


def norm(cfg: GAUConfig, x: jax.Array, condition: jax.Array | None = None, *, name: str = "norm") -> jax.Array:
    """`cfg.norm` of x under `name`; with a condition `[batch, k]`, plus Conditional LayerNorm's shift
    (`layers.ConditionalShift`, parameters under `name`_condition; post 7124), zero at initialisation."""
    norm_cls = layers.NORMS[cfg.norm]
    y = norm_cls(dtype=cfg.compute_dtype, name=name)(x)
    if condition is None:
        return y
    shift = layers.ConditionalShift(norm_cls.epsilon, cfg.compute_dtype, cfg.norm, name=f"{name}_condition")
    return y + shift(x, condition).astype(y.dtype)


def gated_projections(cfg: GAUConfig, x: jax.Array, num_qk: int,
                      condition: jax.Array | None = None) -> tuple[jax.Array, jax.Array, tuple]:
    """U, V `[batch, n, e]` and a tuple of `num_qk` scale-offsets of Z, each `[batch, n, s]`, from x `[batch, n, d]`
    (`condition`: Conditional LayerNorm's `[batch, k]`, on the pre-norm)."""
    h = x if cfg.norm_position == "post" else norm(cfg, x, condition)
    uv = nn.silu(_projection(cfg, (2, cfg.expand_dim), ("embed", None, "expand"), "uv")(h))
    u = nn.with_logical_constraint(uv[..., 0, :], ("batch", "length", "act_expand"))
    v = nn.with_logical_constraint(uv[..., 1, :], ("batch", "length", "act_expand"))
    z = nn.silu(_projection(cfg, (cfg.key_dim,), ("embed", "qk"), "z")(h))
    # Materialise SiLU(Z) once: otherwise XLA fuses the SiLU (an exp) into each of the scale-offset and
    # RoPE consumers below and recomputes it there, forward and backward (≈ 10% of a FLASH step on a CPU).
    z = jax.lax.optimization_barrier(z)
    z = nn.with_logical_constraint(z, ("batch", "length", "act_qk"))
    scale_init = layers.SCALE_INITS[cfg.qk_scale_init]
    scale_offset = layers.ScaleOffset(num_qk, use_bias=cfg.use_bias, scale_init=scale_init, name="qk_scale_offset")
    return u, v, scale_offset(z)


def gated_output(cfg: GAUConfig, x: jax.Array, gated: jax.Array, *, deterministic: bool,
                 condition: jax.Array | None = None) -> jax.Array:
    """The residual output `X + (U ⊙ A V) W_o` (normalised after the sum under post-norm).

    Args: x `[batch, n, d]` the layer's input; gated `[batch, n, e]` = U ⊙ A V; condition Conditional LayerNorm's
    `[batch, k]` (on the post-norm).
    """
    out = _projection(cfg, (x.shape[-1],), ("expand", "embed"), "out")(gated)
    out = layers.Dropout(cfg.dropout_rate)(out, deterministic=deterministic)
    y = x + out.astype(x.dtype)
    if cfg.norm_position == "post":
        y = norm(cfg, y, condition).astype(x.dtype)
    return y
