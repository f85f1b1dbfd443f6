"""Optimizer pieces against closed forms: schedule, weight-decay mask, warm-up-aware EMA."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.train_lib.conftest import make_config
from train_lib import optim


def test_schedule_is_linear_warmup_then_cosine_to_end_factor():
    config = make_config(total_steps=100, optimizer__learning_rate=1e-3, optimizer__warmup_steps=10)
    schedule = optim.learning_rate_schedule(config.optimizer, config.total_steps)
    end = 1e-3 * config.optimizer.end_lr_factor
    for step in (0, 5, 10):
        np.testing.assert_allclose(schedule(step), 1e-3 * step / 10, rtol=1e-6)
    for step in (10, 40, 100):
        cosine = 0.5 * (1 + math.cos(math.pi * (step - 10) / 90))
        np.testing.assert_allclose(schedule(step), end + (1e-3 - end) * cosine, rtol=1e-5)


def test_weight_decay_touches_only_kernels_and_embeddings():
    params = {"layer": {"uv": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
                        "qk_scale_offset": {"gamma": jnp.ones((2, 2))}, "norm": {"scale": jnp.ones(2)}},
              "embed": {"embedding": jnp.ones((3, 2))}}
    mask = optim.weight_decay_mask(params)
    assert mask["layer"]["uv"] == {"kernel": True, "bias": False}
    assert not mask["layer"]["qk_scale_offset"]["gamma"] and not mask["layer"]["norm"]["scale"]
    assert mask["embed"]["embedding"]
    # With zero gradients, AdamW changes only the masked leaves, by -lr·wd·p.
    config = make_config(optimizer__weight_decay=0.5, optimizer__warmup_steps=0, optimizer__grad_clip_norm=0.0)
    tx = optim.make_optimizer(config.optimizer, config.total_steps)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    lr = float(optim.learning_rate_schedule(config.optimizer, config.total_steps)(0))
    np.testing.assert_allclose(updates["embed"]["embedding"], -lr * 0.5 * np.ones((3, 2)), rtol=1e-6)
    np.testing.assert_array_equal(updates["layer"]["uv"]["bias"], 0.0)


def test_ema_decay_warms_up_then_saturates():
    for step, expected in [(0, 0.1), (10, 11 / 20), (10_000, 0.999)]:
        np.testing.assert_allclose(optim.ema_decay_at(jnp.asarray(step), 0.999), expected, rtol=1e-6)
    ema = optim.update_ema({"w": jnp.zeros(2)}, {"w": jnp.ones(2)}, jnp.asarray(0), 0.999)
    np.testing.assert_allclose(ema["w"], 0.9, rtol=1e-6)  # (1 - 0.1) of the new parameters
    assert isinstance(optax.global_norm(ema), jax.Array)


def _param_specs(plan):
    flat = jax.tree_util.tree_leaves_with_path(plan.state_shardings.params,
                                               is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
    shapes = dict(jax.tree_util.tree_leaves_with_path(plan.abstract_state.params))
    return {tuple(path): (shapes[path].shape, tuple(s.spec) + (None,) * (len(shapes[path].shape) - len(s.spec)))
            for path, s in flat}


def _expected_spec(param_shape, param_spec, shape):
    """The spec of an array derived from a parameter: the parameter's, or for a reduction that deletes one
    dimension (Adafactor's factored moments) the parameter's without that dimension; size-1 placeholders
    are replicated."""
    if tuple(shape) == tuple(param_shape):
        return param_spec
    for dim in range(len(param_shape)):
        if param_shape[:dim] + param_shape[dim + 1:] == tuple(shape):
            return param_spec[:dim] + param_spec[dim + 1:]
    assert int(np.prod(shape)) == 1, (param_shape, shape)
    return (None,) * len(shape)


@pytest.mark.parametrize("name", sorted(optim.OPTIMIZERS))
def test_each_optimizer_trains_on_a_2x2x2_mesh_with_its_state_sharded_like_its_parameters(tmp_path, name):
    from experiments import gau_lm
    from tests.train_lib.conftest import TEST_OVERRIDES, read_metrics
    from train_lib import config_lib, trainer

    lr = {"sgd": 0.3, "lion": 3e-3, "adafactor": 3e-2}.get(name, 3e-3)
    config = config_lib.apply_overrides(gau_lm.get_config(f"tiny,{name}"), {
        **TEST_OVERRIDES, "total_steps": 8, "checkpoint_every_steps": 8, "mesh.data": 2, "mesh.fsdp": 2,
        "mesh.model": 2, "optimizer.learning_rate": lr,
        **({"optimizer.min_dim_size_to_factor": 16} if name == "adafactor" else {})})
    assert config.optimizer.name == name
    trainer.train_and_evaluate(config, str(tmp_path))
    losses = [row["loss"] for row in read_metrics(tmp_path)]
    assert np.mean(losses[-3:]) < np.mean(losses[:2]) - 0.05, losses

    _, plan = trainer.plan_for(config)
    params = _param_specs(plan)
    leaves = jax.tree_util.tree_leaves_with_path(plan.state_shardings.opt_state,
                                                 is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
    abstract = dict(jax.tree_util.tree_leaves_with_path(plan.abstract_state.opt_state))
    derived = reduced = 0
    for path, sharding in leaves:
        shape = abstract[path].shape
        owner = next((params[tuple(path[i:])] for i in range(len(path)) if tuple(path[i:]) in params), None)
        spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
        if owner is None:
            assert all(axis is None for axis in spec), (path, spec)  # counts and other scalars: replicated
            continue
        derived += 1
        reduced += tuple(shape) != owner[0]
        assert spec == _expected_spec(*owner, shape), (jax.tree_util.keystr(path), shape, spec)
    assert derived >= len(params)  # every parameter has at least one statistic (moment, trace)
    assert (reduced > 0) == (name == "adafactor")
    assert any("model" in str(s.spec) for _, s in leaves) and any("fsdp" in str(s.spec) for _, s in leaves)


def test_optimizer_switch_without_its_keys_says_to_use_the_preset():
    from experiments import gau_lm
    from train_lib.config_lib import ConfigError

    config = gau_lm.get_config("tiny")
    config.optimizer.name = "sgd"
    with pytest.raises(ConfigError, match=r"needs optimizer.momentum, optimizer.nesterov.*preset.*tiny,sgd"):
        optim.make_optimizer(config.optimizer, config.total_steps)


def test_adamax_follows_kingma_and_ba_algorithm_2_with_decoupled_weight_decay():
    """Adamax (Kingma & Ba, arXiv 1412.6980, Algorithm 2) in float64 NumPy: m ← β₁m + (1−β₁)g,
    u ← max(β₂u, |g|), θ ← θ − α_t (m/(1−β₁ᵗ))/u − α_t·wd·θ on the decayed leaves (AdamW's decoupling)."""
    from experiments import common

    opt = common.optimizer_config("adamax", learning_rate=1e-2, warmup_steps=0, end_lr_factor=1.0,
                                  weight_decay=0.1, grad_clip_norm=0.0)
    tx = optim.make_optimizer(opt, 100)
    params = {"dense": {"kernel": jnp.asarray([[0.5, -1.0], [2.0, 0.25]]), "bias": jnp.asarray([0.3, -0.2])}}
    rng = np.random.default_rng(0)
    grads_seq = [{"dense": {"kernel": rng.normal(size=(2, 2)), "bias": rng.normal(size=2)}} for _ in range(5)]
    state = tx.init(params)
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    m = jax.tree.map(np.zeros_like, p)
    u = jax.tree.map(np.zeros_like, p)
    for t, g in enumerate(grads_seq, start=1):
        updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, params)
        params = optax.apply_updates(params, updates)
        m = jax.tree.map(lambda m_, g_: 0.9 * m_ + 0.1 * g_, m, g)
        u = jax.tree.map(lambda u_, g_: np.maximum(0.999 * u_, np.abs(g_)), u, g)
        step = jax.tree.map(lambda m_, u_: 1e-2 * m_ / (1 - 0.9 ** t) / u_, m, u)
        decay = {"dense": {"kernel": 1e-2 * 0.1 * p["dense"]["kernel"], "bias": np.zeros(2)}}  # bias not decayed
        p = jax.tree.map(lambda p_, s_, d_: p_ - s_ - d_, p, step, decay)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), params, p)
