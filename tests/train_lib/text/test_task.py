"""The text family's tasks: the losses against NumPy, `init_from` (a workdir, a Hugging Face directory), the
tokenizer kept in the workdir, the CLIs end to end, and bad input as one line each."""
import json
import pathlib
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import char_mlm, title_generation
from models import masks, pretrained
from tests.train_lib.conftest import REPO, run_cli
from train_lib import checkpointing, config_lib, registry, state as state_lib, trainer
from train_lib.config_lib import ConfigError

HF_BERT = REPO / "tests" / "fixtures" / "hf_bert_tiny"
QUICK_OVERRIDES = {"total_steps": 4, "log_every_steps": 2, "eval_every_steps": 4, "checkpoint_every_steps": 4,
                   "eval_batches": 1, "final_examples": 0}


def quick(module, arg="quick", **overrides):
    config = config_lib.apply_overrides(module.get_config(arg), {**QUICK_OVERRIDES, **overrides})
    config.lock()
    return config


def one_batch(task, size=4):
    train, _, _ = task.datasets((0, task.batch_size))
    batch = next(iter(train))
    return {k: jnp.asarray(v[:size]) for k, v in batch.items()}


def test_seq2seq_loss_is_the_mean_target_cross_entropy():
    task = registry.make_task(quick(title_generation))
    batch = one_batch(task)
    params = nn.unbox(task.init_params(jax.random.PRNGKey(0), batch))
    loss, _ = task.loss(params, batch, jax.random.PRNGKey(1), train=False)

    tokens, segments, valid = (np.asarray(batch[k]) for k in ("tokens", "segment_ids", "padding_mask"))
    mask = masks.mask_from_tokens("unilm", segment_ids=batch["segment_ids"], padding_mask=batch["padding_mask"] > 0)
    logits = np.asarray(task.model.logits(params["encoder"], batch["tokens"], segment_ids=batch["segment_ids"],
                                          attention_mask=mask), np.float64)
    per_example = []
    for row in range(tokens.shape[0]):
        # token t + 1 is predicted at position t; only target tokens (segment 1, not padding) count
        terms = []
        for t in range(tokens.shape[1] - 1):
            if segments[row, t + 1] == 1 and valid[row, t + 1]:
                z = logits[row, t]
                terms.append(np.log(np.sum(np.exp(z - z.max()))) + z.max() - z[tokens[row, t + 1]])
        assert terms, "every example has a target"
        per_example.append(np.mean(terms))
    np.testing.assert_allclose(float(loss), np.mean(per_example), rtol=1e-5)


def test_seq2seq_loss_ignores_padding_values():
    task = registry.make_task(quick(title_generation))
    batch = one_batch(task)
    params = nn.unbox(task.init_params(jax.random.PRNGKey(0), batch))
    noisy = dict(batch, tokens=jnp.where(batch["padding_mask"] > 0, batch["tokens"], 7))
    assert np.any(np.asarray(batch["padding_mask"]) == 0), "the quick batch has padding"
    a, _ = task.loss(params, batch, jax.random.PRNGKey(1), train=False)
    b, _ = task.loss(params, noisy, jax.random.PRNGKey(1), train=False)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)


def test_mlm_masks_exactly_the_rate_and_never_specials():
    task = registry.make_task(quick(char_mlm))
    batch = one_batch(task, size=8)
    inputs, positions, valid = task.mask_tokens(batch["tokens"], batch["word_starts"], jax.random.PRNGKey(3))
    tokens = np.asarray(batch["tokens"])
    positions, valid = np.asarray(positions), np.asarray(valid)
    assert valid.all() and positions.shape == (8, task.num_masked)
    picked = np.take_along_axis(tokens, positions, axis=1)
    tok = task.tokenizer
    assert not np.isin(picked, [tok.cls_id, tok.sep_id, tok.pad_id]).any()
    changed = np.asarray(inputs) != tokens
    # only predicted positions change; about 80% become [MASK]
    for row in range(8):
        assert set(np.flatnonzero(changed[row])) <= set(positions[row])
    assert 0.6 < np.mean(np.take_along_axis(np.asarray(inputs), positions, axis=1) == tok.mask_id) < 0.97


def test_train_mlm_then_seq2seq_from_it_restores_the_encoder(tmp_path):
    mlm_dir, s2s_dir = tmp_path / "mlm", tmp_path / "s2s"
    trainer.train_and_evaluate(quick(char_mlm), str(mlm_dir))
    assert (mlm_dir / "tokenizer").is_dir()
    mlm = checkpointing.restore_params(mlm_dir)
    # a learning rate of ~0 keeps the restored encoder: after one step it must still equal the MLM's
    config = quick(title_generation, init_from=str(mlm_dir), total_steps=1, checkpoint_every_steps=1,
                   eval_every_steps=1, **{"optimizer.learning_rate": 1e-30, "optimizer.warmup_steps": 0})
    trainer.train_and_evaluate(config, str(s2s_dir))
    s2s = checkpointing.restore_params(s2s_dir)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(mlm.params["encoder"]),
                            jax.tree.leaves(s2s.params["encoder"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, err_msg=jax.tree_util.keystr(path))
    assert s2s.task.tokenizer.fingerprint == mlm.task.tokenizer.fingerprint


def _hf_vocab(directory: pathlib.Path, size: int) -> None:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens = specials + [chr(0x4E00 + i) for i in range(size - len(specials))]
    (directory / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")


def _bert_fixture_config(init_from):
    hf = json.loads((HF_BERT / "config.json").read_text())
    config = title_generation.get_config("quick")
    config.init_from = str(init_from)
    model = config.model
    model.position, model.hidden_size, model.num_layers = "learned", hf["hidden_size"], hf["num_hidden_layers"]
    model.num_heads, model.intermediate_size = hf["num_attention_heads"], hf["intermediate_size"]
    model.max_positions, model.layer_norm_eps = hf["max_position_embeddings"], hf["layer_norm_eps"]
    model.type_vocab_size = hf["type_vocab_size"]
    config.data.seq_len = min(32, hf["max_position_embeddings"])
    return config, hf


def test_init_from_a_huggingface_directory_restores_the_encoder(tmp_path):
    directory = tmp_path / "bert"
    shutil.copytree(HF_BERT, directory)
    hf_config = json.loads((directory / "config.json").read_text())
    _hf_vocab(directory, hf_config["vocab_size"])
    config, _ = _bert_fixture_config(directory)
    task = registry.make_task(config)
    assert task.tokenizer.vocab_size == hf_config["vocab_size"]
    arrays = task.pretrained_params()
    _, reference = pretrained.load_huggingface(str(directory))
    flat = {state_lib.path_name(p): v for p, v in jax.tree_util.tree_leaves_with_path(reference)}
    assert "encoder/embeddings/word_embeddings/embedding" in arrays
    for name, value in arrays.items():
        np.testing.assert_array_equal(value, np.asarray(flat[name.removeprefix("encoder/")]))


def test_init_from_huggingface_with_another_vocabulary_is_refused(tmp_path):
    directory = tmp_path / "bert"
    shutil.copytree(HF_BERT, directory)
    hf_config = json.loads((directory / "config.json").read_text())
    _hf_vocab(directory, hf_config["vocab_size"])
    other = tmp_path / "other_vocab"
    other.mkdir()
    _hf_vocab(other, hf_config["vocab_size"] + 3)
    config, _ = _bert_fixture_config(directory)
    config.tokenizer.path = str(other / "vocab.txt")
    with pytest.raises(ConfigError, match="is not the vocabulary of init_from"):
        registry.make_task(config)


def test_init_from_huggingface_with_other_dimensions_names_them(tmp_path):
    directory = tmp_path / "bert"
    shutil.copytree(HF_BERT, directory)
    _hf_vocab(directory, json.loads((directory / "config.json").read_text())["vocab_size"])
    config, hf = _bert_fixture_config(directory)
    config.model.intermediate_size = hf["intermediate_size"] * 2
    task = registry.make_task(config)
    with pytest.raises(ConfigError, match=f"model.intermediate_size={hf['intermediate_size']}"):
        task.pretrained_params()


def test_with_pretrained_names_a_wrong_shape():
    params = {"encoder": {"w": jnp.zeros((2, 3))}}
    state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=(), ema_params=None,
                                 rng=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"encoder/w \(3, 2\) vs the model's \(2, 3\)"):
        state_lib.with_pretrained(state, {"encoder/w": np.zeros((3, 2))})
    replaced = state_lib.with_pretrained(state, {"encoder/w": np.ones((2, 3))})
    np.testing.assert_array_equal(replaced.params["encoder"]["w"], np.ones((2, 3)))


def test_a_workdir_whose_tokenizer_differs_is_refused(tmp_path):
    task = registry.make_task(quick(title_generation))
    task.write_assets(tmp_path)
    other = registry.make_task(quick(title_generation, **{"tokenizer.num_unused": 98}))
    with pytest.raises(ConfigError, match="is not the tokenizer this config builds"):
        other.read_assets(tmp_path)


@pytest.mark.parametrize("overrides, message", [
    ({"tokenizer.path": "/nonexistent/vocab.txt"}, "'tokenizer.path' '/nonexistent/vocab.txt' does not exist"),
    ({"init_from": "/nonexistent"}, "'init_from' '/nonexistent' is not a directory"),
    ({"model.architecture": "lstm"}, "'model.architecture' is 'lstm'"),
    ({"data.corpus": "pretraining"}, "task 'seq2seq' needs a corpus of (source, target) pairs"),
    ({"data.max_target_len": 40}, "'data.max_target_len' must be in"),
])
def test_bad_config_is_one_line(overrides, message):
    with pytest.raises(ConfigError) as error:
        registry.make_task(quick(title_generation, **overrides))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_unknown_tokenizer_file_is_one_line(tmp_path):
    bad = tmp_path / "weights.bin"
    bad.write_bytes(b"\0" * 10)
    with pytest.raises(ConfigError) as error:
        registry.make_task(quick(title_generation, **{"tokenizer.path": str(bad)}))
    assert str(bad) in str(error.value) and "\n" not in str(error.value)


def test_jsonl_line_missing_its_field_is_one_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"question": "a", "answer": "b"}\n{"question": "c"}\n', encoding="utf-8")
    config = quick(title_generation, **{"data.corpus": "jsonl", "data.path": str(path),
                                        "data.source_field": "question", "data.target_field": "answer"})
    task = registry.make_task(config)
    with pytest.raises(ConfigError) as error:
        task.datasets((0, task.batch_size))
    assert "pairs.jsonl" in str(error.value) and ":2" in str(error.value) and "answer" in str(error.value)


def test_seq2seq_cli_trains_decodes_and_evaluates(tmp_path):
    workdir = tmp_path / "run"
    args = [f"--config={REPO / 'experiments' / 'title_generation.py'}:quick", f"--workdir={workdir}",
            *[f"--config.{k}={v}" for k, v in QUICK_OVERRIDES.items()]]
    proc = run_cli(args, devices=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli([f"--workdir={workdir}", "--beam_size=2", "--input=清晨的风"], module="train_lib.generate",
                   devices=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("# checkpoint step 4") and len(proc.stdout.splitlines()) == 2
    proc = run_cli([f"--workdir={workdir}", "--beam_size=1,2", "--limit=16", "--show=0",
                    f"--output={tmp_path / 'scores.json'}"], module="train_lib.text.evaluate", devices=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "scores.json").read_text())
    assert [r["decoding"] for r in rows] == ["greedy", "beam 2"] and all(0 <= r["rouge_l"] <= 1 for r in rows)
    proc = run_cli([f"--workdir={workdir}", "--beam_size=0", "--input=x"], module="train_lib.text.generate",
                   devices=1)
    assert proc.returncode == 2 and "--beam_size must be at least 1" in proc.stderr


def _naive_greedy(task, params, source: str, steps: int) -> list[int]:
    """Greedy decoding by full forward passes over `[CLS] source [SEP] target` (no cache): the sequence is
    right-padded to its final length, and padding is hidden from every query, so one compiled forward serves."""
    tok = task.tokenizer
    ids = [tok.cls_id] + tok.encode(source) + [tok.sep_id]
    length = len(ids) + steps
    logits_fn = jax.jit(task._logits)
    out = []
    for _ in range(steps):
        real = ids + out
        tokens = jnp.asarray([real + [tok.pad_id] * (length - len(real))])
        segment_ids = jnp.asarray([[0] * len(ids) + [1] * (length - len(ids))])
        valid = jnp.asarray([[1] * len(real) + [0] * (length - len(real))])
        logits = logits_fn(params, {"tokens": tokens, "segment_ids": segment_ids, "padding_mask": valid})
        out.append(int(jnp.argmax(logits[0, len(real) - 1])))
        if out[-1] == tok.sep_id:
            break
    return out


@pytest.mark.parametrize("preset", ["", pytest.param(",gau_alpha", marks=pytest.mark.slow),
                                    pytest.param(",copy_prior", marks=pytest.mark.slow)])
def test_cached_decoding_equals_full_forward_passes(preset):
    task = registry.make_task(quick(title_generation, "quick" + preset))
    batch = one_batch(task)
    params = nn.unbox(task.init_params(jax.random.PRNGKey(0), batch))
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(1), x.shape), params)
    sources = ["清晨的风。", "比喻数量少的样子"]  # different lengths: the batch is left-padded
    decoded = task.decode(params, sources, beam_size=1, max_new_tokens=6)
    for source, text in zip(sources, decoded):
        ids = [t for t in _naive_greedy(task, params, source, 6) if t != task.tokenizer.sep_id]
        assert text == task.tokenizer.decode(ids)


def test_an_input_longer_than_the_positions_is_one_line():
    from train_lib.text import generate

    task = registry.make_task(quick(title_generation, **{"model.position": "learned", "model.max_positions": 32}))
    generate.check_inputs(task, ["清晨的风。"], 8)  # fits
    with pytest.raises(ConfigError) as error:
        generate.check_inputs(task, ["清晨的风。" * 10], 8)
    assert "exceed the model's 32" in str(error.value) and "\n" not in str(error.value)
