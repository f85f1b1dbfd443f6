"""A multi-head Transformer encoder: BERT (learned positions) and RoFormer (rotary positions) in one module.

RoFormer (Su et al., arXiv 2104.09864; https://kexue.fm/archives/8265) is BERT with rotary positions on
every head's queries and keys and no position table. Both are

    h₀ = Norm(E_tok[x] + E_seg[s] (+ E_pos[p]))  (→ W_proj when embedding_size ≠ hidden_size)
    h ← Norm(h + MHA(h, mask))  then  h ← Norm(h + W₂ GELU(W₁ h))            (post-norm, BERT)
    or h ← h + MHA(Norm(h)), h ← h + FFN(Norm(h)), final Norm               (pre-norm)
    MLM logits = Norm(GELU(W_t h)) E_tokᵀ + b   (the decoder tied to the token embeddings)
    pooled = tanh(W_p h[:, 0] + b_p)              (BERT's pooler over [CLS])

The attention mask is any `[batch, n_q, n_k]` boolean array, from `models.masks` (bidirectional, causal,
UniLM, UniAE); without one, keys are hidden only where `padding_mask` is False. With `decode=True` the keys
and values of earlier positions live in the `cache` collection (`cached_key`, `cached_value`
`[batch, max_length, heads, head_dim]`, their length set by the input at initialisation) and a new token
costs the same at any position; the caller passes the mask of the new tokens against the whole cache.

Rotary pairs are half-split (`models.layers.apply_rope`); Hugging Face's RoFormer rotates interleaved pairs,
the same rotation up to a permutation of each head's query/key dimensions that `models.pretrained` applies.
The parameter tree follows Hugging Face's names closely (`models.pretrained` maps one onto the other):

    embeddings/{word_embeddings, token_type_embeddings, position_embeddings}/embedding, embeddings/norm
    embeddings_project                          (embedding_size ≠ hidden_size)
    layer_{i}/attention/{query, key, value, output}, layer_{i}/attention_norm,
    layer_{i}/mlp/{intermediate, output}, layer_{i}/mlp_norm, final_norm (pre-norm)
    pooler, mlm_head/{transform, norm, output_bias} (+ mlm_head/decoder when the decoder is not tied)
    layer_{i}/{attention_adapter, mlp_adapter}/{down, up}   (adapter_size > 0: Houlsby adapters)
    embeddings/prompt/embedding (+ lstm_*, mlp_*)           (num_prompts > 0: P-tuning's prompt tokens)
    <each norm>_condition/{scale, bias}/kernel             (condition_size > 0: Conditional LayerNorm)

Shapes: tokens `[batch, n]`; hidden `[batch, n, hidden_size]`; mlm_logits `[batch, n, vocab]` float32.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import attention as attention_lib
from models import layers

__all__ = ["ACTIVATIONS", "TransformerConfig", "TransformerEncoder", "POSITIONS"]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
POSITIONS = ("rope", "learned")
PROMPT_ENCODERS = ("none", "mlp", "lstm")
NORM_POSITIONS = ("post", "pre")
ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # BERT's erf GELU (Hugging Face 'gelu')
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyperparameters of the encoder (the `model.*` block of a text experiment with model.architecture
    'transformer'); the names follow Hugging Face's BertConfig/RoFormerConfig where one exists."""

    vocab_size: int = 8000
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 1024
    embedding_size: int = 0  # 0: hidden_size; else embeddings of this width, projected to hidden_size
    type_vocab_size: int = 2  # segment ids 0 … type_vocab_size − 1 (0: no segment embeddings)
    max_positions: int = 512  # the longest input (learned positions: rows of the table)
    position: str = "rope"  # 'rope' (RoFormer) or 'learned' (BERT)
    rope_base: float = 10000.0
    norm_position: str = "post"  # 'post' (BERT, RoFormer) or 'pre'
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"  # a key of ACTIVATIONS
    dropout_rate: float = 0.1  # on embeddings, attention output and FFN output (BERT's hidden_dropout_prob)
    attention_dropout_rate: float = 0.1  # on the attention weights
    use_pooler: bool = True
    tie_embeddings: bool = True  # the MLM decoder is the token embedding matrix transposed
    use_bias: bool = True
    initializer_range: float = 0.02  # std of the normal initialisation (BERT)
    dtype: str = "float32"  # compute dtype; parameters stay float32
    remat: bool = False  # recompute each layer's activations in the backward pass
    # Parameter-efficient fine-tuning (README "Fine-tuning a pretrained encoder"):
    adapter_size: int = 0  # > 0: Houlsby adapters of this bottleneck after attention and the FFN (arXiv 1902.00751)
    num_prompts: int = 0  # > 0: P-tuning's prompt tokens, ids prompt_start_id … + num_prompts − 1 (arXiv 2103.10385)
    prompt_start_id: int = 0  # the first [unusedK] id taken by a prompt token
    prompt_encoder: str = "none"  # P-tuning's reparametrisation of the prompt table: 'none', 'mlp' or 'lstm'
    condition_size: int = 0  # > 0: Conditional LayerNorm on every norm of the stack, from a [batch, k] condition

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def embedding_width(self) -> int:
        return self.embedding_size or self.hidden_size

    @property
    def compute_dtype(self) -> Any:
        return _DTYPES[self.dtype]

    def validate(self) -> None:
        """Raises ValueError naming the first inconsistent field."""
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head_dim, got {self.head_dim}")
        for name, value, choices in (("position", self.position, POSITIONS),
                                     ("norm_position", self.norm_position, NORM_POSITIONS),
                                     ("hidden_act", self.hidden_act, ACTIVATIONS),
                                     ("dtype", self.dtype, _DTYPES)):
            if value not in choices:
                raise ValueError(f"{name} is {value!r}; expected one of {sorted(choices)}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_positions"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.adapter_size < 0 or self.num_prompts < 0 or self.condition_size < 0:
            raise ValueError(f"adapter_size, num_prompts and condition_size must be ≥ 0, got {self.adapter_size}, "
                             f"{self.num_prompts}, {self.condition_size}")
        if self.prompt_encoder not in PROMPT_ENCODERS:
            raise ValueError(f"prompt_encoder is {self.prompt_encoder!r}; expected one of {list(PROMPT_ENCODERS)}")
        if self.num_prompts and not 0 <= self.prompt_start_id <= self.vocab_size - self.num_prompts:
            raise ValueError(f"prompt_start_id {self.prompt_start_id} + num_prompts {self.num_prompts} exceeds the "
                             f"vocabulary ({self.vocab_size})")


def _init(cfg: TransformerConfig, names: tuple[str | None, ...]) -> layers.Initializer:
    return layers.partitioned(nn.initializers.normal(stddev=cfg.initializer_range), names)


def _dense(cfg: TransformerConfig, features: tuple[int, ...], axes: tuple[str | None, ...], name: str):
    return layers.Projection(features, axes, use_bias=cfg.use_bias, dtype=cfg.compute_dtype,
                             kernel_init=nn.initializers.normal(stddev=cfg.initializer_range), name=name)


def _norm(cfg: TransformerConfig, name: str) -> nn.Module:
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.compute_dtype, name=name,
                        scale_init=layers.partitioned(nn.initializers.ones, ("norm",)),
                        bias_init=layers.partitioned(nn.initializers.zeros, ("norm",)))


def _conditional_norm(cfg: TransformerConfig, name: str, x: jax.Array, condition: jax.Array | None) -> jax.Array:
    """The norm `name` of `x`; with a condition, plus Conditional LayerNorm's shift (`layers.ConditionalShift`,
    parameters under `name`_condition)."""
    y = _norm(cfg, name)(x)
    if condition is None:
        return y
    return y + layers.ConditionalShift(cfg.layer_norm_eps, cfg.compute_dtype, name=f"{name}_condition")(x, condition)


def _rope(x: jax.Array, rope: tuple[jax.Array, jax.Array] | None) -> jax.Array:
    """Rotary positions on `[batch, n, heads, head_dim]` with tables `[batch or 1, n, head_dim/2]`."""
    if rope is None:
        return x
    sin, cos = rope
    return layers.apply_rope(x, sin[..., None, :], cos[..., None, :])


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention over `num_heads` heads with a boolean mask, and its output projection.

    Args (call): x `[batch, n, d]`; mask `[batch or 1, n, n_k]` bool; rope tables or None; cache_index
    (decode: where this call's keys go in the cache). Returns `[batch, n, d]`.
    """

    config: TransformerConfig
    deterministic: bool = True
    decode: bool = False

    @nn.compact
    def __call__(self, x, mask, rope, cache_index=None):
        cfg = self.config
        heads = (cfg.num_heads, cfg.head_dim)
        q, k, v = (nn.with_logical_constraint(
            _dense(cfg, heads, ("embed", "heads", "kv"), name)(x), ("batch", "length", "act_heads", "act_kv"))
            for name in ("query", "key", "value"))
        q, k = _rope(q, rope), _rope(k, rope)
        if self.decode:
            k, v = self._update_cache(k, v, cache_index)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(cfg.head_dim)
        weights = attention_lib.masked_softmax(scores, mask[:, None])
        self.sow("intermediates", "attention_weights", weights)
        if cfg.attention_dropout_rate > 0:
            weights = layers.Dropout(cfg.attention_dropout_rate)(weights, deterministic=self.deterministic)
        o = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)
        o = nn.with_logical_constraint(o, ("batch", "length", "act_heads", "act_kv"))
        return HeadsToHidden(cfg, name="output")(o)

    def _update_cache(self, k, v, cache_index):
        """Writes this call's keys/values at `cache_index`; returns the whole cache (at init: the inputs)."""
        initialized = self.has_variable("cache", "cached_key")
        cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        if not initialized:
            return k, v
        cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k.astype(cached_k.value.dtype),
                                                      (0, cache_index, 0, 0))
        cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v.astype(cached_v.value.dtype),
                                                      (0, cache_index, 0, 0))
        return cached_k.value, cached_v.value


class HeadsToHidden(nn.Module):
    """The attention output projection `[batch, n, heads, head_dim] → [batch, n, d]`, kernel `[heads, head_dim, d]`."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, o):
        cfg = self.config
        kernel = self.param("kernel", _init(cfg, ("heads", "kv", "embed")), (cfg.num_heads, cfg.head_dim,
                                                                           cfg.hidden_size), jnp.float32)
        y = jnp.einsum("bqhd,hde->bqe", o, kernel.astype(cfg.compute_dtype))
        if cfg.use_bias:
            y = y + self.param("bias", layers.partitioned(nn.initializers.zeros, ("embed",)), (cfg.hidden_size,),
                               jnp.float32).astype(cfg.compute_dtype)
        return y


class TransformerLayer(nn.Module):
    """Attention then feed-forward, each with a residual connection, post- or pre-norm."""

    config: TransformerConfig
    deterministic: bool = True
    decode: bool = False

    @nn.compact
    def __call__(self, x, mask, rope, cache_index=None, condition=None):
        cfg = self.config
        norm = lambda name, h: _conditional_norm(cfg, name, h, condition)  # noqa: E731
        drop = lambda y: layers.Dropout(cfg.dropout_rate)(y, deterministic=self.deterministic)  # noqa: E731
        attend = MultiHeadAttention(cfg, self.deterministic, self.decode, name="attention")
        # Houlsby adapters: on each sublayer's output, before the residual sum (identity at initialisation).
        adapt = (lambda y, name: Adapter(cfg, name=name)(y)) if cfg.adapter_size else (lambda y, name: y)  # noqa
        if cfg.norm_position == "post":
            x = norm("attention_norm", x + adapt(drop(attend(x, mask, rope, cache_index)), "attention_adapter"))
        else:
            x = x + adapt(drop(attend(norm("attention_norm", x), mask, rope, cache_index)), "attention_adapter")
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))

        if cfg.norm_position == "post":
            x = norm("mlp_norm", x + adapt(_FeedForward(cfg, self.deterministic, name="mlp")(x), "mlp_adapter"))
        else:
            x = x + adapt(_FeedForward(cfg, self.deterministic, name="mlp")(norm("mlp_norm", x)), "mlp_adapter")
        return nn.with_logical_constraint(x, ("batch", "length", "act_embed"))


class Adapter(nn.Module):
    """Houlsby et al.'s bottleneck adapter (arXiv 1902.00751): `y + W_up act(W_down y)`, `W_up` zero-initialised
    so that a pretrained model with adapters added computes what it computed without them."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, y):
        cfg = self.config
        h = _dense(cfg, (cfg.adapter_size,), ("embed", None), "down")(y)
        h = ACTIVATIONS[cfg.hidden_act](h)
        up = layers.Projection((cfg.hidden_size,), (None, "embed"), use_bias=cfg.use_bias, dtype=cfg.compute_dtype,
                               kernel_init=nn.initializers.zeros, name="up")
        return y + up(h)


class PromptEncoder(nn.Module):
    """P-tuning's prompt embeddings `[num_prompts, width]` (Liu et al., arXiv 2103.10385; https://kexue.fm/archives/
    8295): a free table ('none'), or the table through a two-layer ReLU MLP ('mlp') or a bidirectional LSTM then
    that MLP ('lstm'), the reparametrisations of the paper's code."""

    config: TransformerConfig

    @nn.compact
    def __call__(self):
        cfg = self.config
        width = cfg.embedding_width
        table = self.param("embedding", _init(cfg, (None, "embed")), (cfg.num_prompts, width), jnp.float32)
        if cfg.prompt_encoder == "none":
            return table
        h = table[None]
        if cfg.prompt_encoder == "lstm":
            forward = nn.RNN(nn.OptimizedLSTMCell(width // 2), name="lstm_forward")(h)
            backward = nn.RNN(nn.OptimizedLSTMCell(width // 2), reverse=True, keep_order=True,
                              name="lstm_backward")(h)
            h = jnp.concatenate([forward, backward], axis=-1)
        h = jax.nn.relu(nn.Dense(width, name="mlp_hidden")(h))
        return nn.Dense(width, name="mlp_output")(h)[0]


class _FeedForward(nn.Module):
    """`Dropout(W₂ act(W₁ x + b₁) + b₂)`: `intermediate` `[d, mlp]`, `output` `[mlp, d]`."""

    config: TransformerConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        h = _dense(cfg, (cfg.intermediate_size,), ("embed", "mlp"), "intermediate")(x)
        h = nn.with_logical_constraint(ACTIVATIONS[cfg.hidden_act](h), ("batch", "length", "act_mlp"))
        y = _dense(cfg, (cfg.hidden_size,), ("mlp", "embed"), "output")(h)
        return layers.Dropout(cfg.dropout_rate)(y, deterministic=self.deterministic)


class Embeddings(nn.Module):
    """`Norm(E_tok[x] + E_seg[s] (+ E_pos[p]))` with dropout; returns `[batch, n, embedding_width]`."""

    config: TransformerConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, tokens, segment_ids, positions, condition=None):
        cfg = self.config
        width, dtype = cfg.embedding_width, cfg.compute_dtype
        x = nn.Embed(cfg.vocab_size, width, dtype=dtype, name="word_embeddings",
                     embedding_init=_init(cfg, ("vocab", "embed")))(tokens)
        if cfg.num_prompts:  # P-tuning: the prompt tokens' embeddings come from their own (trainable) table
            index = tokens - cfg.prompt_start_id
            is_prompt = (index >= 0) & (index < cfg.num_prompts)
            prompts = PromptEncoder(cfg, name="prompt")().astype(dtype)
            x = jnp.where(is_prompt[..., None], prompts[jnp.clip(index, 0, cfg.num_prompts - 1)], x)
        if cfg.type_vocab_size:
            x = x + nn.Embed(cfg.type_vocab_size, width, dtype=dtype, name="token_type_embeddings",
                             embedding_init=_init(cfg, (None, "embed")))(segment_ids)
        if cfg.position == "learned":
            x = x + nn.Embed(cfg.max_positions, width, dtype=dtype, name="position_embeddings",
                             embedding_init=_init(cfg, (None, "embed")))(positions)
        x = _conditional_norm(cfg, "norm", x, condition)
        return layers.Dropout(cfg.dropout_rate)(x, deterministic=self.deterministic)

    def attend(self, hidden):
        """Logits of `hidden` `[..., embedding_width]` against the token embeddings (the tied decoder)."""
        table = self.variables["params"]["word_embeddings"]["embedding"]
        table = table.unbox() if isinstance(table, nn.Partitioned) else table
        return jnp.einsum("...e,ve->...v", hidden, table.astype(hidden.dtype))


class TransformerEncoder(nn.Module):
    """Embeddings → `num_layers` Transformer layers → {'hidden', 'mlm_logits', 'pooled'}.

    Args (call): tokens `[batch, n]` int; segment_ids `[batch, n]` (default zeros); padding_mask
      `[batch, n]` bool (False: padding, hidden from every query); attention_mask `[batch, n, n_k]` bool
      (`models.masks`; combined with padding_mask when both are given); position_ids `[batch, n]`
      (default 0 … n−1, continuing from the cache in decode mode); train (dropout); decode (KV cache);
      heads: which outputs besides 'hidden' to compute ('mlm', 'pooled', 'hidden_states': the embeddings' output
      and every layer's, as Ladder Side-Tuning reads them); mlm_positions `[batch, m]`: compute
      the MLM logits at these positions only (a masked LM predicts ~15% of them: the tied decoder is the
      largest matmul of a small model); condition `[batch, condition_size]` (Conditional LayerNorm, when the
      config has condition_size > 0).
    Returns: {'hidden': `[batch, n, hidden]`, 'mlm_logits': `[batch, n or m, vocab]` float32,
      'pooled': `[batch, hidden]`, 'hidden_states': num_layers + 1 arrays `[batch, n, hidden]`}.
    """

    config: TransformerConfig

    def setup_positions(self, n, position_ids, decode):
        cache_index = None
        if decode:
            initialized = self.has_variable("cache", "index")
            index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
            if initialized:
                cache_index = index.value
                index.value = cache_index + n
        if position_ids is None:
            start = 0 if cache_index is None else cache_index
            position_ids = (start + jnp.arange(n))[None] if cache_index is not None else np.arange(n)[None]
        return position_ids, cache_index

    @nn.compact
    def __call__(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
                 padding_mask: jax.Array | None = None, attention_mask: jax.Array | None = None,
                 position_ids: jax.Array | None = None, train: bool = False, decode: bool = False,
                 heads: tuple[str, ...] = ("mlm", "pooled"), mlm_positions: jax.Array | None = None,
                 condition: jax.Array | None = None) -> dict[str, jax.Array]:
        cfg = self.config
        if (condition is None) != (cfg.condition_size == 0) or (
                condition is not None and condition.shape != (tokens.shape[0], cfg.condition_size)):
            raise ValueError(f"TransformerEncoder: condition_size is {cfg.condition_size}, so condition must be "
                             f"{'None' if not cfg.condition_size else f'[batch, {cfg.condition_size}]'}, got "
                             f"{None if condition is None else condition.shape}")
        batch, n = tokens.shape
        positions, cache_index = self.setup_positions(n, position_ids, decode)
        if segment_ids is None:
            segment_ids = jnp.zeros_like(tokens)
        embeddings = Embeddings(cfg, deterministic=not train, name="embeddings")
        x = embeddings(tokens, segment_ids, positions, condition)
        if cfg.embedding_width != cfg.hidden_size:
            x = layers.Projection((cfg.hidden_size,), (None, "embed"), dtype=cfg.compute_dtype,
                                  kernel_init=nn.initializers.normal(stddev=cfg.initializer_range),
                                  name="embeddings_project")(x)
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))

        mask = self._mask(batch, n, attention_mask, padding_mask, decode and cache_index is not None)
        rope = None
        if cfg.position == "rope":
            rope = layers.rope_tables(positions, cfg.head_dim, base=cfg.rope_base)
        layer_cls = nn.remat(TransformerLayer) if cfg.remat else TransformerLayer
        hidden_states = [x]
        for i in range(cfg.num_layers):
            x = layer_cls(cfg, deterministic=not train, decode=decode, name=f"layer_{i}")(x, mask, rope, cache_index,
                                                                                       condition)
            hidden_states.append(x)
        if cfg.norm_position == "pre":
            x = _conditional_norm(cfg, "final_norm", x, condition)
        outputs = {"hidden": x}
        if "hidden_states" in heads:
            outputs["hidden_states"] = hidden_states
        if "mlm" in heads:
            at = x if mlm_positions is None else jnp.take_along_axis(x, mlm_positions[..., None], axis=1)
            outputs["mlm_logits"] = self._mlm_logits(at, embeddings)
        if "pooled" in heads and cfg.use_pooler:
            pooled = _dense(cfg, (cfg.hidden_size,), ("embed", None), "pooler")(x[:, 0])
            outputs["pooled"] = jnp.tanh(pooled)
        return outputs

    def _mask(self, batch, n, attention_mask, padding_mask, decoding):
        if attention_mask is None:
            if decoding:
                raise ValueError("TransformerEncoder: decoding with a cache needs attention_mask, the mask of the new "
                                 "tokens against every cache slot (models.masks.make_mask)")
            attention_mask = jnp.ones((batch, n, n), bool)
        if padding_mask is not None:
            if padding_mask.shape[-1] != attention_mask.shape[-1]:
                raise ValueError(f"TransformerEncoder: padding_mask has {padding_mask.shape[-1]} keys, attention_mask "
                                 f"{attention_mask.shape[-1]}")
            attention_mask = attention_mask & padding_mask.astype(bool)[:, None, :]
        return attention_mask

    def _mlm_logits(self, x, embeddings):
        cfg = self.config
        return MLMHead(cfg, name="mlm_head")(x, embeddings)


class MLMHead(nn.Module):
    """BERT's MLM head: `Norm(act(W_t h + b_t)) E_tokᵀ + b` (or an untied decoder), float32 logits."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x, embeddings: Embeddings):
        cfg = self.config
        h = _dense(cfg, (cfg.embedding_width,), ("embed", None), "transform")(x)
        h = _norm(cfg, "norm")(ACTIVATIONS[cfg.hidden_act](h))
        if cfg.tie_embeddings:
            logits = embeddings.attend(h)
        else:
            logits = layers.Projection((cfg.vocab_size,), (None, "vocab"), use_bias=False, dtype=cfg.compute_dtype,
                                       kernel_init=nn.initializers.normal(stddev=cfg.initializer_range),
                                       name="decoder")(h)
        bias = self.param("output_bias", layers.partitioned(nn.initializers.zeros, ("vocab",)), (cfg.vocab_size,),
                          jnp.float32)
        logits = logits.astype(jnp.float32) + bias
        return nn.with_logical_constraint(logits, ("batch", "length", "act_vocab"))
