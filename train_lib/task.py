"""The Task protocol: what the generic stack (trainer, benchmark, restore) calls on a model family.

A family is a folder, `train_lib/<family>/`, whose `task.py` holds a class implementing `Task`, usually
by subclassing `TaskBase` for the defaults. `train_lib.registry` names the classes by module path and
imports them only when a config asks for them, so the generic modules import no family (scenic's
`train(model_cls=...)`, big_vision's lazy `importlib.import_module`). README "Adding a model family"
walks through a toy one (`tests/train_lib/test_adding_a_family.py`).

The contract, in the order the trainer uses it:

  cls = registry.task_class(config.task)
  cls.xla_cpu_flags                      # read before JAX starts a backend: no instance yet
  task = cls(config)                     # reads (and validates) every config key the family uses
  task.batch_spec(batch_size)            # shapes of one global batch
  task.init_params(rng, batch)           # logically boxed parameters (nn.with_logical_partitioning)
  task.init_model_state(rng, batch)      # non-gradient variables (e.g. batch_stats), or None (the default)
  task.write_assets(workdir)             # process 0: files a checkpoint needs besides arrays (a tokenizer)
  task.datasets(rows)                    # grain pipelines of this process's rows of each global batch
  task.pretrained_params()               # a fresh run (no checkpoint): arrays to start from, by name
  task.stateful_value_and_grad(params, model_state, batch, rng, step)
                                         # (((loss, aux), grads), new model state); by default
  task.value_and_grad(params, batch, rng)  # ((loss, aux), grads): jax.value_and_grad of task.loss
  task.post_update(before, after, step)  # the parameters after the optimizer step (default: `after`)
  task.eval_sums(params, batch)          # summed over the eval batches, then task.summarize_eval
  task.final_report(host_params)         # if task.has_final_report: process 0, host-local parameters

Losses: `loss` returns a scalar mean over the batch's examples and scalar auxiliary metrics. Gradient
accumulation over equal microbatches then averages to the large-batch gradient. A loss that is not a
per-example mean (in-batch negatives, say) sets `loss_is_example_mean = False`: the trainer refuses
`grad_accum_steps > 1` for it, and the task may override `value_and_grad` to accumulate in its own
way (`losses.contrastive_grad_cache` computes the full-batch gradient chunk by chunk).

Model state: a family whose model has variables that are not trained by gradients (flax collections other
than 'params': BatchNorm's running statistics, spectral-norm power-iteration vectors) returns them from
`init_model_state`. The trainer then keeps them in `TrainState.model_state` (checkpointed, and sharded by
their logical boxes like the parameters; unboxed leaves are replicated), passes them to
`stateful_value_and_grad`, keeps what it returns (the old state after a non-finite step), threads them
through the microbatches of an accumulated step in order, and gives them to `eval_sums` and
`final_report` as the keyword `model_state=` (only to a task that has them, so other tasks' signatures
are unchanged). The EMA parameters are evaluated with the same model state.

Multi-process runs call every method on every process with global arrays, except `final_report`,
which process 0 calls alone with host-local NumPy parameters (`train_lib.sharding.host_local`), so it
may run any local computation but no collective.
"""
from __future__ import annotations

import functools
from typing import Any, ClassVar, Iterable, Protocol, runtime_checkable

import flax.linen as nn
import jax

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@runtime_checkable
class Task(Protocol):
    """What the generic stack calls. See the module docstring for the order and the conventions."""

    # Class attributes: known before a task exists (the CLIs read them before JAX starts a backend).
    xla_cpu_flags: ClassVar[dict[str, str]]  # XLA:CPU flags measured to help this family (train_lib.xla_flags)
    description: ClassVar[str]  # what a workdir of this task holds, in a few words (used in CLI errors)
    commands: ClassVar[tuple[str, ...]]  # the family's CLIs (module names) that read this task's workdirs
    loss_is_example_mean: ClassVar[bool]  # False: the trainer refuses gradient accumulation

    config: Any  # the experiment config
    has_final_report: bool  # whether final_report has anything to say (else the parameters are not gathered)
    throughput_unit: str  # what a batch is counted in: 'tokens', 'images', 'examples'
    units_per_batch: int  # throughput units in one global batch
    compute_dtype: str  # dtype of the model's matmuls ('float32', 'bfloat16'): the MFU peak is measured in it

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes and dtypes of one global batch of `batch_size` examples."""

    def init_params(self, rng: jax.Array, batch: Batch) -> Any:
        """Parameters, boxed with their logical axis names (`nn.with_logical_partitioning`)."""

    def loss(self, params: Any, batch: Batch, rng: jax.Array, *, train: bool) -> tuple[jax.Array, Metrics]:
        """(scalar loss, {name: scalar}) on a batch; a mean over examples unless `loss_is_example_mean` is False."""

    def init_model_state(self, rng: jax.Array, batch: Batch) -> Any:
        """The non-gradient variables (e.g. {'batch_stats': ...}), from the same key as `init_params`; None for none."""

    def value_and_grad(self, params: Any, batch: Batch, rng: jax.Array) -> tuple[tuple[jax.Array, Metrics], Any]:
        """((loss, aux), gradient w.r.t. params) of the training loss on one (micro)batch."""

    def stateful_value_and_grad(self, params: Any, model_state: Any, batch: Batch, rng: jax.Array,
                                step: jax.Array) -> tuple[tuple[tuple[jax.Array, Metrics], Any], Any]:
        """(((loss, aux), grads), the model state after this (micro)batch) at optimizer step `step` (an int32
        scalar: e.g. a KL warm-up's position). What the trainer calls; by default `value_and_grad`, the model
        state (None) unchanged."""

    def post_update(self, before: Any, after: Any, step: jax.Array) -> Any:
        """The parameters the step keeps, from those `before` and `after` the optimizer update: a change that
        is not a gradient step, e.g. BYOL's EMA target network, τ·target + (1 − τ)·online (inside the jitted
        step, on every process; a non-finite step still keeps `before`)."""

    def eval_sums(self, params: Any, batch: Batch) -> Metrics:
        """{name: scalar} sums over one eval batch, including 'count'; summed over the eval batches."""

    def summarize_eval(self, sums: dict[str, float]) -> dict[str, float]:
        """The eval metrics from the sums over all eval batches (float64 on the host)."""

    def datasets(self, rows: tuple[int, int]) -> tuple[Any, Iterable, dict[str, Any]]:
        """(train grain IterDataset (checkpointable), eval batches, {name: value} logged at start) holding
        rows `[start, stop)` of every global batch: those this process's devices hold."""

    def model_flops_per_step(self) -> float:
        """Model FLOPs of one training step on a global batch (for MFU; `train_lib.flops`)."""

    def write_assets(self, workdir) -> None:
        """Writes (or, on resume, checks) what a workdir needs besides the checkpointed arrays to be read on its
        own, e.g. the tokenizer; process 0 only, before training. `read_assets` is its reader."""

    def read_assets(self, workdir) -> None:
        """Checks the workdir's assets against this task (`train_lib.checkpointing.restore_params` calls it)."""

    def pretrained_params(self) -> dict[str, Any] | None:
        """{'a/b/c': host array} of parameters to start a fresh run from (e.g. `config.init_from`), the rest
        keeping their initialisation (`train_lib.state.with_pretrained`); None for none. Every process calls it."""

    def final_report(self, params: Any) -> str:
        """Text printed at the end of a run, from host-local parameters (e.g. a sample); '' for none."""

    def benchmark_extras(self, params: Any, *, peak_flops: float, repeats: int, sample_steps: int,
                         sample_batch: int) -> dict[str, Any]:
        """Extra measurements of `train_lib.benchmark`, as JSON values: e.g. the speed of a sampler run of
        `sample_steps` steps (0: skip) on `sample_batch` examples, timed `repeats` times."""

    def benchmark_rows(self, result: dict[str, Any]) -> list[tuple[str, str]]:
        """(label, text) rows of the benchmark table for what `benchmark_extras` measured."""


class TaskBase:
    """Defaults of the `Task` protocol; a family overrides what it needs."""

    xla_cpu_flags: ClassVar[dict[str, str]] = {}
    description: ClassVar[str] = "a trained model"
    commands: ClassVar[tuple[str, ...]] = ()
    loss_is_example_mean: ClassVar[bool] = True
    throughput_unit = "examples"
    compute_dtype = "float32"
    has_final_report = False

    def __init__(self, config):
        self.config = config
        self.batch_size = config.batch_size
        self.seed = config.seed
        self.eval_batches = config.eval_batches  # global batches per evaluation

    @property
    def units_per_batch(self) -> int:
        return self.batch_size

    def init_model_state(self, rng, batch):
        del rng, batch
        return None

    def value_and_grad(self, params, batch, rng):
        grad_fn = jax.value_and_grad(functools.partial(self.loss, train=True), has_aux=True)
        return grad_fn(params, batch, rng)

    def stateful_value_and_grad(self, params, model_state, batch, rng, step):
        del step
        return self.value_and_grad(params, batch, rng), model_state

    def post_update(self, before, after, step):
        del before, step
        return after

    def summarize_eval(self, sums: dict[str, float]) -> dict[str, float]:
        """Means per counted example: every sum divided by sums['count']."""
        return {name: value / sums["count"] for name, value in sums.items() if name != "count"}

    def model_flops_per_step(self) -> float:
        """3× the matrix-product FLOPs of the loss's forward pass, counted from its jaxpr
        (`train_lib.flops.count_matmul_flops`: the backward pass costs two matmuls per matmul)."""
        from train_lib import flops

        spec = self.batch_spec(self.batch_size)
        boxed = jax.eval_shape(self.init_params, jax.random.PRNGKey(0), spec)
        forward = lambda p, b, r: self.loss(nn.unbox(p), b, r, train=False)  # noqa: E731
        return 3.0 * flops.count_matmul_flops(forward, boxed, spec, jax.random.PRNGKey(0))

    def final_report(self, params) -> str:
        del params
        return ""

    def write_assets(self, workdir) -> None:
        del workdir

    def read_assets(self, workdir) -> None:
        del workdir

    def pretrained_params(self) -> dict[str, Any] | None:
        return None

    def benchmark_extras(self, params, *, peak_flops: float, repeats: int, sample_steps: int,
                         sample_batch: int) -> dict[str, Any]:
        del params, peak_flops, repeats, sample_steps, sample_batch
        return {}

    def benchmark_rows(self, result: dict[str, Any]) -> list[tuple[str, str]]:
        del result
        return []
