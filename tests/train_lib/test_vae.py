"""The 'vae' family (NVAE on digits) through the generic trainer: model state, the objective, IWAE and the CLI."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import nvae_digits, nvae_study
from tests.train_lib.conftest import read_metrics, run_cli
from train_lib import checkpointing, config_lib, trainer
from train_lib.config_lib import ConfigError
from train_lib.vae import evaluate
from train_lib.vae import task as vae_task

TEST_OVERRIDES = {"total_steps": 4, "log_every_steps": 1, "eval_every_steps": 2, "checkpoint_every_steps": 2,
                  "vae.kl_warmup_steps": 3, "sample.report_samples": 0}


def make_config(presets="", **overrides):
    config = config_lib.apply_overrides(nvae_digits.get_config("quick" + (f",{presets}" if presets else "")),
                                        {**TEST_OVERRIDES, **{k.replace("__", "."): v for k, v in overrides.items()}})
    config.lock()
    return config


def _batch(task, size=None):
    images = task.data.train_images[: size or task.batch_size]
    n = len(images)
    return {"images": jnp.asarray(images), "labels": jnp.zeros(n, jnp.int32), "index": jnp.arange(n, dtype=jnp.int32)}


@pytest.mark.parametrize("key, value, message", [
    ("vae.kl_min_coeff", 0.0, "'vae.kl_min_coeff' must be in (0, 1]"),
    ("vae.spectral_coeff", -1.0, "'vae.spectral_coeff'"),
    ("vae.kl_warmup_steps", -1, "'vae.kl_warmup_steps' must be non-negative"),
    ("sample.temperatures", (1.0, 0.0), "'sample.temperatures'"),
    ("sample.bn_readjust_batch", 1, "'sample.bn_readjust_batch'"),
    ("data.dataset", "mnist", "'data.dataset' is 'mnist'"),
    ("model.num_scales", 4, "model.image_shape 8×8 is not divisible"),
])
def test_config_errors_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        vae_task.VAETask(make_config(**{key: value}))


def test_kl_warmup_and_balancing_follow_nvae():
    s = vae_task.VAESettings(kl_warmup_steps=10, kl_const_steps=2, kl_min_coeff=1e-4, kl_balance=True,
                             spectral_coeff=0.0, spectral_iterations=1)
    betas = [float(vae_task.kl_coefficient(t, s)) for t in (0, 2, 7, 12, 100)]
    np.testing.assert_allclose(betas, [1e-4, 1e-4, 0.5, 1.0, 1.0], rtol=1e-6)
    kl = jnp.asarray([[1.0, 4.0, 2.0], [3.0, 0.0, 6.0]])
    alpha = np.asarray([1.0, 1.0, 4.0])
    weighted, gamma = vae_task.balanced_kl(kl, jnp.asarray(0.5), alpha, balance=True)
    size = np.abs(np.asarray(kl)).mean(0) + 0.01  # NVAE App. A, in float64
    expected = size / alpha * size.sum()
    expected /= expected.mean()
    np.testing.assert_allclose(gamma, expected, rtol=1e-6)
    np.testing.assert_allclose(weighted, 0.5 * (np.asarray(kl) * expected).sum(1), rtol=1e-6)
    _, at_one = vae_task.balanced_kl(kl, jnp.asarray(1.0), alpha, balance=True)  # balancing ends with the warm-up
    np.testing.assert_array_equal(at_one, np.ones(3))
    grad = jax.grad(lambda k: vae_task.balanced_kl(k, jnp.asarray(0.5), alpha, balance=True)[0].sum())(kl)
    np.testing.assert_allclose(grad, 0.5 * np.broadcast_to(expected, kl.shape), rtol=1e-6)  # γ is a constant
    # α: a group's dimensions over the groups at its scale (equal groups per scale: proportional to size).
    task = vae_task.VAETask(nvae_digits.get_config())
    np.testing.assert_allclose(task.alpha, [1.0, 1.0, 4.0, 4.0])


def test_a_train_step_updates_batch_stats_and_power_vectors_and_eval_reads_the_running_ones():
    task, plan = trainer.plan_for(make_config(optimizer__warmup_steps=0))
    batch = _batch(task)
    state = jax.jit(plan.init_fn)(plan.rng, batch)
    assert set(state.model_state) == {"batch_stats", "spectral"}
    step = jax.jit(lambda s, b: trainer.train_step(s, b, task=task, optimizer=plan.optimizer, schedule=plan.schedule,
                                                settings=plan.settings, microbatch_sharding=plan.microbatch_sharding))
    new, metrics = step(state, batch)
    moved = lambda a, b: max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))  # noqa
    assert moved(new.model_state["batch_stats"], state.model_state["batch_stats"]) > 0
    assert moved(new.model_state["spectral"], state.model_state["spectral"]) > 0
    assert float(metrics["nonfinite"]) == 0 and {"nelbo_bpd", "kl_group_0", "kl_coeff", "spectral_norm_sum"} <= set(metrics)
    # Evaluation uses the running statistics, so one image's ELBO does not depend on its batch.
    whole = task.eval_sums(new.params, batch, model_state=new.model_state)
    halves = [task.eval_sums(new.params, jax.tree.map(lambda x: x[i::2], batch), model_state=new.model_state)
              for i in (0, 1)]
    key = task.eval_key(batch["images"])
    out_whole, _ = task.forward(new.params, new.model_state, batch["images"], key, train=False)
    out_first, _ = task.forward(new.params, new.model_state, batch["images"][:3], key, train=False)
    np.testing.assert_allclose(out_whole["log_px"][:3], out_first["log_px"], rtol=1e-5)
    assert float(whole["count"]) == sum(float(h["count"]) for h in halves)
    # A non-finite step keeps the old model state.
    poisoned = step(state, {**batch, "images": batch["images"] * jnp.nan})[0]
    assert moved(poisoned.model_state, state.model_state) == 0


def test_iwae_with_one_sample_is_the_elbo_and_grows_with_k():
    task, plan = trainer.plan_for(make_config())
    batch = _batch(task)
    state = jax.jit(plan.init_fn)(plan.rng, batch)
    images = np.asarray(task.data.test_images[:20])
    key = jax.random.PRNGKey(3)
    weights = evaluate.log_weights(task, state.params, state.model_state, images, key, num_samples=64, batch_size=10)
    # Nested: the first 8 columns are the 8-sample call's.
    again = evaluate.log_weights(task, state.params, state.model_state, images, key, num_samples=8, batch_size=10)
    np.testing.assert_allclose(weights[:, :8], again, rtol=1e-5, atol=1e-4)
    # K = 1: the single-sample ELBO log p(x|z) + log p(z) − log q(z|x) at the same draw (chunk 1, draw 0).
    out = task.model.apply(task.variables(state.params, state.model_state), jnp.asarray(images[10:]), train=False,
                           rngs={"sample": jax.random.fold_in(jax.random.fold_in(key, 1), 0)})
    np.testing.assert_allclose(weights[10:, 0], out["log_px"] + out["log_p"] - out["log_q"], rtol=1e-5, atol=1e-4)
    bounds = evaluate.iwae_bits_per_dim(weights, task.dims, (1, 4, 16, 64))
    one = -np.mean(weights[:, 0]) / (task.dims * np.log(2))
    np.testing.assert_allclose(bounds[1], one, rtol=1e-12)
    assert bounds[1] >= bounds[4] >= bounds[16] >= bounds[64]  # bits/dim: the bound on log p(x) rises with K
    # The analytic-KL ELBO is the mean of the sampled one (Monte Carlo over the 64 draws, loose).
    terms = evaluate.elbo_terms(task, state.params, state.model_state, images, key, batch_size=10)
    sampled = -np.mean(weights) / (task.dims * np.log(2))
    assert abs(terms["nelbo_bpd"] - sampled) < 0.05 * abs(sampled)
    assert len(evaluate.active_units(terms["posterior_means"])) == task.num_groups


def test_stop_and_resume_is_exact_and_the_evaluate_cli_reads_the_model_state(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    config = make_config()
    trainer.train_and_evaluate(config, str(full))
    assert trainer.train_and_evaluate(config, str(resumed), stop_at_step=2)["step"] == 2
    trainer.train_and_evaluate(config, str(resumed))
    assert [r["loss"] for r in read_metrics(resumed)] == [r["loss"] for r in read_metrics(full)]  # bit for bit
    assert read_metrics(resumed, "eval") == read_metrics(full, "eval")
    a, b = (checkpointing.restore_params(w, use_ema=False) for w in (full, resumed))
    jax.tree.map(np.testing.assert_array_equal, a.model_state, b.model_state)
    trained = jax.tree.leaves(a.model_state["batch_stats"])
    assert trained and all(np.all(np.isfinite(x)) for x in trained)
    out = run_cli(["--workdir=" + str(full), "--importance_samples=3", "--num_samples=16", "--temperatures=1.0,0.6",
                   "--bn_readjust_steps=2", "--output=" + str(tmp_path / "eval.json")], devices=1,
                  module="train_lib.vae.evaluate")
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "eval.json").read_text())
    assert results["step"] == 4 and results["test_images"] == 360 and set(results["iwae_bpd"]) == {"1", "3"}
    assert results["iwae_bpd"]["3"] <= results["iwae_bpd"]["1"] + 1e-9
    assert set(results["samples"]) == {"1", "0.6"} and all(np.isfinite(s["fcd"]) for s in results["samples"].values())
    assert "IWAE bound" in out.stdout and "| group (top first) |" in out.stdout
    wrong = run_cli([f"--workdir={full}", "--temperatures=0"], devices=1, module="train_lib.vae.evaluate")
    assert wrong.returncode == 2 and "--temperatures must be positive" in wrong.stderr


@pytest.mark.slow  # ~40 s; batch norm over a sharded global batch is also tested by the siamese family
def test_sharded_mesh_matches_single_device(tmp_path):
    """8 devices (batch over data × fsdp, model replicated) train like 1: batch norm's statistics and KL
    balancing's coefficients are over the global batch."""
    trainer.train_and_evaluate(make_config(mesh__data=4, mesh__fsdp=2), str(tmp_path / "mesh"))
    args = [f"--config.{k}={v}" for k, v in TEST_OVERRIDES.items()]
    single = run_cli(["--config=experiments/nvae_digits.py:quick", f"--workdir={tmp_path / 'single'}", *args],
                     devices=1)
    assert single.returncode == 0, single.stderr[-3000:]
    mesh = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "mesh")}
    one = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "single")}
    assert list(one) == [1, 2, 3, 4] and len({round(v, 4) for v in one.values()}) == 4
    np.testing.assert_allclose([mesh[s] for s in one], list(one.values()), rtol=2e-4)
    np.testing.assert_allclose(read_metrics(tmp_path / "mesh", "eval")[-1]["nelbo_bpd"],
                               read_metrics(tmp_path / "single", "eval")[-1]["nelbo_bpd"], rtol=2e-4)


@pytest.mark.slow  # two cells trained and evaluated (~2 min on 2 cores): make test-slow
def test_quick_study_trains_both_kinds_of_cell_and_writes_the_tables(tmp_path):
    config = nvae_study.get_config("quick")
    config.workdir = str(tmp_path)
    text = nvae_study.run(config)
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"groups1", "plain_seed0"}
    assert "| groups1 | 2×1 |" in text and "| plain | no | 0 |" in text and "of 1 |" in text
    before = (tmp_path / "groups1" / "metrics.jsonl").stat().st_mtime_ns
    again = nvae_study.run(config)  # finished cells are read back, not retrained
    assert again.split("\n\nTotal")[0] == text.split("\n\nTotal")[0]
    assert (tmp_path / "groups1" / "metrics.jsonl").stat().st_mtime_ns == before
