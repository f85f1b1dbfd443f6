"""Conditional LayerNorm (post 7124) and task 'conditional_lm': CLN is exactly the unconditional model at
initialisation and the closed form after, the loss is the text tokens' cross-entropy, the three conditions
train on 8 devices, and a cached sample follows the full forward pass."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import review_lm
from models import gau, layers, masks
from models import transformer as transformer_lib
from models.gated_unit import GAUConfig
from tests.train_lib.text.test_task import QUICK_OVERRIDES
from train_lib import config_lib, registry, state as state_lib, trainer

CFG = transformer_lib.TransformerConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=2,
                                        intermediate_size=64, dropout_rate=0.0, attention_dropout_rate=0.0)


def quick(arg="quick", **overrides):
    config = config_lib.apply_overrides(review_lm.get_config(arg), {**QUICK_OVERRIDES, "eval_batches": 1,
                                                                   **overrides})
    config.lock()
    return config


def test_cln_at_initialisation_is_exactly_the_unconditional_model():
    tokens = jax.random.randint(jax.random.PRNGKey(0), (3, 9), 0, CFG.vocab_size)
    plain = transformer_lib.TransformerEncoder(CFG)
    conditional = transformer_lib.TransformerEncoder(dataclasses.replace(CFG, condition_size=5))
    condition = jax.random.normal(jax.random.PRNGKey(1), (3, 5))
    params = state_lib.unbox(conditional.init(jax.random.PRNGKey(2), tokens, condition=condition)["params"])
    names = set(state_lib.path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(params))
    assert "layer_0/attention_norm_condition/scale/kernel" in names and "embeddings/norm_condition/bias/kernel" in names

    def strip(tree):  # the unconditional model's parameters: the same tree without the *_condition modules
        return {k: strip(v) if isinstance(v, dict) else v for k, v in tree.items() if not k.endswith("_condition")}
    a = conditional.apply({"params": params}, tokens, condition=condition)
    b = plain.apply({"params": strip(params)}, tokens)
    for key in ("hidden", "mlm_logits", "pooled"):
        assert np.array_equal(np.asarray(a[key]), np.asarray(b[key])), key


@pytest.mark.parametrize("norm_position,norm,scan", [("pre", "rmsnorm", False), ("post", "rmsnorm_noscale", False),
                                                     ("post", "rmsnorm_noscale", True), ("pre", "layernorm", True)])
def test_gau_cln_at_initialisation_is_exactly_the_unconditional_model(norm_position, norm, scan):
    cfg = GAUConfig(vocab_size=50, num_layers=2, embed_dim=16, key_dim=8, causal=False, type_vocab_size=2,
                    norm=norm, norm_position=norm_position, scan_layers=scan)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (3, 9), 0, cfg.vocab_size)
    conditional = gau.GAULanguageModel(dataclasses.replace(cfg, condition_size=5))
    condition = jax.random.normal(jax.random.PRNGKey(1), (3, 5))
    params = state_lib.unbox(conditional.init(jax.random.PRNGKey(2), tokens, condition=condition)["params"])
    names = set(state_lib.path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(params))
    layer = "layers" if scan else "layer_0"
    outer = "embed_norm" if norm_position == "post" else "final_norm"
    assert {f"{layer}/norm_condition/scale/kernel", f"{outer}_condition/bias/kernel"} <= names, sorted(names)

    def strip(tree):
        return {k: strip(v) if isinstance(v, dict) else v for k, v in tree.items() if not k.endswith("_condition")}
    a = conditional.apply({"params": params}, tokens, condition=condition)
    b = gau.GAULanguageModel(cfg).apply({"params": strip(params)}, tokens)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    trained = jax.tree_util.tree_map_with_path(  # trained-looking W: the condition changes the output
        lambda p, v: jax.random.normal(jax.random.PRNGKey(5), v.shape) * 0.1 if "_condition" in state_lib.path_name(p)
        else v, params)
    c = conditional.apply({"params": trained}, tokens, condition=condition)
    assert not np.allclose(np.asarray(c), np.asarray(b), atol=1e-3)
    with pytest.raises(ValueError, match=r"condition_size is 5, so condition must be \[batch, 5\], got None"):
        conditional.apply({"params": params}, tokens)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_conditional_shift_is_the_closed_form(norm):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 6)) * 3 + 1
    c = jax.random.normal(jax.random.PRNGKey(1), (2, 3))
    module = layers.ConditionalShift(epsilon=1e-6, norm=norm)
    params = state_lib.unbox(module.init(jax.random.PRNGKey(2), x, c)["params"])
    params = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(3), p.shape), params)
    got = np.asarray(module.apply({"params": params}, x, c), np.float64)
    x64, c64 = np.asarray(x, np.float64), np.asarray(c, np.float64)
    if norm == "layernorm":  # (x − μ) / σ
        x_hat = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-6)
    else:  # x / rms(x)
        x_hat = x64 / np.sqrt(np.mean(x64 ** 2, -1, keepdims=True) + 1e-6)
    w_scale = np.asarray(params["scale"]["kernel"], np.float64)
    w_bias = np.asarray(params["bias"]["kernel"], np.float64)
    expected = x_hat * (c64 @ w_scale)[:, None] + (c64 @ w_bias)[:, None]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("preset", ["cln", "prefix", "none", "cln,gau_alpha"])
def test_loss_is_the_text_tokens_cross_entropy(preset):
    task = registry.make_task(quick(f"quick,{preset}"))
    train, _, _ = task.datasets((0, task.batch_size))
    batch = {k: jnp.asarray(v) for k, v in next(iter(train)).items()}
    params = state_lib.unbox(task.init_params(jax.random.PRNGKey(0), batch))
    if preset.startswith("cln"):  # trained-looking W so that the label matters
        params = jax.tree_util.tree_map_with_path(
            lambda p, v: jax.random.normal(jax.random.PRNGKey(5), v.shape) * 0.1 if "_condition" in
            state_lib.path_name(p) else v, params)
    loss, _ = task.loss(params, batch, jax.random.PRNGKey(1), train=False)
    tokens, valid = np.asarray(batch["tokens"]), np.asarray(batch["padding_mask"]) > 0
    mask = masks.mask_from_tokens("causal", padding_mask=batch["padding_mask"] > 0)
    logits = np.asarray(task.model.logits(params["encoder"], batch["tokens"], attention_mask=mask,
                                          condition=task.condition(params, batch["label"])), np.float64)
    start = 2 if preset == "prefix" else 1
    if preset == "prefix":
        assert set(tokens[:, 1]) <= set(task.label_tokens) and tokens[0, 1] == task.label_tokens[int(batch["label"][0])]
    per_example = []
    for row in range(tokens.shape[0]):
        terms = [np.log(np.exp(logits[row, t] - logits[row, t].max()).sum()) + logits[row, t].max()
                 - logits[row, t, tokens[row, t + 1]] for t in range(start - 1, tokens.shape[1] - 1) if valid[row, t + 1]]
        per_example.append(np.mean(terms))
    np.testing.assert_allclose(float(loss), np.mean(per_example), rtol=1e-5)
    if preset.startswith("cln"):  # the label changes the prediction
        flipped = dict(batch, label=1 - batch["label"])
        assert abs(float(task.loss(params, flipped, jax.random.PRNGKey(1), train=False)[0]) - float(loss)) > 1e-4


@pytest.mark.parametrize("preset", ["cln"] + [pytest.param(p, marks=pytest.mark.slow)
                                             for p in ("prefix", "cln,gau_alpha")])
def test_trains_on_8_devices_and_samples_with_the_cache(preset, tmp_path):
    config = quick(f"quick,{preset}", **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.model": 2})
    result = trainer.train_and_evaluate(config, str(tmp_path))
    assert result["step"] == 4 and {"perplexity_negative", "perplexity_positive"} <= set(result["eval"])
    from train_lib import checkpointing

    run = checkpointing.restore_params(tmp_path, use_ema=False)
    task, params = run.task, jax.device_get(run.params)
    # Greedy through the cache (top-p → 0 keeps the argmax) equals the argmax of the full forward pass.
    texts = task.sample(params, 1, 2, rng=jax.random.PRNGKey(0), max_new_tokens=6, top_p=1e-6)
    tok = task.tokenizer
    head = [tok.cls_id] + ([task.label_tokens[1]] if task.label_tokens else [])
    ids = list(head)
    for _ in range(6):
        tokens = jnp.asarray([ids])
        mask = masks.mask_from_tokens("causal", shape=tokens.shape)
        logits = task.model.logits(params["encoder"], tokens, attention_mask=mask,
                                   condition=task.condition(params, jnp.asarray([1])))
        ids.append(int(jnp.argmax(logits[0, -1])))
        if ids[-1] == tok.sep_id:
            break
    expected = tok.decode([t for t in ids[len(head):] if t != tok.sep_id])
    assert texts == [expected, expected]


def test_bad_condition_is_one_line():
    from train_lib.config_lib import ConfigError

    config = config_lib.apply_overrides(review_lm.get_config("quick"), {"conditional.condition": "label"})
    with pytest.raises(ConfigError, match=r"'conditional.condition' is 'label'; expected one of \['cln', 'prefix', "
                                          r"'none'\]"):
        trainer.setup(config, num_devices=8, num_processes=1)
