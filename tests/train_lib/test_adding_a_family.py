"""README "Adding a model family", worked: a toy regression family trained by the real trainer.

The whole family is the class below: `config.task` names it by module path, so nothing in train_lib changes.
"""
import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import common
from tests.train_lib.conftest import read_metrics
from train_lib import trainer
from train_lib.input_pipeline import batched
from train_lib.task import TaskBase

TRUE_W = np.array([1.0, -2.0, 3.0, 0.5], np.float32)


class Regression(TaskBase):
    """Least squares on y = x·w (four features): a logically named Dense layer and the mean squared error."""

    def __init__(self, config):
        super().__init__(config)
        self.noise = config.data.noise
        self.model = nn.Dense(1, kernel_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed", None)))

    def batch_spec(self, batch_size):
        return {"x": jax.ShapeDtypeStruct((batch_size, 4), jnp.float32), "y": jax.ShapeDtypeStruct((batch_size,), jnp.float32)}

    def init_params(self, rng, batch):
        return self.model.init(rng, batch["x"])["params"]

    def loss(self, params, batch, rng, *, train):
        error = self.model.apply({"params": params}, batch["x"])[:, 0] - batch["y"]
        return jnp.mean(error**2), {}

    def eval_sums(self, params, batch):
        error = self.model.apply({"params": params}, batch["x"])[:, 0] - batch["y"]
        return {"loss": jnp.sum(error**2), "count": jnp.asarray(error.size, jnp.float32)}

    def datasets(self, rows):
        x = np.random.default_rng(0).normal(size=(1024, 4)).astype(np.float32)
        y = x @ TRUE_W + self.noise * np.random.default_rng(1).normal(size=1024).astype(np.float32)
        examples = grain.MapDataset.source([{"x": a, "y": b} for a, b in zip(x, y)])
        collate = lambda items: {k: np.stack([item[k] for item in items]) for k in ("x", "y")}  # noqa: E731
        train = batched(examples.shuffle(seed=self.seed).repeat(None), global_batch=self.batch_size, rows=rows,
                        num_batches=10**9, collate=collate).to_iter_dataset()
        return train, batched(examples, global_batch=self.batch_size, rows=rows, num_batches=self.eval_batches,
                                collate=collate), {}


def regression_config(**values):
    config = common.trainer_config(task=f"{__name__}:Regression", total_steps=100, batch_size=16, eval_every_steps=100,
                                   checkpoint_every_steps=50, logical_axis_rules=(("batch", ("data", "fsdp")),
                                                                                  ("embed", "fsdp")), **values)
    config.data = ml_collections.ConfigDict({"noise": 0.01})
    config.optimizer = common.optimizer_config("adamw", learning_rate=0.2, warmup_steps=5)
    return config


def test_a_new_family_trains_resumes_and_shards_through_the_generic_trainer(tmp_path):
    config = regression_config(log_every_steps=10)
    config.mesh.data, config.mesh.fsdp = 2, 4  # the kernel's 'embed' axis over fsdp: 4 rows, one per device
    halfway = trainer.train_and_evaluate(config, str(tmp_path), stop_at_step=50)
    result = trainer.train_and_evaluate(config, str(tmp_path))  # resumes at step 50
    losses = [row["loss"] for row in read_metrics(tmp_path)]
    assert halfway["step"] == 50 and result["step"] == 100 and len(losses) == 10 and losses[0] > 5
    assert result["eval"]["loss"] < 1e-3 and result["eval"]["ema_loss"] < 0.5  # the noise floor is 1e-4
    _, plan = trainer.plan_for(config)
    assert tuple(plan.state_shardings.params["kernel"].spec) == ("fsdp", None)
    adam = plan.state_shardings.opt_state[1][0]  # (clip, (adam, decay, lr)): Adam's moments follow the kernel
    assert tuple(adam.mu["kernel"].spec) == tuple(adam.nu["kernel"].spec) == ("fsdp", None)
