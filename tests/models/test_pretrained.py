"""`models.pretrained` against Hugging Face: the fixtures' outputs, bitwise export round trips, and clear errors.

The fixtures (tests/fixtures/hf_{bert,roformer}_tiny) are tiny random BertForPreTraining / RoFormerForMaskedLM
checkpoints and their outputs, written by tests/peers/make_text_fixtures.py with transformers 5.24. That the
exported directories load in transformers with the same outputs is checked by tests/peers/check_hf_export.py
(it needs torch, so it is not part of `make test`).
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from models import layers, pretrained
from models.transformer import TransformerConfig, TransformerEncoder

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
BERT, ROFORMER = FIXTURES / "hf_bert_tiny", FIXTURES / "hf_roformer_tiny"
ATOL = 1e-5


def _outputs(model, params, directory: Path) -> dict[str, np.ndarray]:
    ids, segments, mask = (np.load(directory / f"{name}.npy") for name in
                           ("input_ids", "token_type_ids", "attention_mask"))
    out = jax.jit(model.apply)({"params": params}, ids, segment_ids=segments, padding_mask=mask.astype(bool))
    return {name: np.asarray(value) for name, value in out.items()}


def _flat(params) -> dict[tuple[str, ...], np.ndarray]:
    return traverse_util.flatten_dict(params)


def _assert_same_params(a, b) -> None:
    fa, fb = _flat(a), _flat(b)
    assert sorted(fa) == sorted(fb)
    for path in fa:
        np.testing.assert_array_equal(np.asarray(fa[path]), np.asarray(fb[path]), err_msg="/".join(path))


def _init_params(cfg: TransformerConfig, seed: int = 0):
    """`TransformerEncoder.init`, jitted (eager init runs op by op: several times slower to run than to compile)."""
    model = TransformerEncoder(cfg)
    return nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((1, 1), jnp.int32))["params"])


def _copy_fixture(source: Path, tmp_path: Path, arrays: dict[str, np.ndarray] | None = None,
                  config_edits: dict | None = None) -> Path:
    """A copy of a fixture directory, with its safetensors replaced by `arrays` and its config edited."""
    target = tmp_path / source.name
    shutil.copytree(source, target)
    if arrays is not None:
        save_file(arrays, str(target / "model.safetensors"), metadata={"format": "pt"})
    if config_edits:
        config = json.loads((target / "config.json").read_text())
        (target / "config.json").write_text(json.dumps({**config, **config_edits}))
    return target


# ------------------------------------------------------------------------------------------- parity with HF


def test_bert_matches_transformers_at_every_position(caplog):
    """Hidden states, MLM logits and pooler equal transformers' (padded positions included: both hide padded
    keys only); the next-sentence head is reported and logged as unused."""
    with caplog.at_level(logging.INFO, logger="models.pretrained"):
        model, params, report = pretrained.load_huggingface_with_report(BERT)
    out = _outputs(model, params, BERT)
    np.testing.assert_allclose(out["hidden"], np.load(BERT / "last_hidden_state.npy"), rtol=0, atol=ATOL)
    np.testing.assert_allclose(out["mlm_logits"], np.load(BERT / "mlm_logits.npy"), rtol=0, atol=ATOL)
    np.testing.assert_allclose(out["pooled"], np.load(BERT / "pooler_output.npy"), rtol=0, atol=ATOL)
    assert report.initialised == []
    assert report.unused == ["cls.seq_relationship.bias", "cls.seq_relationship.weight"]
    assert "cls.seq_relationship.weight" in caplog.text
    assert model.config.position == "learned" and model.config.dropout_rate == 0.1


def test_roformer_matches_transformers_at_every_position():
    """RoFormer with embedding_size 16 ≠ hidden 32 (embeddings_project) and permuted rotary columns."""
    model, params, report = pretrained.load_huggingface_with_report(ROFORMER)
    assert model.config.position == "rope" and model.config.embedding_width == 16
    assert "embeddings_project" in params and "pooler" not in params
    out = _outputs(model, params, ROFORMER)
    np.testing.assert_allclose(out["hidden"], np.load(ROFORMER / "last_hidden_state.npy"), rtol=0, atol=ATOL)
    np.testing.assert_allclose(out["mlm_logits"], np.load(ROFORMER / "mlm_logits.npy"), rtol=0, atol=ATOL)
    assert report.initialised == [] and report.unused == []
    assert "roformer.encoder.embed_positions.weight" in report.restored


def test_unpermuted_rotary_columns_break_roformer_parity(monkeypatch):
    """The parity test can fail: without the column permutation the outputs move by far more than ATOL."""
    monkeypatch.setattr(pretrained, "rotary_permutation", lambda head_dim: np.arange(head_dim))
    model, params = pretrained.load_huggingface(ROFORMER)
    error = np.abs(_outputs(model, params, ROFORMER)["hidden"] - np.load(ROFORMER / "last_hidden_state.npy")).max()
    assert error > 1e-2


def _interleaved_rope_float64(x: np.ndarray, table: np.ndarray) -> np.ndarray:
    """transformers' RoFormerSelfAttention.apply_rotary_position_embeddings in float64 NumPy: pairs (2i, 2i+1)."""
    sin, cos = np.split(table, 2, axis=-1)
    sin_pos, cos_pos = np.repeat(sin, 2, axis=-1), np.repeat(cos, 2, axis=-1)
    rotated_half = np.stack([-x[..., 1::2], x[..., ::2]], axis=-1).reshape(x.shape)
    return x * cos_pos + rotated_half * sin_pos


def test_rotary_permutation_turns_interleaved_into_half_split():
    """apply_rope(x[..., perm]) = interleaved_rope(x)[..., perm], so scores (sums over all dims) agree."""
    cfg = TransformerConfig(hidden_size=32, num_heads=2, max_positions=50)  # head_dim 16
    x = np.random.default_rng(0).standard_normal((50, cfg.head_dim))
    table = pretrained.rotary_table(cfg).astype(np.float64)
    perm = pretrained.rotary_permutation(cfg.head_dim)
    sin, cos = layers.rope_tables(np.arange(50), cfg.head_dim)
    ours = np.asarray(layers.apply_rope(jnp.asarray(x[:, perm], jnp.float32), sin, cos))
    np.testing.assert_allclose(ours, _interleaved_rope_float64(x, table)[:, perm], rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("fixture", [BERT, ROFORMER], ids=["bert", "roformer"])
def test_export_writes_the_original_arrays_bitwise(fixture, tmp_path):
    """save_huggingface of a loaded fixture writes every array HF saved that the model uses, bit for bit, and
    nothing else; loading it back gives identical params and config."""
    model, params, report = pretrained.load_huggingface_with_report(fixture)
    pretrained.save_huggingface(model, params, tmp_path / "export")
    original = load_file(str(fixture / "model.safetensors"))
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert sorted(exported) == sorted(set(original) - set(report.unused))
    for key, value in exported.items():
        assert value.dtype == np.float32 and value.shape == original[key].shape, key
        np.testing.assert_array_equal(value, original[key], err_msg=key)
    model_2, params_2 = pretrained.load_huggingface(tmp_path / "export")
    assert model_2.config == model.config
    _assert_same_params(params_2, params)
    written = json.loads((tmp_path / "export/config.json").read_text())
    assert written["architectures"] == [{"learned": "BertForMaskedLM", "rope": "RoFormerForMaskedLM"}[
        model.config.position]]


@pytest.mark.parametrize("overrides", [
    dict(position="learned", tie_embeddings=False, type_vocab_size=3, hidden_act="gelu_tanh"),
    dict(position="rope", embedding_size=8, use_pooler=False, hidden_act="relu"),
], ids=["bert_untied", "roformer_projected"])
def test_random_params_survive_export_and_import(overrides, tmp_path):
    """Params transformers never produced (every leaf random) come back identical, untied decoder included."""
    cfg = TransformerConfig(vocab_size=40, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=24,
                            max_positions=20, dropout_rate=0.0, attention_dropout_rate=0.05, initializer_range=0.1,
                            **overrides)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), _init_params(cfg))
    pretrained.save_huggingface(TransformerEncoder(cfg), params, tmp_path)
    model, loaded, report = pretrained.load_huggingface_with_report(tmp_path)
    assert model.config == cfg
    _assert_same_params(loaded, params)
    assert report.initialised == []
    # Untied, transformers saves the unused `cls.predictions.bias` beside the decoder's own bias: so does export.
    assert report.unused == ([] if cfg.tie_embeddings else ["cls.predictions.bias"])


@pytest.mark.parametrize("overrides, name", [(dict(norm_position="pre"), "norm_position"),
                                             (dict(use_bias=False), "use_bias"),
                                             (dict(rope_base=500.0), "rope_base")])
def test_export_refuses_configs_without_an_hf_equivalent(overrides, name, tmp_path):
    cfg = TransformerConfig(vocab_size=10, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=8, **overrides)
    with pytest.raises(ValueError, match=f"save_huggingface: {name}=.* no Hugging Face equivalent"):
        pretrained.save_huggingface(TransformerEncoder(cfg), {}, tmp_path)


# ------------------------------------------------------------------------------------------- partial checkpoints


def test_bare_model_checkpoint_gets_its_mlm_head_initialised_and_reported(tmp_path, caplog):
    """A BertModel file (no `bert.` prefix, no `cls.*`): the MLM head comes from init (seed 0) and is listed."""
    arrays = {key.removeprefix("bert."): value for key, value in load_file(str(BERT / "model.safetensors")).items()
              if not key.startswith("cls.")}
    directory = _copy_fixture(BERT, tmp_path, arrays=arrays)
    with caplog.at_level(logging.INFO, logger="models.pretrained"):
        model, params, report = pretrained.load_huggingface_with_report(directory)
    head = ["mlm_head/norm/bias", "mlm_head/norm/scale", "mlm_head/output_bias", "mlm_head/transform/bias",
            "mlm_head/transform/kernel"]
    assert sorted(report.initialised) == head and report.unused == []
    assert "mlm_head/output_bias" in caplog.text
    init = _flat(_init_params(model.config))
    for path in head:
        np.testing.assert_array_equal(_flat(params)[tuple(path.split("/"))], init[tuple(path.split("/"))])
    np.testing.assert_allclose(_outputs(model, params, directory)["hidden"], np.load(BERT / "last_hidden_state.npy"),
                               rtol=0, atol=ATOL)


def test_sharded_checkpoint_loads_like_one_file(tmp_path):
    """`model.safetensors.index.json` and its shards (the layout save_pretrained(max_shard_size=...) writes)."""
    arrays = load_file(str(ROFORMER / "model.safetensors"))
    directory = _copy_fixture(ROFORMER, tmp_path)
    (directory / "model.safetensors").unlink()
    keys = sorted(arrays)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, shard_keys in shards.items():
        save_file({k: arrays[k] for k in shard_keys}, str(directory / name), metadata={"format": "pt"})
    weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _, sharded = pretrained.load_huggingface(directory)
    _, whole = pretrained.load_huggingface(ROFORMER)
    _assert_same_params(sharded, whole)


def test_bfloat16_checkpoint_loads_as_float32(tmp_path):
    from safetensors.flax import save_file as save_jax_file

    arrays = {k: jnp.asarray(v, jnp.bfloat16) for k, v in load_file(str(ROFORMER / "model.safetensors")).items()}
    directory = _copy_fixture(ROFORMER, tmp_path)
    save_jax_file(arrays, str(directory / "model.safetensors"), metadata={"format": "pt"})
    _, params = pretrained.load_huggingface(directory)
    kernel = params["layer_0"]["mlp"]["output"]["kernel"]
    expected = np.asarray(arrays["roformer.encoder.layer.0.output.dense.weight"], np.float32).T
    assert kernel.dtype == np.float32
    np.testing.assert_array_equal(kernel, expected)


# ------------------------------------------------------------------------------------------- errors


def test_shape_mismatch_names_the_arrays_and_both_shapes(tmp_path):
    directory = _copy_fixture(BERT, tmp_path, config_edits={"intermediate_size": 48})
    with pytest.raises(ValueError) as error:
        pretrained.load_huggingface(directory)
    message = str(error.value)
    assert "\n" not in message
    assert "bert.encoder.layer.0.intermediate.dense.weight (64, 32) (model needs (48, 32))" in message
    assert "bert.encoder.layer.1.output.dense.weight (32, 64) (model needs (32, 48))" in message


def test_missing_safetensors_says_how_to_convert(tmp_path):
    directory = _copy_fixture(BERT, tmp_path)
    (directory / "model.safetensors").unlink()
    (directory / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"no model\.safetensors .*found pytorch_model\.bin.*safe_serialization=True"):
        pretrained.load_huggingface(directory)
    with pytest.raises(ValueError, match="no config.json"):
        pretrained.load_huggingface(tmp_path / "nowhere")


@pytest.mark.parametrize("edits, match", [
    ({"model_type": "gpt2"}, "model_type is 'gpt2'; expected one of"),
    ({"position_embedding_type": "relative_key"}, "position_embedding_type is 'relative_key'; only 'absolute'"),
    ({"model_type": "roformer", "rotary_value": True}, "rotary_value is true"),
    ({"hidden_act": "mish"}, "hidden_act is 'mish'; expected one of"),
])
def test_unsupported_configs_are_refused(edits, match):
    config = json.loads((BERT / "config.json").read_text())
    with pytest.raises(ValueError, match=match):
        pretrained.transformer_config_from_huggingface({**config, **edits})


def test_config_translation_reads_every_field():
    """Each HF field lands in its TransformerConfig field; missing fields take the HF class defaults."""
    cfg = pretrained.transformer_config_from_huggingface(json.loads((ROFORMER / "config.json").read_text()))
    expected = TransformerConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                                 embedding_size=16, type_vocab_size=2, max_positions=64, position="rope",
                                 layer_norm_eps=1e-12, hidden_act="gelu", dropout_rate=0.1,
                                 attention_dropout_rate=0.1, use_pooler=False, initializer_range=0.2)
    assert cfg == expected
    defaults = pretrained.transformer_config_from_huggingface({"model_type": "bert"})
    assert (defaults.hidden_size, defaults.num_layers, defaults.max_positions) == (768, 12, 512)
    assert defaults.use_pooler and defaults.hidden_act == "gelu" and defaults.tie_embeddings
