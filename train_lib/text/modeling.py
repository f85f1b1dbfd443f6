"""The text family's encoders behind one interface: a BERT/RoFormer Transformer or a GAU (GAU-α) stack.

`model.architecture` chooses from `ARCHITECTURES`: 'transformer' (`models.transformer.TransformerEncoder`,
multi-head; RoFormer with rotary positions or BERT with learned ones) or 'gau' (`models.gau.GAULanguageModel`
as a bidirectional encoder with segment embeddings, as Su's GAU-α, https://kexue.fm/archives/9052). Both take
the attention masks of `models.masks` (UniLM for seq2seq), so a task is written once for either, and both
decode with a KV cache through `TextModel.cached_lm` (`train_lib.text.decoding.CachedLM`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from models import gau as gau_lib
from models import transformer as transformer_lib
from models.gated_unit import GAUConfig
from train_lib import config_lib
from train_lib.config_lib import ConfigError

ARCHITECTURES = ("transformer", "gau")
# GAUConfig fields the text family sets itself (the tokenizer gives the vocabulary; an encoder is bidirectional).
_GAU_FIXED = ("vocab_size", "causal", "type_vocab_size", "condition_size")


@dataclasses.dataclass(frozen=True)
class TextModel:
    """An encoder with its config: `logits(...)` for the losses, `cached_lm()` for decoding."""

    architecture: str
    config: Any  # TransformerConfig or GAUConfig
    module: Any  # the linen module

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def max_positions(self) -> int | None:
        """The longest input the model covers (None: any length; rotary positions)."""
        cfg = self.config
        if self.architecture == "transformer":
            return cfg.max_positions if cfg.position == "learned" else None
        from models.positions import MAX_LENGTH
        return MAX_LENGTH[cfg.position](cfg.max_positions)

    @property
    def compute_dtype(self) -> str:
        return self.config.dtype

    def init(self, rng, tokens, segment_ids, condition=None):
        """Boxed parameters (with logical axis names) for inputs shaped like `tokens` `[batch, n]`."""
        extra = {} if condition is None else {"condition": condition}
        return self.module.init({"params": rng}, tokens, segment_ids=segment_ids, **extra)["params"]

    def logits(self, params, tokens, *, segment_ids=None, padding_mask=None, attention_mask=None, train=False,
               rng=None, positions=None, condition=None) -> jax.Array:
        """Token logits `[batch, n, vocab]` float32 (the MLM head of the Transformer, the output layer of GAU), or
        `[batch, m, vocab]` at `positions` `[batch, m]`: the Transformer then computes its head there only."""
        rngs = {"dropout": rng} if train and rng is not None else {}
        extra = {} if condition is None else {"condition": condition}  # Conditional LayerNorm's [b, k]
        if self.architecture == "transformer":
            out = self.module.apply({"params": params}, tokens, segment_ids=segment_ids, padding_mask=padding_mask,
                                    attention_mask=attention_mask, train=train, heads=("mlm",),
                                    mlm_positions=positions, rngs=rngs, **extra)
            return out["mlm_logits"]
        logits = self.module.apply({"params": params}, tokens, segment_ids=segment_ids, padding_mask=padding_mask,
                                   attention_mask=attention_mask, train=train, rngs=rngs, **extra)
        return logits if positions is None else jnp.take_along_axis(logits, positions[..., None], axis=1)

    def cached_lm(self):
        """The adaptor `train_lib.text.decoding` decodes with: a zero cache, and one cached forward call."""
        from train_lib.text import decoding

        module, architecture = self.module, self.architecture

        width = self.config.condition_size  # > 0: Conditional LayerNorm, whose condition every call takes
        conditioned = width > 0

        def init_cache(batch: int, max_length: int):
            tokens = jnp.zeros((batch, max_length), jnp.int32)
            extra = {"condition": jnp.zeros((batch, width))} if conditioned else {}
            shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), tokens, segment_ids=tokens,
                                                        decode=True, **extra))
            import flax.linen as nn
            return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.unbox(shapes["cache"]))

        def apply(params, cache, tokens, *, segment_ids, position_ids, attention_mask, condition=None):
            variables = {"params": params, "cache": cache}
            extra = {} if condition is None else {"condition": condition}
            if architecture == "transformer":
                out, updated = module.apply(variables, tokens, segment_ids=segment_ids, position_ids=position_ids,
                                            attention_mask=attention_mask, decode=True, heads=("mlm",),
                                            mutable=["cache"], **extra)
                return out["mlm_logits"], updated["cache"]
            # GAU: rotary positions only (checked in `text_model`), which are relative, so a row's positions
            # need not follow position_ids: left padding shifts a whole row, which rotary scores ignore.
            del position_ids
            logits, updated = module.apply(variables, tokens, segment_ids=segment_ids, attention_mask=attention_mask,
                                           decode=True, mutable=["cache"], **extra)
            return logits, updated["cache"]

        return decoding.CachedLM(init_cache=init_cache, apply=apply)


def text_model(model_node, *, vocab_size: int, seq_len: int) -> TextModel:
    """The `TextModel` of the config's `model` block, validated (one-line ConfigErrors naming the key)."""
    architecture = config_lib.typed(model_node, "architecture", str)
    if architecture not in ARCHITECTURES:
        raise ConfigError(f"config: 'model.architecture' is {architecture!r}; expected one of {list(ARCHITECTURES)}")
    if architecture == "transformer":
        values = config_lib.dataclass_values(transformer_lib.TransformerConfig, model_node)
        values.pop("vocab_size", None)
        cfg = transformer_lib.TransformerConfig(**values, vocab_size=vocab_size)
        try:
            cfg.validate()
        except ValueError as error:
            raise ConfigError(f"config: model.{error}") from None
        if cfg.position == "learned" and seq_len > cfg.max_positions:
            raise ConfigError(f"config: 'data.seq_len' {seq_len} exceeds model.max_positions={cfg.max_positions} "
                              "(the learned position table)")
        return TextModel(architecture, cfg, transformer_lib.TransformerEncoder(cfg))
    values = config_lib.dataclass_values(GAUConfig, model_node)
    fixed = [key for key in _GAU_FIXED if key in values]
    if fixed:
        raise ConfigError(f"config: model.{fixed[0]} is set by the text family for a GAU encoder (the tokenizer's "
                          "vocabulary, a bidirectional stack with two segments); remove it")
    values.setdefault("train_length", seq_len)
    cfg = GAUConfig(**values, vocab_size=vocab_size, causal=False, type_vocab_size=2)
    if cfg.attention != "gau" or cfg.position != "rope":
        raise ConfigError(f"config: a text GAU encoder needs model.attention='gau' and model.position='rope' (the "
                          f"masks of models.masks and left-padded decoding), got {cfg.attention!r}, {cfg.position!r}")
    if cfg.attention_impl == "pallas":
        raise ConfigError("config: model.attention_impl='pallas' has no segment masks (UniLM); use 'xla' or 'auto'")
    return TextModel(architecture, cfg, gau_lib.GAULanguageModel(cfg))
