"""The 'siamese' family (SimSiam/BYOL on digits) through the generic trainer, its augmentations and its probe."""
import json
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments import simsiam_digits
from tests.train_lib.conftest import read_metrics, run_cli
from train_lib import config_lib, trainer
from train_lib.config_lib import ConfigError
from train_lib.selfsup import augment as augment_lib
from train_lib.selfsup import probe
from train_lib.selfsup import task as selfsup_task

TEST_OVERRIDES = {"total_steps": 6, "batch_size": 32, "log_every_steps": 1, "eval_every_steps": 3,
                  "checkpoint_every_steps": 3, "probe.final_report": False}


def make_config(presets="", **overrides):
    config = config_lib.apply_overrides(simsiam_digits.get_config("quick" + (f",{presets}" if presets else "")),
                                        {**TEST_OVERRIDES, **{k.replace("__", "."): v for k, v in overrides.items()}})
    config.lock()
    return config


SETTINGS = augment_lib.AugmentSettings(max_shift=1, erase_prob=0.5, erase_max=4, noise_std=0.1)


def test_augmentations_are_functions_of_the_key_and_index():
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, size=(4, 8, 8, 1)), jnp.float32)
    key, index = jax.random.PRNGKey(3), jnp.arange(4, dtype=jnp.int32)
    views = augment_lib.augment_batch(key, images, index, SETTINGS)
    np.testing.assert_array_equal(views, augment_lib.augment_batch(key, images, index, SETTINGS))
    # An example's view depends on its index, not on its row: permuting the batch permutes the views.
    order = jnp.array([2, 0, 3, 1])
    np.testing.assert_array_equal(augment_lib.augment_batch(key, images[order], index[order], SETTINGS), views[order])
    assert not np.array_equal(views, augment_lib.augment_batch(jax.random.PRNGKey(4), images, index, SETTINGS))
    assert float(views.min()) >= -1.0 and float(views.max()) <= 1.0
    identity = augment_lib.AugmentSettings(max_shift=0, erase_prob=0.0, erase_max=1, noise_std=0.0)
    np.testing.assert_array_equal(augment_lib.augment_batch(key, images, index, identity), images)


def test_shift_and_erase_only_move_pixels_or_fill_the_background():
    image = jnp.asarray(np.random.default_rng(1).uniform(-0.9, 1, size=(8, 8, 1)), jnp.float32)
    shift = augment_lib.AugmentSettings(max_shift=2, erase_prob=0.0, erase_max=1, noise_std=0.0)
    padded = np.pad(np.asarray(image[..., 0]), 2, constant_values=-1.0)
    windows = {(i, j): padded[i:i + 8, j:j + 8] for i in range(5) for j in range(5)}
    seen = set()
    for seed in range(40):
        view = np.asarray(augment_lib.augment(jax.random.PRNGKey(seed), image, shift)[..., 0])
        matches = [offset for offset, w in windows.items() if np.array_equal(view, w)]
        assert len(matches) == 1  # the image translated by one of the 25 offsets, the border background
        seen.add(matches[0])
    assert len(seen) > 10
    erase = augment_lib.AugmentSettings(max_shift=0, erase_prob=1.0, erase_max=3, noise_std=0.0)
    for seed in range(20):
        view = np.asarray(augment_lib.augment(jax.random.PRNGKey(seed), image, erase)[..., 0])
        changed = view != np.asarray(image[..., 0])
        assert changed.any() and np.all(view[changed] == -1.0)
        rows, cols = np.nonzero(changed)
        assert rows.max() - rows.min() < 3 and cols.max() - cols.min() < 3  # one rectangle of sides ≤ 3


@pytest.mark.parametrize("key,value,message", [
    ("model.predictor", "linear", "'model.predictor' is 'linear'"),
    ("siamese.target_decay", 1.0, "'siamese.target_decay' must be in [0, 1)"),
    ("augment.max_shift", 8, "'augment.max_shift' must be in 0..7"),
    ("augment.erase_prob", 1.5, "'augment.erase_prob'"),
    ("data.dataset", "cifar10", "'data.dataset' is 'cifar10'"),
    ("probe.knn_k", 0, "'probe.knn_k'"),
    ("siamese.closed_form_ridge", 0.0, "'siamese.closed_form_ridge' must be positive"),
])
def test_config_errors_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        selfsup_task.SiameseTask(make_config(**{key: value}))


@pytest.mark.parametrize("node,key,value,message", [
    ("probe", "knn_k", 10.0, "'probe.knn_k' must be int, got 10.0"),
    ("probe", "final_report", "False", "'probe.final_report' must be bool"),
    ("siamese", "stop_gradient", 1, "'siamese.stop_gradient' must be bool"),
    ("siamese", "target_decay", "0.5", "'siamese.target_decay' must be a finite float"),
    ("siamese", "closed_form_ridge", float("nan"), "'siamese.closed_form_ridge' must be a finite float"),
    ("augment", "noise_std", float("inf"), "'augment.noise_std' must be a finite float"),
    ("augment", "max_shift", 1.0, "'augment.max_shift' must be int"),
    ("model", "projector_output_norm", "no", "'model.projector_output_norm' must be True or False"),
])
def test_mistyped_values_of_a_config_file_are_refused_in_one_line(node, key, value, message):
    """A config file (not a command-line override, which ml_collections type-checks) may hold any type."""
    config = simsiam_digits.get_config("quick")
    values = config[node].to_dict()
    values[key] = value
    config[node] = ml_collections.ConfigDict(values)
    with pytest.raises(ConfigError, match=re.escape(message)):
        selfsup_task.SiameseTask(config)


def test_an_ema_target_with_the_gradient_flowing_into_it_is_refused():
    with pytest.raises(ConfigError, match="'siamese.stop_gradient'=False needs siamese.target_decay=0"):
        selfsup_task.SiameseTask(make_config("byol,no_stop_gradient"))
    with pytest.raises(ConfigError, match="not a mean over examples"):  # batch norm couples the examples
        trainer.setup(make_config(grad_accum_steps=2))


def _first_batch(task):
    train, _, _ = task.datasets((0, task.batch_size))
    return {k: jnp.asarray(v) for k, v in next(iter(train)).items()}


def test_byol_step_moves_the_target_by_its_ema_and_trains_only_the_online_network():
    config = make_config("byol", optimizer__weight_decay=0.1)
    task, plan = trainer.plan_for(config)
    batch = _first_batch(task)
    state = plan.init_fn(plan.rng, batch)
    np.testing.assert_array_equal(state.params["target"]["encoder"]["dense_0"]["kernel"],
                                  state.params["online"]["encoder"]["dense_0"]["kernel"])  # BYOL starts equal
    state = state.replace(params={**state.params, "target": jax.tree.map(lambda x: x * 0.5, state.params["target"])})
    step = jax.jit(lambda s: trainer.train_step(s, batch, task=task, optimizer=plan.optimizer,
                                                schedule=plan.schedule, settings=plan.settings,
                                                microbatch_sharding=plan.microbatch_sharding))
    state, _ = step(state)  # the warm-up's first learning rate is 0
    new, metrics = step(state)
    tau = config.siamese.target_decay
    expected = jax.tree.map(lambda t, o: tau * t + (1 - tau) * o, state.params["target"], new.params["online"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), new.params["target"], expected)
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new.params["online"], state.params["online"])
    assert max(jax.tree.leaves(moved)) > 0 and float(metrics["nonfinite"]) == 0.0
    assert {"output_std", "output_rank", "representation_rank"} <= set(metrics)


@pytest.mark.parametrize("presets", [pytest.param("", marks=pytest.mark.slow), "byol,closed_form_predictor"])
def test_sharded_mesh_matches_single_device(tmp_path, presets):
    """(data, fsdp, model) = (2, 2, 2) over 8 devices trains like 1 device; the batch norm's statistics and the
    closed-form predictor are over the global batch."""
    trainer.train_and_evaluate(make_config(presets, mesh__data=2, mesh__fsdp=2, mesh__model=2), str(tmp_path / "mesh"))
    args = [f"--config.{k}={v}" for k, v in TEST_OVERRIDES.items()]
    single = run_cli([f"--config=experiments/simsiam_digits.py:quick{',' + presets if presets else ''}",
                      f"--workdir={tmp_path / 'single'}", *args], devices=1)
    assert single.returncode == 0, single.stderr[-3000:]
    mesh = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "mesh")}
    one = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "single")}
    assert list(one) == list(range(1, 7)) and len({round(v, 5) for v in one.values()}) == 6
    np.testing.assert_allclose([mesh[s] for s in one], list(one.values()), rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(read_metrics(tmp_path / "mesh", "eval")[-1]["output_std"],
                               read_metrics(tmp_path / "single", "eval")[-1]["output_std"], rtol=2e-4)


def test_stop_and_resume_equals_uninterrupted_run_and_the_probe_cli_reads_it(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    config = make_config("byol")
    trainer.train_and_evaluate(config, str(full))
    assert trainer.train_and_evaluate(config, str(resumed), stop_at_step=3)["step"] == 3
    trainer.train_and_evaluate(config, str(resumed))
    assert [r["loss"] for r in read_metrics(resumed)] == [r["loss"] for r in read_metrics(full)]  # bit for bit
    assert read_metrics(resumed, "eval") == read_metrics(full, "eval")
    out = run_cli(["--workdir=" + str(full), "--output=" + str(tmp_path / "probe.json")], devices=1,
                  module="train_lib.selfsup.probe")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "checkpoint step 6" in out.stdout and "linear probe" in out.stdout
    results = json.loads((tmp_path / "probe.json").read_text())
    assert results["step"] == 6 and 0.5 < results["linear_probe_accuracy"] <= 1.0 and results["knn_k"] == 10
    wrong = run_cli([f"--workdir={tmp_path}"], devices=1, module="train_lib.selfsup.probe")
    assert wrong.returncode == 2 and "--workdir" in wrong.stderr


def test_knn_matches_scikit_learn_and_the_probe_separates_separable_classes():
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(0)
    train_x, test_x = rng.normal(size=(200, 5)), rng.normal(size=(100, 5))
    train_y = (train_x[:, 0] > 0).astype(int) + 2 * (train_x[:, 1] > 0)
    test_y = (test_x[:, 0] > 0).astype(int) + 2 * (test_x[:, 1] > 0)
    for k in (1, 7):  # two classes would never tie; with four, sklearn breaks ties by the lower class
        reference = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit(train_x, train_y)
        ours = probe.knn_accuracy(train_x, train_y, test_x, test_y, k=k)
        if k == 1:
            assert ours == pytest.approx(reference.score(test_x, test_y))
        else:
            assert abs(ours - reference.score(test_x, test_y)) <= 0.03  # ties (3 of 7 vs 3) may break otherwise
    assert probe.linear_probe_accuracy(train_x, train_y, test_x, test_y) > 0.9
    # A 1–1 tie of k = 2 goes to the class whose neighbour is more similar, whatever the class order.
    train = np.array([[1.0, 0.0], [0.8, 0.6]])
    assert probe.knn_accuracy(train, np.array([0, 1]), np.array([[0.9, 0.45]]), np.array([1]), k=2) == 1.0
    assert probe.knn_accuracy(train, np.array([1, 0]), np.array([[0.9, 0.45]]), np.array([0]), k=2) == 1.0
    assert probe.knn_accuracy(train, np.array([0, 1]), np.array([[1.0, 0.05]]), np.array([0]), k=2) == 1.0
