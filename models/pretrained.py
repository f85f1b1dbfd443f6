"""Hugging Face BERT and RoFormer checkpoints ↔ `models.transformer.TransformerEncoder` parameters.

A checkpoint is a directory with `config.json` and `model.safetensors` (or the shards that
`model.safetensors.index.json` lists), as `save_pretrained` writes it. `load_huggingface` builds the encoder
its config describes and its params; `save_huggingface` writes a directory that transformers' BertForMaskedLM /
RoFormerForMaskedLM (and BertModel / RoFormerModel) load, with the same outputs. `hf_key_map` is the one
mapping both directions use: checkpoint key → (param path, conversion).

The conversions (Devlin et al., BERT, arXiv 1810.04805; Su et al., RoFormer, arXiv 2104.09864,
https://kexue.fm/archives/8265):

- torch Linear weights are `[out, in]`; our kernels are `[in, out]`, with the query/key/value outputs split
  into `[hidden, heads, head_dim]` and the attention output's inputs into `[heads, head_dim, hidden]`.
- Hugging Face's RoFormer rotates interleaved pairs of each head's query and key dimensions (2i, 2i+1);
  `models.layers.apply_rope` rotates half-split pairs (i, i + head_dim/2) by the same angles θ_i. Taking
  our dimension i from theirs 2i and i + head_dim/2 from 2i+1 (kernel columns and biases of the queries and
  keys) makes every rotated query and key a permutation of theirs, so the scores qᵀk are identical.
- RoFormer's sinusoidal table `encoder.embed_positions.weight` is a buffer, not a weight: it is checked on
  import (this model computes it) and written on export. BERT's MLM decoder is tied to the word embeddings
  unless `tie_word_embeddings` is false; `_output_bias_keys` says under which name its bias is found.
- BERT always gets a pooler (BertModel has one, and BertForPreTraining files hold it); a BertForMaskedLM file
  lacks it, so it is initialised and reported, like an MLM head missing from a bare BertModel file.

Pre-norm stacks, bias-free layers and RoFormer's `rotary_value` have no counterpart on the other side and are
refused with a one-line ValueError.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from models.transformer import TransformerConfig, TransformerEncoder

__all__ = ["Conversion", "LoadReport", "hf_key_map", "huggingface_config", "load_huggingface",
           "load_huggingface_with_report", "read_safetensors", "rotary_permutation", "rotary_table",
           "save_huggingface", "transformer_config_from_huggingface"]

log = logging.getLogger(__name__)

CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE = "config.json", "model.safetensors", "model.safetensors.index.json"
POSITIONS = {"bert": "learned", "roformer": "rope"}  # model_type → TransformerConfig.position
PREFIXES = {"learned": "bert", "rope": "roformer"}  # position → checkpoint key prefix (and model_type)
ARCHITECTURES = {"bert": "BertForMaskedLM", "roformer": "RoFormerForMaskedLM"}
# Hugging Face `hidden_act` (transformers.activations.ACT2CLS) → ours, and ours → the name written on export.
ACTIVATIONS_FROM_HF = {"gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
                       "gelu_pytorch_tanh": "gelu_tanh", "gelu_python_tanh": "gelu_tanh", "relu": "relu",
                       "silu": "silu", "swish": "silu"}
ACTIVATIONS_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu"}
# BertConfig / RoFormerConfig defaults (transformers 5.24), for config.json files that leave a field out.
_HF_DEFAULTS = {
    "bert": dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                 max_position_embeddings=512, type_vocab_size=2, initializer_range=0.02, layer_norm_eps=1e-12,
                 tie_word_embeddings=True),
    "roformer": dict(vocab_size=50000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1,
                     attention_probs_dropout_prob=0.1, max_position_embeddings=1536, type_vocab_size=2,
                     initializer_range=0.02, layer_norm_eps=1e-12, tie_word_embeddings=True),
}
_ROPE_BASE = 10000.0  # fixed in RoFormerSinusoidalPositionalEmbedding
_INIT_SEED = 0  # params a checkpoint lacks come from TransformerEncoder.init with this seed


# ---------------------------------------------------------------------------------------------------- config


def transformer_config_from_huggingface(hf_config: dict[str, Any]) -> TransformerConfig:
    """The `TransformerConfig` of a Hugging Face BERT or RoFormer `config.json` (as a dict)."""
    model_type = hf_config.get("model_type")
    if model_type not in POSITIONS:
        raise ValueError(f"config.json: model_type is {model_type!r}; expected one of {sorted(POSITIONS)}")
    c = {**_HF_DEFAULTS[model_type], **hf_config}
    if model_type == "bert" and c.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"config.json: position_embedding_type is {c['position_embedding_type']!r}; only "
                         f"'absolute' (learned positions) is supported")
    if c.get("rotary_value"):
        raise ValueError("config.json: rotary_value is true (rotary positions on the values too); only RoFormer's "
                         "default rotary_value false is supported")
    if c.get("add_cross_attention"):
        raise ValueError("config.json: add_cross_attention is true; only encoders without cross-attention load")
    if c.get("is_decoder"):
        log.warning("config.json: is_decoder is true (a causal LM); pass TransformerEncoder a causal attention_mask "
                    "(models.masks), it attends bidirectionally by default")
    if c["hidden_act"] not in ACTIVATIONS_FROM_HF:
        raise ValueError(f"config.json: hidden_act is {c['hidden_act']!r}; expected one of "
                         f"{sorted(ACTIVATIONS_FROM_HF)}")
    embedding_size = c.get("embedding_size") or c["hidden_size"]
    cfg = TransformerConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"],
        num_heads=c["num_attention_heads"], intermediate_size=c["intermediate_size"],
        embedding_size=0 if embedding_size == c["hidden_size"] else embedding_size,
        type_vocab_size=c["type_vocab_size"], max_positions=c["max_position_embeddings"],
        position=POSITIONS[model_type], rope_base=_ROPE_BASE, norm_position="post",
        layer_norm_eps=c["layer_norm_eps"], hidden_act=ACTIVATIONS_FROM_HF[c["hidden_act"]],
        dropout_rate=c["hidden_dropout_prob"], attention_dropout_rate=c["attention_probs_dropout_prob"],
        use_pooler=model_type == "bert", tie_embeddings=c["tie_word_embeddings"], use_bias=True,
        initializer_range=c["initializer_range"])
    cfg.validate()
    return cfg


def huggingface_config(cfg: TransformerConfig) -> dict[str, Any]:
    """The `config.json` dict of `cfg` (the inverse of `transformer_config_from_huggingface`)."""
    _check_exportable(cfg)
    model_type = PREFIXES[cfg.position]
    hf = dict(model_type=model_type, architectures=[ARCHITECTURES[model_type]], vocab_size=cfg.vocab_size,
              hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
              intermediate_size=cfg.intermediate_size, hidden_act=ACTIVATIONS_TO_HF[cfg.hidden_act],
              hidden_dropout_prob=cfg.dropout_rate, attention_probs_dropout_prob=cfg.attention_dropout_rate,
              max_position_embeddings=cfg.max_positions, type_vocab_size=cfg.type_vocab_size,
              initializer_range=cfg.initializer_range, layer_norm_eps=cfg.layer_norm_eps, pad_token_id=0,
              tie_word_embeddings=cfg.tie_embeddings, is_decoder=False, add_cross_attention=False, dtype="float32")
    if model_type == "bert":
        hf["position_embedding_type"] = "absolute"  # read by transformers < 5
    else:
        hf.update(embedding_size=cfg.embedding_width, rotary_value=False)
    return hf


def _check_exportable(cfg: TransformerConfig) -> None:
    problems = {"norm_position": (cfg.norm_position != "post", "Hugging Face's BERT and RoFormer are post-norm"),
                "use_bias": (not cfg.use_bias, "their layers all have biases"),
                "rope_base": (cfg.position == "rope" and cfg.rope_base != _ROPE_BASE,
                              f"RoFormer's rotary base is fixed at {_ROPE_BASE:g}"),
                "type_vocab_size": (cfg.type_vocab_size == 0, "their embeddings always add a segment row")}
    for name, (bad, why) in problems.items():
        if bad:
            raise ValueError(f"save_huggingface: {name}={getattr(cfg, name)!r} has no Hugging Face equivalent ({why})")


# ---------------------------------------------------------------------------------------------------- the map


@dataclasses.dataclass(frozen=True)
class Conversion:
    """Where a checkpoint array lives in the params, and how to convert it each way (NumPy in, NumPy out)."""

    path: tuple[str, ...]
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _identity(x):
    return x


def rotary_permutation(head_dim: int) -> np.ndarray:
    """Our query/key dimension j comes from Hugging Face's `perm[j]`: [0, 2, 4, …, 1, 3, 5, …] (see module doc)."""
    return np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])


def _head_conversions(cfg: TransformerConfig, rotary: bool) -> tuple[Callable, Callable, Callable, Callable]:
    """(kernel to_flax, kernel to_hf, bias to_flax, bias to_hf) of a query/key/value projection."""
    h, d = cfg.num_heads, cfg.head_dim
    perm = rotary_permutation(d) if rotary else np.arange(d)
    inverse = np.argsort(perm)
    return (lambda w: w.T.reshape(cfg.hidden_size, h, d)[..., perm],
            lambda k: k[..., inverse].reshape(cfg.hidden_size, h * d).T,
            lambda b: b.reshape(h, d)[..., perm],
            lambda b: b[..., inverse].reshape(h * d))


def _linear(key: str, path: tuple[str, ...]) -> dict[str, Conversion]:
    """A torch Linear `{key}.weight` `[out, in]`, `{key}.bias` → `path/kernel` `[in, out]`, `path/bias`."""
    return {f"{key}.weight": Conversion(path + ("kernel",), np.transpose, np.transpose),
            f"{key}.bias": Conversion(path + ("bias",), _identity, _identity)}


def _layer_norm(key: str, path: tuple[str, ...]) -> dict[str, Conversion]:
    return {f"{key}.weight": Conversion(path + ("scale",), _identity, _identity),
            f"{key}.bias": Conversion(path + ("bias",), _identity, _identity)}


def hf_key_map(cfg: TransformerConfig) -> dict[str, Conversion]:
    """Every checkpoint key of a `cfg`-shaped BERT/RoFormer (with its MLM head) → its `Conversion`.

    The keys are those `save_pretrained` writes for BertForMaskedLM / RoFormerForMaskedLM, plus BertModel's
    pooler; the tied decoder weight appears only when `cfg.tie_embeddings` is False.
    """
    p = PREFIXES[cfg.position]
    emb = lambda name: {f"{p}.embeddings.{name}.weight": Conversion(  # noqa: E731
        ("embeddings", name, "embedding"), _identity, _identity)}
    out = {**emb("word_embeddings"), **_layer_norm(f"{p}.embeddings.LayerNorm", ("embeddings", "norm"))}
    if cfg.type_vocab_size:
        out.update(emb("token_type_embeddings"))
    if cfg.position == "learned":
        out.update(emb("position_embeddings"))
    if cfg.embedding_width != cfg.hidden_size:
        out.update(_linear(f"{p}.embeddings_project", ("embeddings_project",)))
    h, d, e = cfg.num_heads, cfg.head_dim, cfg.hidden_size
    for i in range(cfg.num_layers):
        key, path = f"{p}.encoder.layer.{i}", (f"layer_{i}",)
        for name in ("query", "key", "value"):
            k_flax, k_hf, b_flax, b_hf = _head_conversions(cfg, rotary=cfg.position == "rope" and name != "value")
            out[f"{key}.attention.self.{name}.weight"] = Conversion(path + ("attention", name, "kernel"), k_flax, k_hf)
            out[f"{key}.attention.self.{name}.bias"] = Conversion(path + ("attention", name, "bias"), b_flax, b_hf)
        out[f"{key}.attention.output.dense.weight"] = Conversion(
            path + ("attention", "output", "kernel"), lambda w: w.T.reshape(h, d, e), lambda k: k.reshape(h * d, e).T)
        out[f"{key}.attention.output.dense.bias"] = Conversion(path + ("attention", "output", "bias"),
                                                               _identity, _identity)
        out.update(_layer_norm(f"{key}.attention.output.LayerNorm", path + ("attention_norm",)))
        out.update(_linear(f"{key}.intermediate.dense", path + ("mlp", "intermediate")))
        out.update(_linear(f"{key}.output.dense", path + ("mlp", "output")))
        out.update(_layer_norm(f"{key}.output.LayerNorm", path + ("mlp_norm",)))
    if cfg.use_pooler and cfg.position == "learned":  # RoFormer has no pooler
        out.update(_linear(f"{p}.pooler.dense", ("pooler",)))
    out.update(_linear("cls.predictions.transform.dense", ("mlm_head", "transform")))
    out.update(_layer_norm("cls.predictions.transform.LayerNorm", ("mlm_head", "norm")))
    out[_output_bias_keys(cfg)[0]] = Conversion(("mlm_head", "output_bias"), _identity, _identity)
    if not cfg.tie_embeddings:
        out["cls.predictions.decoder.weight"] = Conversion(("mlm_head", "decoder", "kernel"), np.transpose,
                                                           np.transpose)
    return out


def _output_bias_keys(cfg: TransformerConfig) -> tuple[str, str]:
    """(the key of the MLM output bias, its other name). Tied, HF ties `cls.predictions.decoder.bias` to
    `cls.predictions.bias` and saves the latter; untied (transformers 5), the decoder's own bias is the one its
    forward adds, and `cls.predictions.bias` is saved beside it unused. Older files may hold only the other
    name (transformers 4 tied the two biases whatever tie_word_embeddings said): it is read when the key is absent.
    """
    names = ("cls.predictions.bias", "cls.predictions.decoder.bias")
    return names if cfg.tie_embeddings else names[::-1]


def rotary_table_key(cfg: TransformerConfig) -> str | None:
    """The checkpoint key of RoFormer's sinusoidal buffer (None for BERT)."""
    return f"{PREFIXES[cfg.position]}.encoder.embed_positions.weight" if cfg.position == "rope" else None


def rotary_table(cfg: TransformerConfig) -> np.ndarray:
    """RoFormerSinusoidalPositionalEmbedding's table `[max_positions, head_dim]` float32: sin(m θ_i) in the first
    half, cos(m θ_i) in the second, θ_i = 10000^{−2i/head_dim}; computed in float64 as transformers does."""
    n, dim = cfg.max_positions, cfg.head_dim
    j = np.arange(dim)
    angles = np.arange(n)[:, None] / np.power(10000, 2 * (j // 2) / dim)[None, :]
    return np.concatenate([np.sin(angles[:, 0::2]), np.cos(angles[:, 1::2])], axis=1).astype(np.float32)


# ---------------------------------------------------------------------------------------------------- files


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of the checkpoint directory `path` (one file or the shards its index lists), float32."""
    from safetensors import safe_open  # noqa: PLC0415  (the "text" extra)

    path = Path(path)
    if (path / WEIGHTS_FILE).is_file():
        files = [path / WEIGHTS_FILE]
    elif (path / INDEX_FILE).is_file():
        weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        files = [path / name for name in sorted(set(weight_map.values()))]
    else:
        others = sorted(p.name for p in path.glob("*.bin")) if path.is_dir() else []
        found = f" (found {', '.join(others)})" if others else ""
        raise ValueError(f"{path}: no {WEIGHTS_FILE} or {INDEX_FILE}{found}; only safetensors checkpoints load — "
                         f"convert with transformers: model.save_pretrained(dir, safe_serialization=True)")
    arrays = {}
    for file in files:
        with safe_open(str(file), framework="np") as f:
            bfloat16 = [key for key in f.keys() if f.get_slice(key).get_dtype() == "BF16"]
            arrays.update({key: f.get_tensor(key) for key in f.keys() if key not in bfloat16})
        if bfloat16:  # NumPy has no bfloat16: read these through JAX
            with safe_open(str(file), framework="flax") as f:
                arrays.update({key: np.asarray(f.get_tensor(key)) for key in bfloat16})
    return {key: np.asarray(value, np.float32) for key, value in arrays.items()}


def _add_prefix(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """A bare BertModel/RoFormerModel saves its keys without the `bert.`/`roformer.` prefix: put it back."""
    if any(key.startswith(prefix + ".") for key in arrays):
        return arrays
    return {key if key.startswith("cls.") else f"{prefix}.{key}": value for key, value in arrays.items()}


# ---------------------------------------------------------------------------------------------------- import


@dataclasses.dataclass
class LoadReport:
    """What `load_huggingface_with_report` did: `restored` and `unused` are checkpoint keys; `initialised` are
    param paths ('pooler/kernel') the checkpoint lacked, drawn from `TransformerEncoder.init` (seed 0)."""

    restored: list[str]
    initialised: list[str]
    unused: list[str]


def _param_shapes(model: TransformerEncoder) -> dict[tuple[str, ...], tuple[int, ...]]:
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(_INIT_SEED), jnp.zeros((1, 1), jnp.int32))
    flat = traverse_util.flatten_dict(nn.unbox(abstract["params"]))
    return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def load_huggingface_with_report(path: str | Path) -> tuple[TransformerEncoder, dict[str, Any], LoadReport]:
    """`load_huggingface`, also returning the `LoadReport` of what came from the checkpoint."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise ValueError(f"{path}: no {CONFIG_FILE}; expected a directory written by transformers' save_pretrained")
    cfg = transformer_config_from_huggingface(json.loads((path / CONFIG_FILE).read_text()))
    arrays = _add_prefix(read_safetensors(path), PREFIXES[cfg.position])
    model = TransformerEncoder(cfg)
    shapes = _param_shapes(model)
    key_map = hf_key_map(cfg)
    bias_key, bias_alias = _output_bias_keys(cfg)
    if bias_key not in arrays and bias_alias in arrays:
        arrays[bias_key] = arrays.pop(bias_alias)

    mismatches = []
    for key, conversion in key_map.items():
        if key in arrays:
            want = conversion.to_hf(np.zeros(shapes[conversion.path], np.float32)).shape
            if arrays[key].shape != want:
                mismatches.append(f"{key} {arrays[key].shape} (model needs {want})")
    table_key = rotary_table_key(cfg)
    if table_key in arrays:
        table = rotary_table(cfg)
        if arrays[table_key].shape != table.shape:
            mismatches.append(f"{table_key} {arrays[table_key].shape} (model needs {table.shape})")
        elif not np.allclose(arrays[table_key], table, rtol=0, atol=1e-2):  # bfloat16 files round it
            raise ValueError(f"{path}: {table_key} is not RoFormer's sinusoidal table (base {_ROPE_BASE:g}); this "
                             f"model computes that table and cannot use another")
    if mismatches:
        raise ValueError(f"{path}: checkpoint arrays of the wrong shape for its {CONFIG_FILE}: "
                         f"{'; '.join(mismatches)}")

    flat, restored = {}, []
    for key, conversion in key_map.items():
        if key in arrays:
            flat[conversion.path] = np.ascontiguousarray(conversion.to_flax(arrays[key]), np.float32)
            restored.append(key)
    if table_key in arrays:
        restored.append(table_key)
    initialised = [path_ for path_ in shapes if path_ not in flat]
    if initialised:
        init = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(_INIT_SEED), jnp.zeros((1, 1), jnp.int32))["params"])
        init = traverse_util.flatten_dict(init)
        flat.update({p: np.asarray(init[p], np.float32) for p in initialised})
    report = LoadReport(restored=restored, initialised=["/".join(p) for p in initialised],
                        unused=sorted(set(arrays) - set(restored)))
    log.log(logging.WARNING if initialised else logging.INFO,
            "load_huggingface %s: %d arrays restored; initialised (not in the checkpoint): %s; unused: %s",
            path, len(restored), report.initialised or "none", report.unused or "none")
    return model, traverse_util.unflatten_dict(flat), report


def load_huggingface(path: str | Path) -> tuple[TransformerEncoder, dict[str, Any]]:
    """The encoder and params of a Hugging Face BERT/RoFormer checkpoint directory.

    `model.apply({"params": params}, input_ids, segment_ids=token_type_ids, padding_mask=attention_mask)` gives
    'hidden' equal to transformers' `last_hidden_state`, 'mlm_logits' to the MLM head's logits and (BERT)
    'pooled' to `pooler_output`. Params are float32 NumPy arrays in `TransformerEncoder.init`'s tree; those the
    checkpoint lacks (a pooler, an MLM head) are initialised and logged (`load_huggingface_with_report`).
    """
    model, params, _ = load_huggingface_with_report(path)
    return model, params


# ---------------------------------------------------------------------------------------------------- export


def save_huggingface(model: TransformerEncoder, params: dict[str, Any], path: str | Path) -> None:
    """Writes `config.json` and `model.safetensors` of `model` with `params` (boxed or not) into the directory `path`.

    BERT (learned positions) is written as BertForMaskedLM plus its pooler (which BertModel reads);
    RoFormer as RoFormerForMaskedLM, without a pooler (it has none: ours, if any, is dropped with a warning).
    """
    from safetensors.numpy import save_file  # noqa: PLC0415  (the "text" extra)

    cfg = model.config
    hf_config = huggingface_config(cfg)
    flat = traverse_util.flatten_dict(nn.unbox(params))
    key_map = hf_key_map(cfg)
    missing = sorted("/".join(c.path) for c in key_map.values() if c.path not in flat)
    if missing:
        raise ValueError(f"save_huggingface: params lack {', '.join(missing)} (expected TransformerEncoder.init's "
                         f"tree for this config)")
    dropped = sorted("/".join(p) for p in set(flat) - {c.path for c in key_map.values()})
    if dropped:
        log.warning("save_huggingface: %s have no Hugging Face counterpart and are not written", ", ".join(dropped))
    tensors = {key: np.ascontiguousarray(c.to_hf(np.asarray(flat[c.path], np.float32))) for key, c in key_map.items()}
    if not cfg.tie_embeddings:  # transformers saves (and expects) both names untied
        bias_key, bias_alias = _output_bias_keys(cfg)
        tensors[bias_alias] = tensors[bias_key]
    if rotary_table_key(cfg):
        tensors[rotary_table_key(cfg)] = rotary_table(cfg)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
