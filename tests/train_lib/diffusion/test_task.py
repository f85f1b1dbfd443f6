"""The 'diffusion' task through the generic trainer, and the sampling CLI (8 fake CPU devices).

Fast tests check the task's pieces against references (config errors, data rows, the loss at
initialisation, Γ against its closed form and its cache). The end-to-end ones (training, sharded vs one
device, resume, the `train_lib.diffusion.sample` CLI) compile a U-Net several times and are marked slow.
"""
import json
import math
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import ddpm_digits
from models.diffusion import schedules
from tests.models import diffusion_oracles as oracles
from tests.train_lib.conftest import REPO, read_metrics
from train_lib import config_lib, registry, sharding, trainer
from train_lib.config_lib import ConfigError
from train_lib import image_data
from train_lib.diffusion import sample
from train_lib.diffusion import task as diffusion_task

# Overrides that make the tiny variant take seconds per run (tests care about behaviour, not quality).
TEST_OVERRIDES = {"total_steps": 12, "batch_size": 16, "log_every_steps": 1, "eval_every_steps": 1000,
                  "eval_batches": 1, "checkpoint_every_steps": 3, "sample.report_samples": 0,
                  "diffusion.eval_nll_steps": 0}



def make_config(variant="tiny", **overrides):
    config = config_lib.apply_overrides(
        ddpm_digits.get_config(variant), {**TEST_OVERRIDES, **{k.replace("__", "."): v for k, v in overrides.items()}})
    config.lock()
    return config


def run_module(module, args, *, devices=1, timeout=600):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _compile(fn, *args):
    # Optimisation level 0 compiles a U-Net several times faster; these graphs run once on a small batch.
    return jax.jit(fn).lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})


def _losses(workdir):
    return {row["step"]: row["loss"] for row in read_metrics(workdir)}


# --------------------------------------------------------------------------------------------------
# Fast: the task's pieces.
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key,value,message", [
    ("diffusion.prediction", "score", "'diffusion.prediction' is 'score'"),
    ("diffusion.weighting", "vlb", "'diffusion.weighting'"),
    ("diffusion.schedule", "sigmoid", "'diffusion.schedule'"),
    ("diffusion.eval_nll_method", "analytic_ddpm", "'diffusion.eval_nll_method'"),
    ("diffusion.eval_nll_steps", 101, "'diffusion.eval_nll_steps' must be in 0..100"),
    ("diffusion.label_dropout", 0.1, "needs a class-conditional model"),
    ("sample.sampler", "euler", "'sample.sampler'"),
    ("model.num_groups", 3, "num_groups=3 must divide"),
    ("model.attention_resolutions", (16,), "attention_resolutions"),
    ("data.dataset", "mnist", "'data.dataset' is 'mnist'"),
    ("data.path", "/some/dir", "data.dataset='digits' is bundled with scikit-learn"),
])
def test_config_errors_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        diffusion_task.DiffusionTask(make_config(**{key: value}))


def test_cifar10_variant_is_the_ddpm_papers_model_and_shards_on_a_2x2x2_mesh(tmp_path):
    with pytest.raises(ConfigError, match="'data.path' must name the directory of CIFAR-10"):
        diffusion_task.DiffusionTask(make_config("cifar10"))
    config = make_config("cifar10", data__path=str(tmp_path))  # nothing is read until the data is needed
    task = diffusion_task.DiffusionTask(config)
    assert task.image_shape == (32, 32, 3) and task.levels == 256
    boxed = jax.eval_shape(task.init_params, jax.random.PRNGKey(0), task.batch_spec(2))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(boxed)))
    assert abs(count / 35.7e6 - 1) < 0.005  # Ho et al., arXiv 2006.11239, App. B: 35.7M parameters
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "model": 2})
    shardings = sharding.logical_shardings(boxed, mesh, config_lib.logical_axis_rules(config))
    sharding.check_divisible(nn.unbox(boxed), shardings, mesh)
    specs = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
    assert sum("fsdp" in str(s.spec) for s in specs) > 50 and sum("model" in str(s.spec) for s in specs) > 50


def test_train_rows_assemble_the_global_batch_and_eval_is_the_test_split_in_order():
    task = diffusion_task.DiffusionTask(make_config(batch_size=8, eval_batches=2))
    full_train, full_eval, info = task.datasets((0, 8))
    low_train, low_eval, _ = task.datasets((0, 3))
    high_train, high_eval, _ = task.datasets((3, 8))
    full_iter, low_iter, high_iter = iter(full_train), iter(low_train), iter(high_train)
    data = task.data
    seen = []
    for _ in range(360):  # two epochs of 1437 images in batches of 8, and a bit
        batch, low, high = next(full_iter), next(low_iter), next(high_iter)
        for key in ("images", "labels", "index"):
            np.testing.assert_array_equal(np.concatenate([low[key], high[key]]), batch[key])
        np.testing.assert_array_equal(batch["images"], data.train_images[batch["index"]])  # the index is the row
        assert batch["images"].shape == (8, 8, 8, 1) and batch["labels"].dtype == np.int32
        seen.append(batch)
    # The first epoch is a permutation of the training split: every image exactly once.
    first = np.concatenate([b["images"] for b in seen])[:1437].reshape(1437, -1)
    order = np.lexsort(first.T)
    np.testing.assert_array_equal(first[order], data.train_images.reshape(1437, -1)[np.lexsort(
        data.train_images.reshape(1437, -1).T)])
    assert not np.array_equal(first, data.train_images.reshape(1437, -1))  # shuffled
    np.testing.assert_array_equal(np.sort(np.concatenate([b["index"] for b in seen])[:1437]), np.arange(1437))
    evaluation = [full_eval[j] for j in range(len(full_eval))]
    assert len(evaluation) == 2 and info["test_images"] == 360
    np.testing.assert_array_equal(np.concatenate([b["images"] for b in evaluation]), data.test_images[:16])
    np.testing.assert_array_equal(np.concatenate([low_eval[1]["labels"], high_eval[1]["labels"]]),
                                  data.test_labels[8:16])


def test_x0_prediction_loss_at_initialisation_is_the_mean_square_of_the_images():
    # The U-Net's output conv is zero-initialised, so x̂₀ = 0 and the x₀-prediction MSE is mean(x₀²),
    # whatever t and ε were drawn; the ε-prediction loss is then mean(ε²) ≈ 1.
    config = make_config(diffusion__prediction="x0")
    task = diffusion_task.DiffusionTask(config)
    batch = {"images": jnp.asarray(task.data.test_images[:32]), "labels": jnp.asarray(task.data.test_labels[:32])}
    key = jax.random.PRNGKey(0)
    params = _compile(lambda k: task.init_params(k, batch), key)(key)
    loss, _ = _compile(lambda p, k: task.loss(p, batch, k, train=True), params, key)(params, key)
    np.testing.assert_allclose(loss, np.mean(np.square(task.data.test_images[:32])), rtol=1e-6)


def test_ascii_rendering_maps_levels_to_the_ramp():
    levels = np.array([[0, 16], [8, 16]])  # 17 grey levels: 0 → ' ', 8 → '=', 16 → '@'
    images = image_data.levels_to_unit_range(levels, 17)[None, :, :, None]
    text = image_data.ascii_digits(np.concatenate([images, -images]), 17)
    assert text.splitlines() == ["  @@  @@  ", "==@@  ==  "]


class _GaussianTask:
    """A stand-in task whose 'network' is the optimal ε-predictor for data N(0, s² I) (closed-form Γ)."""

    def __init__(self, images):
        self.schedule = oracles.FULL
        self.prediction = "eps"
        self.denoiser = oracles.gaussian_eps
        self.data = image_data.ImageDataset("gaussian", images, np.zeros(len(images), np.int32), images[:1],
                                            np.zeros(1, np.int32), levels=256, num_classes=0)
        self.diffusion = diffusion_task.DiffusionTask(make_config(diffusion__num_timesteps=oracles.T)).diffusion

    @staticmethod
    def labels_for_model(labels):
        return None


def test_gamma_matches_its_closed_form_and_is_cached_per_timestep(tmp_path):
    images = (oracles.SCALE * np.random.default_rng(0).standard_normal((512, 4, 4, 1))).astype(np.float32)
    task = _GaussianTask(images)
    cache = sample.gamma_cache(tmp_path, task, 7, use_ema=True, images=512, seed=0)
    assert cache.path == tmp_path / "analytic_gamma_7.npz"
    first_steps = np.array([1, 100, 500, 1000])
    gamma = cache.get(task, None, first_steps, batch_size=256)
    assert cache.estimated_now == 4 and cache.path.is_file()
    np.testing.assert_allclose(gamma, oracles.gaussian_gamma(oracles.ALPHA_BAR64[first_steps - 1]), rtol=0.06)
    stamp = cache.path.stat().st_mtime_ns
    again = sample.gamma_cache(tmp_path, task, 7, use_ema=True, images=512, seed=0)
    np.testing.assert_array_equal(again.get(task, None, first_steps[::-1], batch_size=256), gamma[::-1])
    assert again.estimated_now == 0 and cache.path.stat().st_mtime_ns == stamp  # read, not re-estimated
    more = again.get(task, None, np.array([1, 250, 500, 750]), batch_size=256)
    assert again.estimated_now == 2 and more[0] == gamma[0] and more[2] == gamma[2]
    with np.load(cache.path) as stored:
        assert np.sum(np.isfinite(stored["gamma"])) == 6
    # The noise at t is keyed by t: estimating the same timesteps together with others gives the same Γ.
    fresh = sample.gamma_cache(tmp_path / "fresh", task, 7, use_ema=True, images=512, seed=0)
    (tmp_path / "fresh").mkdir()
    np.testing.assert_array_equal(fresh.get(task, None, np.array([1, 250, 500, 750]), batch_size=256), more)
    other = sample.gamma_cache(tmp_path, task, 7, use_ema=True, images=256, seed=0)  # other settings: re-estimated
    other.get(task, None, first_steps, batch_size=256)
    assert other.estimated_now == 4


# --------------------------------------------------------------------------------------------------
# Slow: end to end through the trainer and the CLI.
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_model_trains_and_evaluates(tmp_path, capsys):
    config = make_config(total_steps=40, eval_every_steps=40, eval_batches=2, diffusion__eval_nll_steps=4,
                         sample__report_samples=5)
    result = trainer.train_and_evaluate(config, str(tmp_path))
    losses = [_losses(tmp_path)[s] for s in range(1, 41)]
    assert 0.8 < np.mean(losses[:3]) < 1.2  # ε-prediction with a zero output at initialisation: E ε² = 1
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:3])
    evaluation = result["eval"]
    assert evaluation["loss"] < 0.8 and {"ema_loss", "ema_bits_per_dim_k4"} <= set(evaluation)
    terms = [evaluation[f"bits_per_dim_k4_{t}"] for t in ("prior", "diffusion", "reconstruction")]
    assert evaluation["bits_per_dim_k4"] == pytest.approx(sum(terms), rel=1e-5)
    # The prior term KL(q(x_T|x₀) ‖ N(0, I)) depends only on the data and the schedule: float64 reference.
    x0 = image_data.load_digits().test_images[:32].astype(np.float64)
    ab = schedules.alpha_bar_float64("linear", 100)[-1]
    prior = 0.5 * (ab * x0**2 + (1 - ab) - 1 - np.log(1 - ab)).sum((1, 2, 3)) / (64 * math.log(2))
    assert evaluation["bits_per_dim_k4_prior"] == pytest.approx(prior.mean(), rel=1e-4)
    report = capsys.readouterr().out
    assert "5 samples (DDIM η=0, 5 steps)" in report
    art = report.split("5 steps):\n", 1)[1].splitlines()[:8]
    assert all(len(line) == 5 * 16 + 4 * 2 and set(line) <= set(image_data.ASCII_RAMP) for line in art)


@pytest.mark.slow
def test_sharded_mesh_matches_single_device(tmp_path):
    """(data, fsdp, model) = (2, 2, 2) over 8 devices trains like 1 device: conditional, v-prediction, ELBO."""
    overrides = dict(total_steps=4, optimizer__warmup_steps=2, model__num_classes=10, diffusion__label_dropout=0.2,
                     diffusion__prediction="v",
                     diffusion__weighting="elbo")
    trainer.train_and_evaluate(make_config(mesh__data=2, mesh__fsdp=2, mesh__model=2, **overrides),
                               str(tmp_path / "mesh"))
    args = [f"--config.{k}={v}" for k, v in {**TEST_OVERRIDES, **{k.replace("__", "."): v
                                                                  for k, v in overrides.items()}}.items()]
    single = run_module("train_lib.main", ["--config=experiments/ddpm_digits.py:tiny",
                                           f"--workdir={tmp_path / 'single'}", *args])
    assert single.returncode == 0, single.stderr[-3000:]
    assert json.loads((tmp_path / "single" / "config.json").read_text())["model"]["num_classes"] == 10
    mesh, one = _losses(tmp_path / "mesh"), _losses(tmp_path / "single")
    np.testing.assert_allclose([mesh[s] for s in range(1, 5)], [one[s] for s in range(1, 5)], rtol=1e-4)
    assert len({round(v, 4) for v in one.values()}) == 4  # the steps differ: the comparison is not of constants


@pytest.mark.slow
def test_stop_and_resume_equals_uninterrupted_run_exactly(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    config = make_config(diffusion__eval_nll_steps=3)
    trainer.train_and_evaluate(config, str(full))
    first = trainer.train_and_evaluate(config, str(resumed), stop_at_step=5)
    assert first["step"] == 5 and (resumed / "checkpoints" / "5").is_dir()
    trainer.train_and_evaluate(config, str(resumed))
    assert list(_losses(full)) == list(range(1, 13))
    assert _losses(resumed) == _losses(full)  # bit for bit: same data position, RNG, optimizer and EMA state
    assert read_metrics(resumed, "eval") == read_metrics(full, "eval")


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("diffusion_run")
    trainer.train_and_evaluate(make_config(total_steps=6), str(workdir))
    return workdir


def _numbers(pattern, text):
    match = re.search(pattern, text)
    assert match, text
    return [float(g) for g in match.groups()]


@pytest.mark.slow
def test_sample_cli_writes_a_grid_prints_metrics_and_caches_gamma(trained_workdir):
    args = ["--workdir", str(trained_workdir), "--sampler", "analytic_ddpm", "--steps", "4", "--num", "20",
            "--gamma_images", "64"]
    first = run_module("train_lib.diffusion.sample", args)
    assert first.returncode == 0, first.stderr[-3000:]
    png = trained_workdir / "samples_6_analytic_ddpm_k4_n20_seed0.png"
    assert png.is_file() and "(4 timesteps estimated now, 0 read from the cache)" in first.stdout
    fcd, floor = _numbers(r"FCD ([\d.]+) \(floor, real train vs test: ([\d.]+)\)", first.stdout)
    assert fcd > 10 * floor > 0  # six training steps make noise, not digits
    from PIL import Image
    assert Image.open(png).size == (5 * 9 * 4 + 4, 4 * 9 * 4 + 4)  # 20 images of 8×8, 5 per row, 4× enlarged
    gamma_file = trained_workdir / "analytic_gamma_6.npz"
    with np.load(gamma_file) as stored:
        gamma = stored["gamma"].copy()
    assert np.sum(np.isfinite(gamma)) == 4

    second = run_module("train_lib.diffusion.sample", args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "(0 timesteps estimated now, 4 read from the cache)" in second.stdout
    assert _numbers(r"FCD ([\d.]+)", second.stdout) == [fcd]  # same seed, same Γ: the same samples
    with np.load(gamma_file) as stored:
        np.testing.assert_array_equal(stored["gamma"], gamma)


@pytest.mark.slow
def test_sample_cli_nll_and_table(trained_workdir):
    nll = run_module("train_lib.diffusion.sample", ["--workdir", str(trained_workdir), "--nll", "--sampler", "ddpm_beta",
                                          "--steps", "4", "--nll_images", "40"])
    assert nll.returncode == 0, nll.stderr[-3000:]
    total, prior, diffusion, reconstruction = _numbers(
        r"on 40 test images: ([\d.]+) bits/dim = prior ([\d.]+) \+ diffusion ([\d.]+) \+ reconstruction ([\d.]+)",
        nll.stdout)
    assert total == pytest.approx(prior + diffusion + reconstruction, abs=2e-4) and diffusion > 0
    table = run_module("train_lib.diffusion.sample", ["--workdir", str(trained_workdir), "--table", "--table_steps", "2,4",
                                            "--table_num", "16", "--gamma_images", "32"])
    assert table.returncode == 0, table.stderr[-3000:]
    text = (trained_workdir / "table_6.md").read_text()
    assert (trained_workdir / "table_samples_6.png").is_file()
    rows = {}
    for line in text.splitlines():  # the first table is the NLL's; the FCD and KID tables repeat the row names
        if line.startswith("| "):
            rows.setdefault(line.split("|")[1].strip(), line)
    assert rows["DDIM η=0"].count("—") == 2 and rows["Analytic-DDIM η=0"].count("—") == 2
    assert re.match(r"\| Analytic-DDPM \| [\d.]+ \| [\d.]+ \|", rows["Analytic-DDPM"])
    bad = run_module("train_lib.diffusion.sample", ["--workdir", str(trained_workdir), "--nll", "--sampler", "ddim"])
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: --nll: sampler 'ddim'")
