"""The Gated Attention Unit (GAU) and the gated-attention language model.

GAU (Hua, Dai, Liu, Le, *Transformer Quality in Linear Time*, arXiv 2202.10447; Su Jianlin,
https://kexue.fm/archives/8934 and https://kexue.fm/archives/8990):

    X̃ = Norm(X);  [U | V] = SiLU(X̃ W_uv),  Z = SiLU(X̃ W_z)
    Q = RoPE(γ_q ⊙ Z + β_q),  K = RoPE(γ_k ⊙ Z + β_k)
    O = X + (U ⊙ A V) W_o,    A = normaliser(Q Kᵀ)

with `e = expansion · d` and `s = key_dim` (the shared projections live in `models.gated_unit`).
RoPE is the last operation on Q and K. One GAU has ≈ 3de + ds parameters, so one Transformer layer
(attention + FFN) corresponds to two GAUs. The language model stacks any layer of
`ATTENTION_LAYERS` (`model.attention`): 'gau' (quadratic, this file), 'flash' (mixed chunk
attention, `models.flash`) or 'performer' (FAVOR+ baseline, `models.performer`).

Shapes: tokens `[batch, length]`, activations `[batch, length, d]`, logits `[batch, length, vocab]`.
"""
from __future__ import annotations

import functools
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import attention, backend, flash, gated_unit, layers, pallas_attention, performer
from models import positions as positions_lib
from models.gated_unit import ATTENTION_IMPLS, GAUConfig, gated_output, gated_projections

__all__ = ["ATTENTION_LAYERS", "GAUConfig", "GAULanguageModel", "GatedAttentionUnit", "attention_implementation",
           "scanned_layers", "stack_layer_params"]


def attention_implementation(cfg: GAUConfig, *, decode: bool = False, explicit_mask: bool = False) -> str:
    """'xla' or 'pallas': how a GatedAttentionUnit computes `A V` under `cfg.attention_impl`.

    'pallas' (`models.pallas_attention.blockwise_attention`, memory linear in n) supports the softmax
    and softmax_plus normalisers without residual scores, and only the causal/bidirectional masks it
    builds by index; asking for it with anything else (including an explicit `attention_mask`, such
    as UniLM's) raises a ValueError. Decoding (a key/value cache, one query at a time) always takes
    the XLA path, so a model trained with 'pallas' still samples. 'auto' picks 'pallas' on GPU and TPU
    where it is supported and 'xla' otherwise (always on CPU, where Pallas only interprets); the platform is
    `models.backend.current()`, the target of an ahead-of-time compile (`train_lib.pods`) if there is one.
    """
    impl = cfg.attention_impl
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"model.attention_impl is {impl!r}; expected one of {list(ATTENTION_IMPLS)}")
    supported = cfg.normalizer in pallas_attention.SUPPORTED_NORMALIZERS and not cfg.residual_scores
    if impl == "pallas":
        if cfg.normalizer not in pallas_attention.SUPPORTED_NORMALIZERS:
            raise ValueError(f"model.attention_impl='pallas' supports the normalisers "
                             f"{list(pallas_attention.SUPPORTED_NORMALIZERS)}, got model.normalizer="
                             f"{cfg.normalizer!r}; use model.attention_impl='xla' or 'auto'")
        if cfg.residual_scores:
            raise ValueError("model.attention_impl='pallas' does not support model.residual_scores (the kernel "
                             "never forms the score matrix to pass on); use model.attention_impl='xla' or 'auto'")
        if explicit_mask:
            raise ValueError("model.attention_impl='pallas' cannot take an explicit attention_mask (segment masks "
                             "such as UniLM's; the kernel masks by index only); use model.attention_impl='xla' "
                             "or 'auto'")
        return "xla" if decode else "pallas"
    supported = supported and not explicit_mask
    if impl == "auto" and supported and not decode and backend.current() in ("gpu", "tpu"):
        return "pallas"
    return "xla"


def _batch_mesh_axes():
    """The mesh axes the logical 'batch' axis maps to under the active `nn.logical_axis_rules` (None without)."""
    if not nn.get_logical_axis_rules():
        return None
    return nn.logical_to_mesh_axes(("batch",))[0]


class GatedAttentionUnit(nn.Module):
    """One GAU layer (quadratic attention) with residual connection.

    In decode mode the keys and values of earlier positions live in the `cache` collection
    (`cached_key` `[batch, max_length, s]`, `cached_value` `[batch, max_length, e]`, their length set
    by the input length at initialisation), so a new token costs the same at any position.

    Args (call): x `[batch, n, d]`; rope (sin, cos) tables or None; positions `[n]` global positions;
      key_valid optional `[batch, n]`; cache_index (decode); residual_scores the previous layer's
      scores `[batch, n, n_keys]` (RealFormer, https://kexue.fm/archives/8027: S_l = Q_l K_lᵀ + S_{l−1},
      summed before the normaliser scales them, which equals summing scaled scores for every normaliser
      whose scale is the same in every layer); attention_mask optional `[batch or 1, n, n_keys]` bool
      (`models.masks`: UniLM, UniAE, ...), which replaces the causal/bidirectional mask of `cfg.causal`
      and is still combined with key_valid. n_keys is n, or in decode mode the cache length (the mask
      of the new tokens against every cache slot, unwritten slots False). The normalisers count each
      row's visible keys from the mask they are given, so softmax_plus's log l and relu2's 1/l follow it.
      condition optional `[batch, k]`: Conditional LayerNorm (post 7124) on the layer's norm
      (`models.gated_unit.norm`; model.condition_size = k).
    Returns: (y `[batch, n, d]`, this layer's scores if `residual_scores` is configured, else None).
    The attention weights are sown into `intermediates/attention_weights` (`[batch, n, n_keys]`) on the
    XLA path only: the Pallas path (`attention_implementation` → 'pallas') never forms them, so nothing
    is sown there. Its causal mask is by index (query i sees keys 0..i), which is what `positions`
    `0 … n−1` give outside decoding; it takes no explicit mask.
    """

    config: GAUConfig
    deterministic: bool = True
    decode: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, rope: Any, positions: jax.Array, key_valid: jax.Array | None = None,
                 cache_index: jax.Array | None = None, residual_scores: jax.Array | None = None,
                 attention_mask: jax.Array | None = None, condition: jax.Array | None = None):
        cfg = self.config
        u, v, (q, k) = gated_projections(cfg, x, 2, condition)
        q, k = layers.maybe_rope(q, rope), layers.maybe_rope(k, rope)
        impl = attention_implementation(cfg, decode=self.decode, explicit_mask=attention_mask is not None)
        if impl == "pallas":
            av = pallas_attention.batch_sharded_attention(q, k, v, batch_axes=_batch_mesh_axes(),
                                                          normalizer=cfg.normalizer, causal=cfg.causal,
                                                          key_valid=key_valid)
            return gated_output(cfg, x, u * av, deterministic=self.deterministic, condition=condition), None

        key_positions = positions
        # relu2_paper's n: the sequence's unpadded length (in decoding, the cache length). Under an explicit
        # mask, None lets relu2_paper count the keys visible to some row (`attention.sequence_key_count`),
        # which is the unpadded length for every kind of `models.masks` (padding hides a key from all rows;
        # the last target row, or the union of UniAE's segments, sees every other key).
        length = k.shape[1] if key_valid is None else jnp.sum(key_valid, axis=-1)
        if attention_mask is not None:
            length = None
        if self.decode and self.has_variable("cache", "cached_key"):
            k, v, key_positions = self._update_cache(k, v, cache_index)
            length = k.shape[1]  # a decoded row cannot see the final length; the cache length stands in
        elif self.decode:  # initialisation: create the cache with the input's length
            self._update_cache(k, v, None)
        mask = _explicit_mask(attention_mask, key_valid, k.shape[1]) if attention_mask is not None else (
            attention.attention_mask(positions, key_positions, causal=cfg.causal, key_valid=key_valid))

        scores = jnp.einsum("bqs,bks->bqk", q, k, preferred_element_type=jnp.float32)
        if residual_scores is not None:
            scores = scores + residual_scores
        weights = attention.get_normalizer(cfg.normalizer)(
            scores, mask, key_dim=cfg.key_dim, train_length=cfg.train_length, sequence_length=length)
        self.sow("intermediates", "attention_weights", weights)
        o = u * jnp.einsum("bqk,bke->bqe", weights.astype(v.dtype), v)
        return (gated_output(cfg, x, o, deterministic=self.deterministic, condition=condition),
                scores if cfg.residual_scores else None)

    def _update_cache(self, k, v, cache_index):
        """Writes this call's keys/values at `cache_index`; returns the whole cache and its positions."""
        cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        if cache_index is None:
            return None
        cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k, (0, cache_index, 0))
        cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v, (0, cache_index, 0))
        return cached_k.value, cached_v.value, jnp.arange(cached_k.value.shape[1])


def _explicit_mask(attention_mask: jax.Array, key_valid: jax.Array | None, num_keys: int) -> jax.Array:
    """An explicit `[batch or 1, n, n_keys]` mask, checked against the keys and combined with padding."""
    if attention_mask.ndim != 3 or attention_mask.shape[-1] != num_keys:
        raise ValueError(f"attention_mask must be [batch, n, n_keys] with n_keys={num_keys} (the sequence, or in "
                         f"decode mode every cache slot), got shape {tuple(attention_mask.shape)}")
    mask = attention_mask.astype(bool)
    if key_valid is not None:
        if key_valid.shape[-1] != num_keys:
            raise ValueError(f"padding_mask has {key_valid.shape[-1]} keys but attention_mask {num_keys}; in "
                             "decode mode put the padding into the mask (models.masks.make_mask's key_valid)")
        mask = mask & key_valid.astype(bool)[:, None, :]
    return mask


# Layer types by name (`model.attention`); all share GatedAttentionUnit's call signature.
ATTENTION_LAYERS: dict[str, type[nn.Module]] = {
    "gau": GatedAttentionUnit,
    "flash": flash.FlashLayer,
    "performer": performer.PerformerUnit,
}


@functools.lru_cache(maxsize=None)
def scanned_layers(cfg: GAUConfig) -> type[nn.Module]:
    """The `cfg.attention` layer applied `cfg.num_layers` times by one `nn.scan` (`model.scan_layers`).

    XLA compiles the layer body once instead of once per layer (MaxText's `scan_layers`). Parameters,
    the decode cache and sown intermediates get a leading layer axis under the module name "layers",
    whose logical axis name is "layers" (replicated unless a rule maps it). The layer's output is the
    scan's carry and every other argument is broadcast, so RealFormer's residual scores, which pass
    from layer to layer, are not supported, nor is the Performer, whose fixed random features are drawn
    per layer name (both raise ValueError). Unrolled parameters (`layer_0` … `layer_{N-1}`) convert
    with `stack_layer_params`.
    """
    if cfg.residual_scores or cfg.attention == "performer":
        raise ValueError(f"scan_layers needs residual_scores=False and attention 'gau' or 'flash', got "
                         f"residual_scores={cfg.residual_scores}, attention={cfg.attention!r}")
    layer_cls = ATTENTION_LAYERS[cfg.attention]

    class Constrained(layer_cls):  # the unrolled loop's activation constraint, inside the scan body
        def __call__(self, x, *args):
            y, _ = super().__call__(x, *args)
            return nn.with_logical_constraint(y, ("batch", "length", "act_embed")), None

    Constrained.__name__ = Constrained.__qualname__ = layer_cls.__name__
    body = nn.remat(Constrained, prevent_cse=False) if cfg.remat else Constrained  # no CSE to prevent in a scan
    return nn.scan(body, variable_axes={"params": 0, "cache": 0, "intermediates": 0},
                   split_rngs={"params": True, "dropout": True}, in_axes=nn.broadcast,
                   length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})


def stack_layer_params(params: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """Unrolled parameters (`layer_0` … `layer_{N-1}`) → the `model.scan_layers` layout (`layers`, stacked).

    Any tree with the model's parameter structure works (parameters, EMA parameters, Adam's μ or ν).
    Boxed (`nn.Partitioned`) leaves are unboxed first; the result carries no logical names.
    """
    params = nn.unbox(params)
    names = [f"layer_{i}" for i in range(num_layers)]
    missing = [name for name in names if name not in params]
    extra = sorted(k for k in params if re.fullmatch(r"layer_\d+", k) and k not in names)
    if missing or extra or "layers" in params:
        raise ValueError(f"stack_layer_params: expected layer_0 … layer_{num_layers - 1} for num_layers={num_layers} "
                         f"and no 'layers'; missing {missing}, extra {extra} (keys: {sorted(params)})")
    rest = {k: v for k, v in params.items() if k not in names}
    return {**rest, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *(params[name] for name in names))}


class GAULanguageModel(nn.Module):
    """Token embedding (+ segments, positions) → N gated attention layers → final norm → output layer.

    `causal=True` gives an autoregressive LM; `causal=False` a bidirectional encoder. Pre-norm stacks
    end with a final norm; post-norm stacks (GAU-α) normalise the embeddings instead, since every layer
    already ends with a norm. With `decode=True`, call once with `[batch, max_length]` tokens inside
    `init` to create the cache, then with `[batch, n]` chunks (a prompt, then one token at a time);
    positions continue from the cache.

    An explicit `attention_mask` (`models.masks`) replaces the causal/bidirectional mask in every layer,
    so a bidirectional GAU-α with `type_vocab_size=2` and the UniLM mask is a seq2seq model, as Su trained
    it (https://kexue.fm/archives/9052; UniLM: https://kexue.fm/archives/6933). 'gau' layers only: FLASH
    and the Performer raise ValueError, and attention_impl 'pallas' too ('auto' takes the XLA path).

    With `condition_size` > 0 every norm (each layer's, and the embedding or final norm) is a Conditional
    LayerNorm (post 7124, https://kexue.fm/archives/7124): `condition` `[batch, condition_size]` shifts its
    γ and β through zero-initialised projections (`<norm>_condition`), so a pretrained stack computes what it
    did until they train ('gau' layers only).

    Args (call): tokens `[batch, length]` int; `segment_ids` optional `[batch, length]` int (added as
      `segment_embed` rows when `type_vocab_size` > 0; default zeros); `padding_mask` optional
      `[batch, length]` bool; `attention_mask` optional `[batch, length, n_keys]` bool, n_keys = length,
      or in decode mode the cache length (the new tokens against every cache slot); `condition`
      `[batch, condition_size]` when the config has condition_size > 0, else None.
    Returns: logits `[batch, length, vocab]` float32.
    """

    config: GAUConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, *, train: bool = False, decode: bool = False,
                 padding_mask: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 attention_mask: jax.Array | None = None, condition: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        dtype = cfg.compute_dtype
        if (condition is None) != (cfg.condition_size == 0) or (
                condition is not None and condition.shape != (tokens.shape[0], cfg.condition_size)):
            raise ValueError(f"GAULanguageModel: condition_size is {cfg.condition_size}, so condition must be "
                             f"{'None' if not cfg.condition_size else f'[batch, {cfg.condition_size}]'}, got "
                             f"{None if condition is None else condition.shape}")
        if condition is not None and cfg.attention != "gau":
            raise ValueError(f"GAULanguageModel: Conditional LayerNorm (condition_size > 0) needs attention 'gau', "
                             f"got {cfg.attention!r}")
        n = tokens.shape[1]
        positions, cache_index = np.arange(n), None  # NumPy: tables become constants (layers.rope_tables)
        if decode and self.has_variable("cache", "index"):
            index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
            cache_index = index.value
            positions = cache_index + jnp.arange(n)
            index.value = cache_index + n
        elif decode:
            self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))

        embed_init = layers.KERNEL_INITS[cfg.kernel_init](cfg.num_layers, fan_in_axis=-1)
        x = nn.Embed(cfg.vocab_size, cfg.embed_dim, dtype=dtype, name="embed",
                     embedding_init=layers.partitioned(embed_init, ("vocab", "embed")))(tokens)
        if cfg.type_vocab_size:  # 0: no segment table, so older configs and checkpoints are unchanged
            segment_ids = jnp.zeros_like(tokens) if segment_ids is None else segment_ids
            x = x + nn.Embed(cfg.type_vocab_size, cfg.embed_dim, dtype=dtype, name="segment_embed",
                             embedding_init=layers.partitioned(embed_init, (None, "embed")))(segment_ids)
        elif segment_ids is not None:
            raise ValueError("GAULanguageModel got segment_ids but model.type_vocab_size is 0 (no segment "
                             "embeddings); set model.type_vocab_size ≥ 2 or pass no segment_ids")
        x, rope = positions_lib.POSITIONS[cfg.position](cfg, x, positions)
        if cfg.norm_position == "post":
            x = gated_unit.norm(cfg, x, condition, name="embed_norm")
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        conditioned = () if condition is None else (condition,)  # FLASH and the Performer take no condition
        if cfg.scan_layers:
            x = scanned_layers(cfg)(cfg, deterministic=not train, decode=decode, name="layers")(
                x, rope, positions, padding_mask, cache_index, None, attention_mask, *conditioned)[0]
        else:
            layer_cls = ATTENTION_LAYERS[cfg.attention]
            layer_cls = nn.remat(layer_cls) if cfg.remat else layer_cls
            scores = None
            for i in range(cfg.num_layers):
                x, scores = layer_cls(cfg, deterministic=not train, decode=decode, name=f"layer_{i}")(
                    x, rope, positions, padding_mask, cache_index, scores, attention_mask, *conditioned)
                x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        if cfg.norm_position == "pre":
            x = gated_unit.norm(cfg, x, condition, name="final_norm")
        logits = layers.Projection((cfg.vocab_size,), ("embed", "vocab"), name="logits", dtype=dtype,
                                   use_bias=cfg.use_bias,
                                   kernel_init=layers.KERNEL_INITS[cfg.kernel_init](cfg.num_layers))(x)
        return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "act_vocab"))
