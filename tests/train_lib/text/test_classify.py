"""Task 'classify' and the fine-tuning methods: frozen parameters stay bitwise fixed and hold no optimizer state,
P-tuning moves only the prompt rows, LST sends no gradient into the backbone and needs less memory, PET's
zero-shot scores are the MLM's own, every method trains on 8 devices, and bad input is one line each."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import sentiment
from tests.train_lib.text.test_task import QUICK_OVERRIDES
from train_lib import config_lib, optim, registry, state as state_lib, trainer
from train_lib.config_lib import ConfigError
from train_lib.state import path_name

OVERRIDES = {**QUICK_OVERRIDES, "classify.train_examples": 32, "eval_batches": 1}


def quick(arg="quick", **overrides):
    config = config_lib.apply_overrides(sentiment.get_config(arg), {**OVERRIDES, **overrides})
    config.lock()
    return config


def batches(task, count=1):
    train, _, _ = task.datasets((0, task.batch_size))
    it = iter(train)
    return [{k: jnp.asarray(v) for k, v in next(it).items()} for _ in range(count)]


def flat(tree):
    return {path_name(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def train_steps(config, steps=3):
    """(task, initial params, final state) after `steps` of the trainer's own jitted step on 8 devices."""
    task, plan = trainer.plan_for(config)
    zeros = {k: jnp.zeros(v.shape, v.dtype) for k, v in plan.spec_batch.items()}
    state = jax.jit(plan.init_fn, out_shardings=plan.state_shardings)(plan.rng, zeros)
    initial = flat(jax.device_get(state.params))
    step = plan.jit_train_step(task)
    for batch in batches(task, steps):
        state, metrics = step(state, {k: jax.device_put(v, plan.batch_shardings[k]) for k, v in batch.items()})
        assert float(metrics["nonfinite"]) == 0
    return task, plan, initial, state


TRAINS = {  # which parameters each method's optimizer.trainable must select
    "ptuning": lambda name: name.startswith("encoder/embeddings/prompt/"),
    "adapters": lambda name: "adapter/" in name or "norm/" in name or name.startswith(("encoder/pooler/",
                                                                                        "classifier/")),
    "lst": lambda name: name.startswith(("side/", "classifier/")),
}


@pytest.mark.parametrize("preset", list(TRAINS))
def test_frozen_parameters_do_not_change_and_hold_no_optimizer_state(preset):
    config = quick(f"quick,{preset}", **{"optimizer.warmup_steps": 0})
    task, plan, initial, state = train_steps(config)
    final = flat(jax.device_get(state.params))
    mask = flat(optim.trainable_mask(jax.device_get(state.params), config.optimizer.trainable))
    assert mask == {name: TRAINS[preset](name) for name in final}
    for name, value in final.items():
        if not mask[name]:
            assert value.tobytes() == initial[name].tobytes(), f"{name} changed although frozen"
    assert [name for name in final if mask[name] and not np.array_equal(final[name], initial[name])], "nothing trained"
    trainable_size = sum(v.size for n, v in final.items() if mask[n])
    state_size = sum(np.size(leaf) for leaf in jax.tree.leaves(state.opt_state))
    assert 2 * trainable_size <= state_size <= 2 * trainable_size + 64  # Adam's μ, ν of the trainable ones only


def test_ptuning_updates_only_the_prompt_rows_of_the_embedding():
    from models import transformer as transformer_lib

    config = quick("quick,ptuning", **{"optimizer.warmup_steps": 0})
    task, _, initial, state = train_steps(config)
    cfg = task.model.config
    params = jax.device_get(state.params)
    before = jax.tree.unflatten(jax.tree.structure(params), [initial[path_name(p)] for p, _ in
                                                             jax.tree_util.tree_leaves_with_path(params)])
    tokens = jnp.arange(cfg.vocab_size)[None]
    layer = transformer_lib.Embeddings(cfg)

    def embedded(p):  # the encoder's input embedding of every id of the vocabulary
        variables = {"params": p["encoder"]["embeddings"]}
        return np.asarray(layer.apply(variables, tokens, jnp.zeros_like(tokens), np.zeros((1, cfg.vocab_size), int)))

    rows = np.flatnonzero(np.any(embedded(before)[0] != embedded(params)[0], axis=1))
    assert rows.tolist() == list(range(cfg.prompt_start_id, cfg.prompt_start_id + cfg.num_prompts))
    assert rows.size == task.pieces.count("{p}") == 8


def test_lst_sends_no_gradient_into_the_backbone_and_needs_less_memory():
    from train_lib import benchmark

    config = quick("quick,lst", **{"optimizer.trainable": (".*",)})  # every parameter differentiated: stop_gradient
    task = registry.make_task(config)
    batch = batches(task)[0]
    params = state_lib.unbox(task.init_params(jax.random.PRNGKey(0), batch))
    grads = jax.grad(lambda p: task.loss(p, batch, jax.random.PRNGKey(1), train=True)[0])(params)
    assert all(not np.any(g) for g in jax.tree.leaves(grads["encoder"]))
    assert any(np.any(g) for g in jax.tree.leaves(grads["side"]))

    # Compiled memory of the train step against full fine-tuning, at the small size (nothing is run).
    sizes = {"init_from": "", "classify.train_examples": 0, "batch_size": 32}
    lst = benchmark.compile_train_step(config_lib.apply_overrides(sentiment.get_config("small,lst"), sizes),
                                        name="lst")
    full = benchmark.compile_train_step(config_lib.apply_overrides(sentiment.get_config("small"), sizes),
                                         name="finetune")
    assert lst["peak_memory_bytes"] < 0.6 * full["peak_memory_bytes"], (lst["peak_memory_bytes"],
                                                                        full["peak_memory_bytes"])


def test_pet_zero_shot_scores_are_the_mlm_label_word_logits():
    config = quick("quick,pet")
    task = registry.make_task(config)
    batch = batches(task)[0]
    params = task.initial_params()
    class_logits, _ = task.logits(params, batch)
    tok = task.tokenizer
    vocab = np.asarray(task.model.logits(params["encoder"], batch["tokens"],
                                         padding_mask=batch["padding_mask"] > 0))  # the MLM at every position
    tokens = np.asarray(batch["tokens"])
    for row in range(tokens.shape[0]):
        at = int(np.flatnonzero(tokens[row] == tok.mask_id)[0])
        assert tokens[row, :at + 1].tolist()[:1] == [tok.cls_id]
        expected = vocab[row, at, [tok.token_to_id("不"), tok.token_to_id("很")]]
        np.testing.assert_allclose(np.asarray(class_logits[row]), expected, rtol=1e-5, atol=1e-6)
    # Trained with the post's loss: the MLM cross-entropy over the vocabulary with the label word as target.
    loss, _ = task.loss(params, batch, jax.random.PRNGKey(0), train=False)
    ids = np.asarray(task.label_ids)[np.asarray(batch["label"])]
    at = np.asarray(batch["mask_position"])
    z = vocab[np.arange(len(ids)), at].astype(np.float64)
    nll = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1) - z[np.arange(len(ids)), ids]
    np.testing.assert_allclose(float(loss), nll.mean(), rtol=1e-5)


def test_template_encoding_puts_the_text_after_the_template():
    task = registry.make_task(quick("quick,pet"))
    tok = task.tokenizer
    example = task.encode("这本书很好")
    ids = example["tokens"][:int(example["padding_mask"].sum())].tolist()
    assert ids == [tok.cls_id, tok.mask_id, *tok.encode("满意。"), *tok.encode("这本书很好"), tok.sep_id]
    assert example["mask_position"] == 1
    long = task.encode("好" * 500)
    assert long["padding_mask"].all() and long["tokens"][-1] == tok.sep_id and long["tokens"][1] == tok.mask_id


def test_finetune_loss_is_the_class_cross_entropy_and_focal_with_gamma_0_equals_it():
    config = quick()
    task = registry.make_task(config)
    batch = batches(task)[0]
    params = state_lib.unbox(task.init_params(jax.random.PRNGKey(0), batch))
    logits, _ = task.logits(params, batch)
    z, labels = np.asarray(logits, np.float64), np.asarray(batch["label"])
    nll = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1) - z[np.arange(len(labels)), labels]
    loss, _ = task.loss(params, batch, jax.random.PRNGKey(0), train=False)
    np.testing.assert_allclose(float(loss), nll.mean(), rtol=1e-5)
    focal = registry.make_task(quick("quick,focal", **{"classify.focal_gamma": 0.0}))
    np.testing.assert_allclose(float(focal.loss(params, batch, jax.random.PRNGKey(0), train=False)[0]), nll.mean(),
                               rtol=1e-5)


def test_few_shot_and_long_tailed_samples():
    task = registry.make_task(quick(**{"classify.train_examples": 33, "classify.sample_seed": 3}))
    records = task.train_records()
    counts = {label: sum(r["label"] == label for r in records) for label in ("negative", "positive")}
    assert counts == {"negative": 17, "positive": 16}
    again = registry.make_task(quick(**{"classify.train_examples": 33, "classify.sample_seed": 3})).train_records()
    assert again == records
    skewed = registry.make_task(quick("quick,imbalanced", **{"classify.train_examples": 0}))
    counts = {label: sum(r["label"] == label for r in skewed.train_records()) for label in ("negative", "positive")}
    assert counts["negative"] == round(0.05 * counts["positive"])
    np.testing.assert_allclose(skewed.class_prior(), [counts["negative"] / sum(counts.values()),
                                                      counts["positive"] / sum(counts.values())])


# LST on 8 devices: test_lst_cached_trains_on_8_devices; the rest of the methods with `make test-slow`.
@pytest.mark.parametrize("preset", ["", "pet", "ptuning_mlp", "adapters"] + [
    pytest.param(p, marks=pytest.mark.slow) for p in ("rdrop", "lst_added", "logit_adjusted,imbalanced")])
def test_every_method_trains_on_8_devices(preset, tmp_path):
    mesh = {"mesh.data": 4, "mesh.fsdp": 2, "mesh.model": 1} if "lst" in preset else \
        {"mesh.data": 2, "mesh.fsdp": 2, "mesh.model": 2}
    config = quick(f"quick,{preset}" if preset else "quick", **mesh)
    result = trainer.train_and_evaluate(config, str(tmp_path))
    assert result["step"] == 4 and 0 <= result["eval"]["accuracy"] <= 1 and np.isfinite(result["eval"]["loss"])
    assert {"macro_f1", "recall_negative", "recall_positive"} <= set(result["eval"])


@pytest.mark.parametrize("arg, overrides, message", [
    ("quick,pet", {"classify.verbalizer": ("不好", "很")},
     r"verbalizer' word '不好' is 2 tokens .* must be a single token"),
    ("quick,pet", {"classify.template": "满意。{text}"},
     r"template' '满意。\{text\}' must hold '\{mask\}' and '\{text\}' once"),
    ("quick,ptuning", {"classify.template": "{p}" * 100 + "{mask}{text}"},
     r"has 100 prompt slots \{p\}, but the vocabulary reserves only 99 \[unused\] tokens"),
    ("quick", {"optimizer.trainable": ("encoder/layer_9/.*",)},
     r"'optimizer.trainable' pattern 'encoder/layer_9/.\*' matches no parameter"),
    ("quick", {"optimizer.trainable": ("encoder/(",)}, r"pattern 'encoder/\(' is not a regular expression"),
    ("quick", {"classify.method": "adapters"}, r"method 'adapters' needs model.adapter_size > 0"),
    ("quick", {"classify.labels": ("negative", "neutral")},
     r"'classify.labels' \['negative', 'neutral'\] lacks the corpus' labels \['positive'\]"),
    ("quick,pet", {"classify.rdrop_alpha": 1.0}, r"set classify.pet_loss='labels'"),
])
def test_bad_input_is_one_line_before_compiling(arg, overrides, message):
    config = config_lib.apply_overrides(sentiment.get_config(arg), {**OVERRIDES, **overrides})
    with pytest.raises(ConfigError, match=message) as info:
        _, task, *_ = trainer.setup(config, num_devices=8, num_processes=1)
        task.datasets((0, task.batch_size))  # the labels are checked where the records are read
    assert "\n" not in str(info.value)


def test_restricted_gradient_equals_the_full_one_on_the_trainable_parameters():
    config = quick("quick,adapters")
    task = registry.make_task(config)
    batch = batches(task)[0]
    params = state_lib.unbox(task.init_params(jax.random.PRNGKey(0), batch))
    loss_fn = lambda p, b, r: task.loss(p, b, r, train=False)  # noqa: E731
    (loss, _), grads = optim.restricted_value_and_grad(loss_fn, config.optimizer.trainable)(params, batch,
                                                                                             jax.random.PRNGKey(1))
    (full_loss, _), full = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, jax.random.PRNGKey(1))
    mask = flat(optim.trainable_mask(params, config.optimizer.trainable))
    assert float(loss) == float(full_loss)
    for name, g in flat(grads).items():
        if mask[name]:
            np.testing.assert_allclose(g, flat(full)[name], rtol=1e-6, atol=1e-8)
        else:
            assert not np.any(g)
    tx = optim.make_optimizer(config.optimizer, config.total_steps)
    assert isinstance(tx.init(params), optax.MultiTransformState)


def test_cli_trains_pet_and_evaluates_the_test_split(tmp_path):
    import json

    from tests.train_lib.conftest import REPO, run_cli

    workdir = tmp_path / "run"
    overrides = {**OVERRIDES, "classify.train_examples": 16}
    args = [f"--config={REPO / 'experiments' / 'sentiment.py'}:quick,pet", f"--workdir={workdir}",
            *[f"--config.{k}={v}" for k, v in overrides.items()]]
    proc = run_cli(args, devices=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli([f"--workdir={workdir}", "--split=test", f"--output={tmp_path / 'scores.json'}"],
                   module="train_lib.text.evaluate", devices=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads((tmp_path / "scores.json").read_text())
    assert row["split"] == "test" and 0 <= row["accuracy"] <= 1 and 0 <= row["macro_f1"] <= 1


def test_causal_ptuning_reads_the_label_word_as_the_next_token():
    from models import masks

    task = registry.make_task(quick("quick,ptuning_causal"))
    batch = batches(task)[0]
    params = state_lib.unbox(task.init_params(jax.random.PRNGKey(0), batch))
    tokens = np.asarray(batch["tokens"])
    at = np.asarray(batch["mask_position"])
    assert all(tokens[r, at[r] + 1] == task.tokenizer.sep_id for r in range(len(at)))  # [MASK] comes last
    class_logits, _ = task.logits(params, batch)
    mask = masks.mask_from_tokens("causal", padding_mask=batch["padding_mask"] > 0)
    lm = np.asarray(task.model.logits(params["encoder"], batch["tokens"], attention_mask=mask))
    expected = lm[np.arange(len(at)), at - 1][:, list(task.label_ids)]
    np.testing.assert_allclose(np.asarray(class_logits), expected, rtol=1e-5, atol=1e-6)
    # The causal mask: what follows the position before [MASK] ([MASK] itself, [SEP], padding) changes nothing.
    changed = dict(batch, tokens=jnp.where(jnp.arange(tokens.shape[1])[None] >= jnp.asarray(at)[:, None], 7,
                                           batch["tokens"]))
    np.testing.assert_allclose(np.asarray(task.logits(params, changed)[0]), np.asarray(class_logits), rtol=1e-6)


def test_pet_unlabelled_mlm_masks_only_the_text_and_adds_its_loss():
    config = quick("quick,pet_mlm", **{"classify.mlm_weight": 0.5})
    task = registry.make_task(config)
    tok = task.tokenizer
    batch = batches(task)[0]
    labelled = {r["text"] for r in task.train_records()}
    # The unlabelled texts are the train split's others, in the same template.
    for row in np.asarray(batch["unlabelled_tokens"]):
        length = int(np.sum(row != tok.pad_id))
        assert row[0] == tok.cls_id and row[1] == tok.mask_id and row[length - 1] == tok.sep_id
    text_mask = np.asarray(batch["unlabelled_text_mask"]) > 0
    pool = {tuple(task.encode(t)["tokens"]) for t in labelled}
    assert not any(tuple(row) in pool for row in np.asarray(batch["unlabelled_tokens"]))
    # Masking: text tokens only, at the rate, 80/10/10, every masked token predicted (over many draws).
    tokens = jnp.tile(batch["unlabelled_tokens"], (64, 1))
    tm = jnp.tile(batch["unlabelled_text_mask"], (64, 1))
    inputs, positions, valid = jax.device_get(task.mask_unlabelled(tokens, tm, jax.random.PRNGKey(3)))
    tokens, tm = np.asarray(tokens), np.asarray(tm) > 0
    changed = inputs != tokens
    assert not np.any(changed & ~tm)
    predicted = np.zeros_like(tm)
    np.put_along_axis(predicted, positions, valid, axis=1)
    assert np.all(predicted <= tm) and np.all(changed <= predicted)
    rate = predicted.sum() / tm.sum()
    assert abs(rate - 0.15) < 0.02, rate
    as_mask = (inputs == tok.mask_id) & predicted
    assert abs(as_mask.sum() / predicted.sum() - 0.8) < 0.04
    # The loss: PET's own plus the weight × the MLM cross-entropy of the masked tokens (NumPy, full logits).
    params = state_lib.unbox(task.init_params(jax.random.PRNGKey(0), batch))
    rng = jax.random.PRNGKey(1)
    total, metrics = task.loss(params, batch, rng, train=False)
    plain = registry.make_task(quick("quick,pet"))
    pet_loss, _ = plain.loss(params, {k: v for k, v in batch.items() if not k.startswith("unlabelled")}, rng,
                             train=False)
    mask_rng = jax.random.split(jax.random.split(rng, 3)[2])[0]
    inputs, positions, valid = jax.device_get(task.mask_unlabelled(batch["unlabelled_tokens"],
                                                                   batch["unlabelled_text_mask"], mask_rng))
    logits = np.asarray(task.model.logits(params["encoder"], jnp.asarray(inputs),
                                          padding_mask=batch["unlabelled_tokens"] != tok.pad_id), np.float64)
    nll = []
    for r, c in zip(*np.nonzero(valid)):
        z = logits[r, positions[r, c]]
        nll.append(np.log(np.exp(z - z.max()).sum()) + z.max() - z[np.asarray(batch["unlabelled_tokens"])[
            r, positions[r, c]]])
    np.testing.assert_allclose(float(metrics["unlabelled_mlm_loss"]), np.mean(nll), rtol=1e-5)
    np.testing.assert_allclose(float(total), float(pet_loss) + 0.5 * np.mean(nll), rtol=1e-5)


@pytest.fixture(scope="module")
def pretrained_mlm(tmp_path_factory):
    """A char_mlm.py:quick workdir (4 steps): the backbone LST's cached features come from."""
    from experiments import char_mlm
    from tests.train_lib.text.test_task import quick as quick_text

    workdir = tmp_path_factory.mktemp("char_mlm")
    trainer.train_and_evaluate(quick_text(char_mlm), str(workdir))
    return str(workdir)


def test_lst_cached_features_give_the_uncached_loss_and_gradients(pretrained_mlm):
    cached = registry.make_task(quick("quick,lst_cached", init_from=pretrained_mlm))
    plain = registry.make_task(quick("quick,lst", init_from=pretrained_mlm))
    batch = batches(cached)[0]
    assert batch["features"].shape == (8, 1 + cached.model.config.num_layers, cached.seq_len,
                                       cached.model.config.hidden_size)
    params = cached.initial_params()
    without = {k: v for k, v in batch.items() if k != "features"}
    rng = jax.random.PRNGKey(2)
    (loss, _), grads = jax.value_and_grad(lambda p: cached.loss(p, batch, rng, train=True), has_aux=True)(params)
    (ref, _), ref_grads = jax.value_and_grad(lambda p: plain.loss(p, without, rng, train=True), has_aux=True)(params)
    np.testing.assert_allclose(float(loss), float(ref), rtol=1e-6)
    for name, g in flat(ref_grads["side"]).items():
        np.testing.assert_allclose(flat(grads["side"])[name], g, rtol=1e-5, atol=1e-7, err_msg=name)
    # The features are the pretrained backbone's, so the uncached model on the trained params agrees too.
    np.testing.assert_allclose(np.asarray(cached.logits(params, batch)[0]), np.asarray(plain.logits(params, without)[0]),
                               rtol=1e-5, atol=1e-6)


def test_lst_cached_trains_on_8_devices(pretrained_mlm, tmp_path):
    config = quick("quick,lst_cached", init_from=pretrained_mlm, **{"mesh.data": 4, "mesh.fsdp": 2, "mesh.model": 1})
    result = trainer.train_and_evaluate(config, str(tmp_path))
    assert result["step"] == 4 and np.isfinite(result["eval"]["loss"])
    from train_lib import checkpointing

    run = checkpointing.restore_params(tmp_path, use_ema=False)  # the test split without a cache: the backbone runs
    assert 0 <= run.task.split_metrics(run.params, "test")["accuracy"] <= 1


@pytest.mark.parametrize("arg, overrides, message", [
    ("quick,lst_cached", {}, r"'classify.lst_cache_features' caches the pretrained backbone's outputs; set init_from"),
    ("quick", {"classify.lst_cache_features": True}, r"'classify.lst_cache_features' .* needs classify.method 'lst', "
                                                      r"not 'finetune'"),
    ("quick", {"classify.mlm_weight": 1.0}, r"'classify.mlm_weight' .* needs classify.method 'pet' without causal"),
    ("quick,pet_mlm", {"classify.mlm_rate": 1.5}, r"'classify.mlm_rate' in \(0, 1\), got 1.0, 1.5"),
])
def test_bad_cache_and_mlm_settings_are_one_line(arg, overrides, message):
    config = config_lib.apply_overrides(sentiment.get_config(arg), {**OVERRIDES, **overrides})
    with pytest.raises(ConfigError, match=message) as info:
        trainer.setup(config, num_devices=8, num_processes=1)
    assert "\n" not in str(info.value)


def test_lst_cache_with_a_trainable_backbone_is_refused(pretrained_mlm):
    config = config_lib.apply_overrides(sentiment.get_config("quick,lst_cached"), {
        **OVERRIDES, "init_from": pretrained_mlm, "optimizer.trainable": ("side/.*", "encoder/layer_1/.*")})
    with pytest.raises(ConfigError, match=r"needs a frozen backbone, but optimizer.trainable selects encoder "
                                          r"parameters \(e.g. encoder/layer_1/"):
        trainer.setup(config, num_devices=8, num_processes=1)
