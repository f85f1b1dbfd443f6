"""The gated-attention variants through the trainer (8 fake CPU devices), the masked-LM task, and the
length-evaluation tool against the trainer's own evaluation."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.train_lib.conftest import cli_overrides, make_config, read_metrics, run_cli
from train_lib import checkpointing, registry, trainer
from train_lib.config_lib import ConfigError
from train_lib.lm import data as data_lib
from train_lib.lm import evaluate

_FLASH = dict(model__attention="flash", model__chunk_size=8, model__normalizer="relu2_paper", model__norm="scalenorm")
_MLM = dict(task="mlm", model__causal=False, model__vocab_size=257)


def _losses(workdir):
    return [row["loss"] for row in read_metrics(workdir)]


def test_mlm_masks_fifteen_percent_and_scores_only_masked_bytes():
    task = registry.make_task(make_config(**_MLM))
    tokens = jax.random.randint(jax.random.PRNGKey(0), (4, 40), 0, 256)
    inputs, masked = task.mask_tokens(tokens, jax.random.PRNGKey(1))
    assert np.all(np.asarray(masked).sum(-1) == 6)  # round(0.15 · 40)
    np.testing.assert_array_equal(np.asarray(inputs)[np.asarray(masked)], 256)
    np.testing.assert_array_equal(np.asarray(inputs)[~np.asarray(masked)], np.asarray(tokens)[~np.asarray(masked)])
    params = jax.jit(task.init_params)(jax.random.PRNGKey(2), {"tokens": jnp.zeros((1, 33), jnp.int32)})
    params = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, params,
                          is_leaf=lambda x: hasattr(x, "value"))
    batch = {"tokens": jax.random.randint(jax.random.PRNGKey(3), (2, 33), 0, 256)}
    sums = jax.jit(task.eval_sums)(params, batch)
    inputs, masked = task.mask_tokens(batch["tokens"][:, :-1], task.eval_mask_key(batch["tokens"][:, :-1]))
    logits = jax.jit(task.model.apply)({"params": params}, inputs)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["tokens"][:, :-1])
    assert float(sums["count"]) == 2 * 5  # round(0.15 · 32) per row
    np.testing.assert_allclose(float(sums["nll"]), float(jnp.sum(jnp.where(masked, nll, 0))), rtol=1e-5)
    assert float(jnp.sum(jnp.where(masked, 0, nll))) > 0  # unmasked bytes have a loss that was left out


def test_mlm_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.causal=False"):
        registry.make_task(make_config(task="mlm", model__vocab_size=257))
    with pytest.raises(ConfigError, match="model.vocab_size"):
        registry.make_task(make_config(task="mlm", model__causal=False))
    with pytest.raises(ConfigError, match="residual_scores"):
        registry.make_task(make_config(model__attention="flash", model__residual_scores=True))
    with pytest.raises(ConfigError, match="max_positions"):
        registry.make_task(make_config(model__position="learned", model__max_positions=16))
    for bad in (dict(model__residual_scores=True), dict(model__attention="performer")):
        with pytest.raises(ConfigError, match="model.scan_layers"):
            registry.make_task(make_config(model__scan_layers=True, **bad))


def test_generate_refuses_more_positions_than_the_model_covers_and_a_top_k_past_the_vocabulary():
    from train_lib.lm.generate import check_request
    task = registry.make_task(make_config(model__position="learned", model__max_positions=64))
    check_request(task, prompt_length=4, max_new_tokens=60, top_k=256)
    with pytest.raises(ConfigError, match=r"need 65 positions, but model.position='learned' covers 64; ask for at most "
                                          r"60 new bytes"):
        check_request(task, prompt_length=4, max_new_tokens=61, top_k=40)
    with pytest.raises(ConfigError, match="--top_k 257 exceeds the model's vocabulary of 256"):
        check_request(task, prompt_length=4, max_new_tokens=8, top_k=257)


def test_scanned_layers_train_sharded_over_fsdp_and_model(tmp_path):
    """`model.scan_layers` through the trainer on a (data 2, fsdp 2, model 2) mesh: the stacked layer axis
    stays whole, the other axes follow the usual rules, and the loss goes down."""
    config = make_config(total_steps=10, eval_every_steps=10, mesh__data=2, mesh__fsdp=2, mesh__model=2,
                         optimizer__learning_rate=3e-3, model__scan_layers=True)
    trainer.train_and_evaluate(config, str(tmp_path))
    losses = _losses(tmp_path)
    assert len(losses) == 10 and np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3
    _, plan = trainer.plan_for(config)
    kernel = plan.abstract_state.params["layers"]["uv"]["kernel"]  # [layers, embed, 2, expand]
    assert kernel.shape[0] == config.model.num_layers and "layer_0" not in plan.abstract_state.params
    assert tuple(plan.state_shardings.params["layers"]["uv"]["kernel"].spec) == (None, "fsdp", None, "model")
    moments = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(plan.state_shardings.opt_state)
               if "['layers']['uv']['kernel']" in jax.tree_util.keystr(path)]
    assert len(moments) == 2 and all(tuple(m.spec) == (None, "fsdp", None, "model") for m in moments)  # Adam μ, ν


def test_length_evaluation_at_training_length_equals_trainer_evaluation():
    """At the training length, with as many bytes as the trainer's eval batches, the length tool sees the
    same windows as `trainer.evaluate` and must give the same numbers; other lengths just run."""
    from tests.models.gau_fixtures import sharpen
    config = make_config(batch_size=4, eval_batches=2, **_FLASH)
    task = registry.make_task(config)
    params = sharpen(jax.tree.map(lambda x: x.value if hasattr(x, "value") else x,
                                  jax.jit(task.init_params)(jax.random.PRNGKey(0), task.batch_spec(1)),
                                  is_leaf=lambda x: hasattr(x, "value")))
    _, eval_data, text = data_lib.language_model_datasets("", seq_len=config.data.seq_len, batch_size=config.batch_size,
                                                          eval_batches=config.eval_batches, seed=config.seed,
                                                          rows=(0, config.batch_size))
    want = trainer.evaluate(jax.jit(lambda p, b, _state: task.eval_sums(p, b)), params, eval_data,
                            lambda batch: {k: jnp.asarray(v) for k, v in batch.items()}, task)
    rows = evaluate.evaluate_lengths(task, params, [32, 16], stream=text.validation, max_tokens=2 * 4 * 32,
                                     batch_tokens=4 * 32)
    assert [r["length"] for r in rows] == [32, 16] and rows[0]["tokens"] == 2 * 4 * 32
    np.testing.assert_allclose(rows[0]["bits_per_byte"], want["bits_per_byte"], rtol=1e-6)
    np.testing.assert_allclose(rows[0]["accuracy"], want["accuracy"], rtol=1e-6)
    assert 0 < rows[1]["bits_per_byte"] < 9 and rows[0]["bits_per_byte"] != rows[1]["bits_per_byte"]


@pytest.mark.slow
def test_flash_trains_tensor_parallel_and_evaluates_at_other_lengths(tmp_path):
    """FLASH on a (data 4, model 2) mesh learns; the length tool at the training length reproduces the
    trainer's final evaluation exactly (same windows, same parameters), and also runs at other lengths."""
    config = make_config(total_steps=12, eval_every_steps=12, ema_decay=0.0, mesh__data=4, mesh__model=2,
                         optimizer__learning_rate=3e-3, **_FLASH)
    result = trainer.train_and_evaluate(config, str(tmp_path))
    losses = _losses(tmp_path)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3
    run = checkpointing.restore_params(tmp_path, use_ema=False)
    task, params, step = run.task, run.params, run.step
    stream = data_lib.load_text("").validation
    rows = evaluate.evaluate_lengths(task, params, [32, 16, 64], stream=stream,
                                     max_tokens=config.eval_batches * config.batch_size * 32, batch_tokens=8 * 32)
    assert step == 12 and [r["length"] for r in rows] == [32, 16, 64]
    np.testing.assert_allclose(rows[0]["bits_per_byte"], result["eval"]["bits_per_byte"], rtol=1e-5)
    np.testing.assert_allclose(rows[0]["accuracy"], result["eval"]["accuracy"], rtol=1e-5)
    assert all(np.isfinite(r["bits_per_byte"]) for r in rows)


def test_attention_maps_are_captured_and_plotted(tmp_path):
    import matplotlib.image
    from tests.models.gau_fixtures import tiny_model
    tokens = jnp.arange(12)[None] * 5
    for kind in ("gau", "flash"):
        model, params = tiny_model(attention=kind, chunk_size=4)
        maps = evaluate.capture_attention(model, params, tokens)
        assert list(maps) == ["layer_0", "layer_1"] and maps["layer_0"].shape == (12, 12)
        upper = np.triu(np.ones((12, 12), bool), 1)
        assert np.all(maps["layer_0"][upper] == 0)  # causal
        if kind == "gau":  # softmax rows sum to one over the visible keys
            np.testing.assert_allclose(maps["layer_1"].sum(-1), 1.0, rtol=1e-5)
        else:  # local attention only: nothing outside the 4×4 chunk blocks
            assert np.all(maps["layer_0"][4:, :4] == 0) and maps["layer_0"][5, 4] != 0
    path = evaluate.plot_attention_maps(maps, tmp_path / "maps.png", title="test")
    image = matplotlib.image.imread(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.shape[1] > image.shape[0] > 100
    assert image[..., :3].std() > 0.05  # not a blank canvas


@pytest.mark.slow
@pytest.mark.parametrize("preset, extra", [
    ("tiny", ["--config.model.attention=flash", "--config.model.chunk_size=8", "--config.mesh.model=2"]),
    ("tiny,gau_alpha", []),
    ("tiny,performer", ["--config.model.chunk_size=8"]),
    ("tiny", ["--config.model.residual_scores=True", "--config.model.position=learned_hierarchical",
              "--config.model.max_positions=8"]),
])
def test_variants_train_from_the_cli_on_8_devices(tmp_path, preset, extra):
    overrides = {"total_steps": 20, "optimizer__learning_rate": 3e-3, "eval_every_steps": 20}
    if "gau_alpha" in preset:
        overrides["model__vocab_size"] = 257
    out = run_cli([f"--config=experiments/gau_lm.py:{preset}", f"--workdir={tmp_path}", *cli_overrides(**overrides),
                   *extra])
    assert out.returncode == 0, out.stderr[-3000:]
    losses = _losses(tmp_path)
    assert len(losses) == 20 and np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3


@pytest.mark.slow
def test_evaluate_cli_prints_table_and_png(tmp_path):
    trainer.train_and_evaluate(make_config(total_steps=3), str(tmp_path))
    out = run_cli(["--workdir", str(tmp_path), "--lengths", "16,32", "--max_tokens", "512",
                   "--output", str(tmp_path / "r.json"), "--attention_png", str(tmp_path / "a.png")],
                  module="train_lib.lm.evaluate", devices=1)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| 16 |" in out.stdout and "| 32 |" in out.stdout and (tmp_path / "a.png").stat().st_size > 1000
    bad = run_cli(["--workdir", str(tmp_path), "--lengths", "16,x"], module="train_lib.lm.evaluate", devices=1)
    assert bad.returncode == 2 and "--lengths" in bad.stderr
