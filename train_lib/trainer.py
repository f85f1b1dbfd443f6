"""The training loop: one linear function in banner-commented sections (after big_vision's train.py).

setup → mesh → task and data → shapes and shardings (`jax.eval_shape`) → jitted init → restore →
jitted train/eval steps → loop (log, evaluate, checkpoint) → wait for checkpoints and report.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from train_lib import checkpointing, config_lib, flops, optim, preemption, sharding, tasks
from train_lib.metrics import MetricsWriter, ProgressBar

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or Inf loss or gradient."""


@flax.struct.dataclass
class TrainState:
    """Everything that must be checkpointed to resume a run exactly."""

    step: jax.Array  # int32 scalar: optimizer steps taken (= batches consumed)
    params: Any
    opt_state: Any
    ema_params: Any  # None when config.ema_decay == 0
    rng: jax.Array  # base key; step t uses fold_in(rng, t), so resuming needs no RNG bookkeeping


def init_state(rng: jax.Array, batch: dict[str, jax.Array], *, task, optimizer, ema: bool) -> TrainState:
    params_rng, state_rng = jax.random.split(rng)
    params = nn.unbox(task.init_params(params_rng, batch))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      ema_params=jax.tree.map(jnp.copy, params) if ema else None, rng=state_rng)


def _microbatches(batch: dict[str, jax.Array], num: int, batch_sharding_fn) -> dict[str, jax.Array]:
    """[B, ...] → [num, B/num, ...] taking every num-th row, so each device's rows split evenly."""
    def split(x):
        y = x.reshape((x.shape[0] // num, num) + x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(y, batch_sharding_fn(y.ndim))
    return jax.tree.map(split, batch)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, task, optimizer, config,
               microbatch_sharding) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a global batch (gradients accumulated over `grad_accum_steps` microbatches).

    Args:
      state: the current TrainState.
      batch: the global batch, sharded over the 'batch' logical axis.
    Returns:
      (new state, scalar metrics). A non-finite loss or gradient leaves params, optimizer state and EMA
      unchanged (the step counter still advances) and sets metrics['nonfinite'] to 1.
    """
    step_rng = jax.random.fold_in(state.rng, state.step)
    poison = jnp.where(state.step == config.debug.nan_at_step, jnp.nan, 1.0)  # fault injection for tests

    def loss_fn(params, microbatch, rng):
        loss, aux = task.loss(params, microbatch, rng, train=True)
        return loss * poison, aux

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    accum = config.grad_accum_steps
    if accum == 1:
        (loss, aux), grads = grad_fn(state.params, batch, step_rng)
    else:
        def accumulate(carry, inputs):
            index, microbatch = inputs
            (loss, aux), grads = grad_fn(state.params, microbatch, jax.random.fold_in(step_rng, index))
            return jax.tree.map(jnp.add, carry, (loss, aux, grads)), None

        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, state.params, batch, step_rng))
        zeros = (zeros[0][0], zeros[0][1], zeros[1])
        micro = _microbatches(batch, accum, microbatch_sharding)
        (loss, aux, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(accum), micro))
        loss, aux, grads = jax.tree.map(lambda x: x / accum, (loss, aux, grads))

    grad_norm = optax.global_norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = state.ema_params
    if ema_params is not None:
        ema_params = optim.update_ema(ema_params, params, state.step, config.ema_decay)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                              opt_state=keep(opt_state, state.opt_state),
                              ema_params=keep(ema_params, state.ema_params))
    metrics = {"loss": loss, "grad_norm": grad_norm, "nonfinite": 1.0 - finite.astype(jnp.float32), **aux,
               "learning_rate": optim.learning_rate_schedule(config)(state.step)}
    return new_state, metrics


def evaluate(eval_step, params, eval_dataset, make_batch, task) -> dict[str, float]:
    """Sums the task's eval statistics over the eval batches and summarises them."""
    sums = None
    for local_batch in eval_dataset:
        batch_sums = eval_step(params, make_batch(local_batch))
        sums = batch_sums if sums is None else jax.tree.map(jnp.add, sums, batch_sums)
    return task.summarize_eval({k: float(v) for k, v in jax.device_get(sums).items()})


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a config runs on this mesh, before anything is allocated: what the trainer and the
    benchmark (`train_lib.benchmark`) share."""

    mesh: jax.sharding.Mesh
    rules: tuple
    batch_shardings: dict[str, jax.sharding.NamedSharding]
    microbatch_sharding: Any  # ndim -> NamedSharding of [microbatch, batch, ...]
    optimizer: optax.GradientTransformation
    rng: jax.Array
    spec_batch: dict[str, jax.ShapeDtypeStruct]
    init_fn: Any  # (rng, batch) -> TrainState
    abstract_state: TrainState
    param_shardings: Any
    state_shardings: Any
    num_params: int

    def sharded_abstract_state(self) -> TrainState:
        """The state as ShapeDtypeStructs carrying their shardings (what a restore or a compile needs)."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            self.abstract_state, self.state_shardings)

    def jit_train_step(self, task, config):
        """The jitted train step with explicit shardings; the state is donated (updated in place)."""
        return jax.jit(functools.partial(train_step, task=task, optimizer=self.optimizer, config=config,
                                         microbatch_sharding=self.microbatch_sharding),
                       in_shardings=(self.state_shardings, self.batch_shardings),
                       out_shardings=(self.state_shardings, None), donate_argnums=(0,))

    def jit_eval_step(self, task):
        return jax.jit(task.eval_sums, in_shardings=(self.param_shardings, self.batch_shardings))


def make_plan(config, task, mesh_shape) -> Plan:
    """Mesh, logical-axis rules (parallelism is data in the config), shapes and shardings."""
    mesh = sharding.make_mesh(mesh_shape)
    rules = sharding.logical_rules(config)
    spec_batch = task.batch_spec(config.batch_size)
    batch_shardings = {k: sharding.batch_sharding(mesh, rules, v.ndim) for k, v in spec_batch.items()}
    microbatch_sharding = lambda ndim: jax.sharding.NamedSharding(  # noqa: E731
        mesh, nn.logical_to_mesh_axes((None, "batch") + (None,) * (ndim - 2), rules))
    optimizer = optim.make_optimizer(config)
    rng = jax.random.PRNGKey(config.seed)
    boxed_params = jax.eval_shape(task.init_params, rng, spec_batch)
    param_shardings = sharding.logical_shardings(boxed_params, mesh, rules)
    init_fn = functools.partial(init_state, task=task, optimizer=optimizer, ema=config.ema_decay > 0)
    abstract_state = jax.eval_shape(init_fn, rng, spec_batch)
    sharding.check_divisible(abstract_state.params, param_shardings, mesh)
    state_shardings = sharding.mirrored_shardings(abstract_state, abstract_state.params, param_shardings, mesh)
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state.params))
    return Plan(mesh, rules, batch_shardings, microbatch_sharding, optimizer, rng, spec_batch, init_fn,
                abstract_state, param_shardings, state_shardings, num_params)


def train_and_evaluate(config, workdir: str, *, stop_at_step: int | None = None) -> dict[str, Any]:
    """Trains `config` in `workdir`, resuming from its newest checkpoint.

    Args:
      config: the experiment config (see experiments/gau_lm.py for the keys).
      workdir: where checkpoints, metrics.jsonl, TensorBoard logs and config.json go.
      stop_at_step: if set, checkpoint and return after this step, as a preempted run would; the
        schedule still follows `config.total_steps`, so a later run resumes exactly.
    Returns:
      {'eval': the last eval metrics, 'step': the last step trained}.
    """
    # ----------------------------------------------------------------------------------------------
    # Setup: validate everything that can be validated before compiling.
    # ----------------------------------------------------------------------------------------------
    config_lib.validate_config(config)
    workdir = config_lib.ensure_writable_dir(workdir)
    is_main = jax.process_index() == 0
    mesh_shape = config_lib.resolve_mesh_shape(config.mesh, jax.device_count())
    config_lib.validate_batch(config, mesh_shape, jax.process_count())
    task = tasks.get_task(config)

    # ----------------------------------------------------------------------------------------------
    # Mesh, logical-axis rules, shapes and shardings (`jax.eval_shape`: nothing is allocated yet).
    # ----------------------------------------------------------------------------------------------
    plan = make_plan(config, task, mesh_shape)
    mesh, rules, batch_shardings = plan.mesh, plan.rules, plan.batch_shardings
    state_shardings, init_fn, rng = plan.state_shardings, plan.init_fn, plan.rng

    # ----------------------------------------------------------------------------------------------
    # Data: each process reads only the rows of each global batch that its devices hold.
    # ----------------------------------------------------------------------------------------------
    rows = sharding.local_rows(next(iter(batch_shardings.values())), config.batch_size)
    train_data, eval_data, data_info = task.datasets(rows)
    train_iter = iter(train_data)
    make_batch = functools.partial(sharding.make_global_batch, shardings=batch_shardings,
                                   global_batch=config.batch_size)
    flops_per_step = task.model_flops_per_step()
    # A quick peak for the live MFU (0.7 s on a 2-core CPU, where it stops at a 2048² product; the
    # benchmark's 0.2 s-per-product measurement would add 6 s to every start).
    peak_flops = flops.global_peak_flops(config.model.get("dtype", "float32"), min_seconds=0.05)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        # ------------------------------------------------------------------------------------------
        # Initialise (sharded from the start) or restore the newest checkpoint.
        # ------------------------------------------------------------------------------------------
        checkpointer = checkpointing.Checkpointer(workdir / "checkpoints", keep=config.keep_checkpoints)
        try:
            state = checkpointer.restore_newest_usable(plan.sharded_abstract_state(), train_iter)
        except checkpointing.CheckpointMismatchError:  # another run's checkpoints: never trained over
            checkpointer.close()
            raise
        except checkpointing.CheckpointError:
            if not config.get("start_fresh_if_checkpoints_unusable", False):
                checkpointer.close()  # stops Orbax's background threads before the process exits
                raise
            log.warning("no usable checkpoint; starting from scratch as start_fresh_if_checkpoints_unusable asks")
            state = None
        resumed = state is not None
        if is_main:  # after the restore: a run refused for another config leaves the workdir's config.json alone
            (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
        if state is None:
            state = jax.jit(init_fn, out_shardings=state_shardings)(rng, plan.spec_batch)
        start_step = int(state.step)
        metrics_writer = MetricsWriter(workdir, enabled=is_main)
        metrics_writer.truncate_after(start_step)
        if is_main:
            log.info("devices: %d (%s), processes: %d, mesh: %s", jax.device_count(),
                     jax.devices()[0].platform, jax.process_count(), mesh_shape)
            log.info("task: %s, %s parameters, %s per step (peak %s/s); %s", config.task, f"{plan.num_params:,}",
                     flops.describe(flops_per_step), flops.describe(peak_flops),
                     ", ".join(f"{key}: {value}" for key, value in data_info.items()))
            log.info("%s at step %d", "resuming" if resumed else "starting", start_step)

        # ------------------------------------------------------------------------------------------
        # Jitted steps with explicit shardings; the state is donated (updated in place).
        # ------------------------------------------------------------------------------------------
        jit_train_step, jit_eval_step = plan.jit_train_step(task, config), plan.jit_eval_step(task)

        def run_eval(step: int) -> dict[str, float]:
            results = evaluate(jit_eval_step, state.params, eval_data, make_batch, task)
            if state.ema_params is not None:
                ema = evaluate(jit_eval_step, state.ema_params, eval_data, make_batch, task)
                results.update({f"ema_{k}": v for k, v in ema.items()})
            metrics_writer.write(step, "eval", results)
            return results

        # ------------------------------------------------------------------------------------------
        # Loop: log every log_every_steps, evaluate every eval_every_steps, checkpoint every
        # checkpoint_every_steps and at the end. A non-finite loss stops the run (or is skipped).
        # ------------------------------------------------------------------------------------------
        progress = ProgressBar(total=config.total_steps, initial=start_step, unit=task.throughput_unit,
                               enabled=is_main)
        watcher = preemption.PreemptionWatcher().__enter__()
        pending: list[dict[str, jax.Array]] = []  # device metrics since the last log
        previous = None  # the last step's metrics, checked for non-finite values one step later
        eval_results: dict[str, float] = {}
        timer_start, timer_steps = None, 0
        last_step = config.total_steps if stop_at_step is None else min(stop_at_step, config.total_steps)
        preempted_by = None
        try:
            for step in range(start_step + 1, last_step + 1):
                state, metrics = jit_train_step(state, make_batch(next(train_iter)))
                # Check the previous step while this one runs: one step of lag keeps dispatch asynchronous.
                if previous is not None:
                    _check_finite(previous, step - 1, config)
                previous = metrics
                pending.append(metrics)
                progress.update()
                if timer_start is None:  # time from the end of the first (compiling) step
                    jax.block_until_ready(metrics["loss"])
                    timer_start, timer_steps = time.perf_counter(), 0
                else:
                    timer_steps += 1

                if step % config.log_every_steps == 0 or step == last_step:
                    host = jax.device_get(pending)
                    elapsed = time.perf_counter() - timer_start
                    throughput = timer_steps * task.units_per_batch / elapsed if timer_steps else float("nan")
                    summary = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
                    summary.update({f"{task.throughput_unit}_per_sec": throughput,
                                    "mfu": flops.mfu(flops_per_step, elapsed / timer_steps, peak_flops)
                                    if timer_steps else float("nan"),
                                    "learning_rate": float(host[-1]["learning_rate"])})
                    metrics_writer.write(step, "train", summary)
                    progress.show(summary["loss"], throughput)
                    pending = []
                    timer_start, timer_steps = time.perf_counter(), 0
                if step % config.eval_every_steps == 0 or step == config.total_steps:
                    eval_results = run_eval(step)
                    progress.write(f"step {step}: eval " + ", ".join(f"{k}={v:.4f}" for k, v in eval_results.items()))
                    timer_start, timer_steps = time.perf_counter(), 0
                stop_now = watcher.should_stop(step)
                if step % config.checkpoint_every_steps == 0 or step == last_step or stop_now:
                    _check_finite(metrics, step, config)  # never checkpoint a step that failed
                    checkpointer.save(step, state, train_iter)
                if stop_now:
                    preempted_by, last_step = watcher.signal_name, step
                    break
            if previous is not None:
                _check_finite(previous, last_step, config)
        finally:
            # ------------------------------------------------------------------------------------------
            # Wait for the asynchronous checkpoint writes (also when stopping on an error).
            # ------------------------------------------------------------------------------------------
            watcher.__exit__()
            progress.close()
            checkpointer.wait_until_finished()
            checkpointer.close()
            metrics_writer.close()
        if preempted_by:
            log.warning("%s: stopped after step %d with a checkpoint; rerun the same command to continue",
                        preempted_by, last_step)
            return {"eval": eval_results, "step": last_step, "preempted": True}
        if is_main and last_step == config.total_steps:
            report = task.final_report(state.ema_params if state.ema_params is not None else state.params)
            print(f"{report}\n\nmetrics:     {workdir / 'metrics.jsonl'}\ntensorboard: {workdir / 'tensorboard'}"
                  f"  (tensorboard --logdir {workdir / 'tensorboard'})\ncheckpoints: {workdir / 'checkpoints'}")
    return {"eval": eval_results, "step": last_step, "preempted": False}


def _check_finite(metrics: dict[str, Any], step: int, config) -> None:
    """Raises NonFiniteLossError if `step` was non-finite, unless the config skips such steps."""
    if not config.skip_nonfinite_steps and float(metrics["nonfinite"]) > 0:
        raise NonFiniteLossError(f"non-finite loss or gradient at step {step} (loss={float(metrics['loss'])}); "
                                 "its update was not applied and the newest checkpoint is the last good one")
