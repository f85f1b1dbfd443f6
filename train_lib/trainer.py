"""The training loop: one linear function in banner-commented sections (after big_vision's train.py).

setup (read and check the config; lock the workdir) → mesh, shapes and shardings (`jax.eval_shape`) →
data → compile the steps (and check they fit) → restore or initialise → loop (log, evaluate,
checkpoint) → wait for checkpoints and report.

The trainer knows no model family: it receives a `train_lib.task.Task` (from `config.task` through
`train_lib.registry`) and calls only the protocol's methods.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from train_lib import checkpointing, config_lib, flops, memory, optim, preemption, registry, sharding
from train_lib import state as state_lib
from train_lib.config_lib import ConfigError, TrainerSettings
from train_lib.metrics import MetricsWriter, ProgressBar, plot_curves
from train_lib.state import TrainState
from train_lib.task import TaskBase
from train_lib.workdir_lock import WorkdirLock

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or Inf loss or gradient at optimizer step `step`."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def _microbatches(batch: dict[str, jax.Array], num: int, batch_sharding_fn) -> dict[str, jax.Array]:
    """[B, ...] → [num, B/num, ...] taking every num-th row, so each device's rows split evenly."""
    def split(x):
        y = x.reshape((x.shape[0] // num, num) + x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(y, batch_sharding_fn(y.ndim))
    return jax.tree.map(split, batch)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, task, optimizer: optax.GradientTransformation,
               schedule: optax.Schedule, settings: TrainerSettings,
               microbatch_sharding) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a global batch (gradients accumulated over `grad_accum_steps` microbatches).

    Args:
      state: the current TrainState.
      batch: the global batch, sharded over the 'batch' logical axis.
      task: supplies `stateful_value_and_grad` (by default `jax.value_and_grad` of its loss, and the
        model state unchanged).
    Returns:
      (new state, scalar metrics). A non-finite loss or gradient leaves params, optimizer state, EMA and
      model state unchanged (the step counter still advances) and sets metrics['nonfinite'] to 1.
    """
    step_rng = jax.random.fold_in(state.rng, state.step)
    accum = settings.grad_accum_steps

    def value_and_grad(params, model_state, batch, rng):
        if settings.trainable:  # only the trainable parameters are differentiated (train_lib.optim's freezing)
            restricted = optim.restricted_value_and_grad(functools.partial(task.loss, train=True), settings.trainable)
            return restricted(params, batch, rng), model_state
        return task.stateful_value_and_grad(params, model_state, batch, rng, state.step)

    if accum == 1:
        ((loss, aux), grads), model_state = value_and_grad(state.params, state.model_state, batch, step_rng)
    else:
        # The model state (e.g. batch-norm statistics) passes through the microbatches in order.
        def accumulate(carry, inputs):
            sums, model_state = carry
            index, microbatch = inputs
            ((loss, aux), grads), model_state = value_and_grad(state.params, model_state, microbatch,
                                                               jax.random.fold_in(step_rng, index))
            return (jax.tree.map(jnp.add, sums, (loss, aux, grads)), model_state), None

        micro = _microbatches(batch, accum, microbatch_sharding)
        first = jax.tree.map(lambda x: x[0], micro)
        ((loss0, aux0), grads0), _ = jax.eval_shape(value_and_grad, state.params, state.model_state, first, step_rng)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss0, aux0, grads0))
        ((loss, aux, grads), model_state), _ = jax.lax.scan(accumulate, (zeros, state.model_state),
                                                            (jnp.arange(accum), micro))
        loss, aux, grads = jax.tree.map(lambda x: x / accum, (loss, aux, grads))
    if settings.nan_at_step >= 0:  # test-only fault injection: absent from the step unless configured
        poison = jnp.where(state.step == settings.nan_at_step, jnp.nan, 1.0)
        loss, grads = loss * poison, jax.tree.map(lambda g: g * poison, grads)

    grad_norm = optax.global_norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = task.post_update(state.params, optax.apply_updates(state.params, updates), state.step)
    ema_params = state.ema_params
    if ema_params is not None:
        ema_params = optim.update_ema(ema_params, params, state.step, settings.ema_decay)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                              opt_state=keep(opt_state, state.opt_state),
                              ema_params=keep(ema_params, state.ema_params),
                              model_state=keep(model_state, state.model_state))
    metrics = {"loss": loss, "grad_norm": grad_norm, "nonfinite": 1.0 - finite.astype(jnp.float32), **aux,
               "learning_rate": schedule(state.step)}
    return new_state, metrics


def evaluate(eval_step, params, eval_dataset, make_batch, task, model_state=None) -> dict[str, float]:
    """Sums the task's eval statistics over the eval batches and summarises them."""
    sums = None
    for local_batch in eval_dataset:
        batch_sums = eval_step(params, make_batch(local_batch), model_state)
        sums = batch_sums if sums is None else jax.tree.map(jnp.add, sums, batch_sums)
    return task.summarize_eval({k: float(v) for k, v in jax.device_get(sums).items()})


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a config runs on this mesh, before anything is allocated: what the trainer and the
    benchmark (`train_lib.benchmark`) share."""

    settings: TrainerSettings
    mesh: jax.sharding.Mesh
    rules: tuple
    batch_shardings: dict[str, jax.sharding.NamedSharding]
    microbatch_sharding: Any  # ndim -> NamedSharding of [microbatch, batch, ...]
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    rng: jax.Array
    spec_batch: dict[str, jax.ShapeDtypeStruct]
    init_fn: Any  # (rng, batch) -> TrainState
    abstract_state: TrainState
    state_shardings: Any
    num_params: int

    @property
    def param_shardings(self) -> Any:
        return self.state_shardings.params

    @property
    def replicated(self) -> jax.sharding.NamedSharding:
        return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

    def sharded_abstract_state(self) -> TrainState:
        """The state as ShapeDtypeStructs carrying their shardings (what a restore or a compile needs)."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            self.abstract_state, self.state_shardings)

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.batch_shardings[k])
                for k, v in self.spec_batch.items()}

    def jit_train_step(self, task):
        """The jitted train step with explicit shardings; the state is donated (updated in place) and the
        metrics are replicated, so every process can read them."""
        return jax.jit(functools.partial(train_step, task=task, optimizer=self.optimizer, schedule=self.schedule,
                                         settings=self.settings, microbatch_sharding=self.microbatch_sharding),
                       in_shardings=(self.state_shardings, self.batch_shardings),
                       out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,))

    def jit_eval_step(self, task):
        """(params, batch, model_state) -> the task's eval sums; `model_state=` reaches only a task that has one."""
        def eval_sums(params, batch, model_state):
            if model_state is None:
                return task.eval_sums(params, batch)
            return task.eval_sums(params, batch, model_state=model_state)

        return jax.jit(eval_sums, in_shardings=(self.param_shardings, self.batch_shardings,
                                                self.state_shardings.model_state),
                       out_shardings=self.replicated)

    def compile_train_step(self, task):
        """The train step compiled from shapes alone (nothing allocated yet)."""
        return self.jit_train_step(task).lower(self.sharded_abstract_state(), self.abstract_batch()).compile()


def make_plan(settings: TrainerSettings, task, optimizer, schedule, mesh_shape: dict[str, int],
              devices=None) -> Plan:
    """Mesh (over `devices`, default all), logical-axis rules (parallelism is data in the config), shapes and
    shardings of everything."""
    mesh = sharding.make_mesh(mesh_shape, devices)
    rules = settings.logical_axis_rules
    spec_batch = task.batch_spec(settings.batch_size)
    batch_shardings = {k: sharding.batch_sharding(mesh, rules, v.ndim) for k, v in spec_batch.items()}
    microbatch_sharding = lambda ndim: jax.sharding.NamedSharding(  # noqa: E731
        mesh, nn.logical_to_mesh_axes((None, "batch") + (None,) * (ndim - 2), rules))
    rng = jax.random.PRNGKey(settings.seed)
    ema = settings.ema_decay > 0
    boxed = state_lib.abstract_boxed(task, optimizer, ema=ema, batch_size=settings.batch_size, seed=settings.seed)
    state_shardings = sharding.state_shardings(boxed, mesh, rules)
    abstract_state = state_lib.unbox(boxed)
    sharding.check_divisible(abstract_state, state_shardings, mesh)
    init_fn = functools.partial(state_lib.init, task=task, optimizer=optimizer, ema=ema)
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state.params))
    return Plan(settings, mesh, rules, batch_shardings, microbatch_sharding, optimizer, schedule, rng, spec_batch,
                init_fn, abstract_state, state_shardings, num_params)


def setup(config, *, num_devices: int | None = None, num_processes: int | None = None):
    """Reads and checks the whole config before anything compiles: (settings, task, optimizer, schedule,
    mesh shape). Every key must be read by the trainer, the task or the optimizer (`ReadRecorder`)."""
    recorder = config_lib.ReadRecorder(config)
    view = recorder.config
    settings = config_lib.trainer_settings(view)
    mesh_shape = config_lib.resolve_mesh_shape(settings.mesh, num_devices or jax.device_count())
    config_lib.validate_batch(settings, mesh_shape, num_processes or jax.process_count())
    task = registry.make_task(view)
    if settings.grad_accum_steps > 1 and not task.loss_is_example_mean:
        raise ConfigError(f"config: task {settings.task!r} has a loss that is not a mean over examples (e.g. "
                          "in-batch negatives), so accumulating microbatch gradients would change it; set "
                          "grad_accum_steps=1 and lower batch_size, or use the task's own chunked gradient")
    schedule = optim.learning_rate_schedule(view.optimizer, settings.total_steps)
    optimizer = optim.make_optimizer(view.optimizer, settings.total_steps, schedule)
    trainable = optim.trainable_patterns(view.optimizer)
    if trainable:
        if (type(task).value_and_grad is not TaskBase.value_and_grad
                or type(task).stateful_value_and_grad is not TaskBase.stateful_value_and_grad):
            raise ConfigError(f"config: task {settings.task!r} computes its own gradients, so 'optimizer.trainable' "
                              "cannot restrict them; train every parameter (optimizer.trainable=())")
        spec = task.batch_spec(settings.batch_size)
        count, total = optim.check_trainable(trainable, jax.eval_shape(task.init_params, jax.random.PRNGKey(0), spec))
        log.info("optimizer.trainable: %s of %s parameters train (%.2f%%)", f"{count:,}", f"{total:,}",
                 100 * count / max(total, 1))
        settings = dataclasses.replace(settings, trainable=trainable)
    recorder.check()
    return settings, task, optimizer, schedule, mesh_shape


def plan_for(config, devices=None) -> tuple[Any, Plan]:
    """(task, Plan) of `config` on this machine's devices, or on `devices` (e.g. a TPU topology's, to compile
    for it ahead of time: `train_lib.pods`), with as many processes as they have: `setup`, then `make_plan`."""
    num_processes = None if devices is None else len({d.process_index for d in devices})
    settings, task, optimizer, schedule, mesh_shape = setup(
        config, num_devices=None if devices is None else len(devices), num_processes=num_processes)
    return task, make_plan(settings, task, optimizer, schedule, mesh_shape, devices)


def train_and_evaluate(config, workdir: str, *, stop_at_step: int | None = None) -> dict[str, Any]:
    """Trains `config` in `workdir`, resuming from its newest checkpoint.

    Args:
      config: the experiment config (see experiments/common.py for the trainer's keys).
      workdir: where checkpoints, metrics.jsonl, curves.png, TensorBoard events and config.json go.
      stop_at_step: if set, checkpoint and return after this step, as a preempted run would; the
        schedule still follows `config.total_steps`, so a later run resumes exactly.
    Returns:
      {'eval': the last eval metrics, 'step': the last step trained, 'preempted': bool}.
    """
    # ----------------------------------------------------------------------------------------------
    # Setup: read and check everything that can be checked before compiling; one run per workdir.
    # ----------------------------------------------------------------------------------------------
    config_lib.check_stop_at_step(stop_at_step)
    settings, task, optimizer, schedule, mesh_shape = setup(config)
    workdir = config_lib.ensure_writable_dir(workdir)
    is_main = jax.process_index() == 0
    lock = WorkdirLock(workdir)
    _acquire_everywhere(lock)
    try:
        return _train(config, settings, task, optimizer, schedule, mesh_shape, workdir, is_main, stop_at_step)
    finally:
        lock.release()


def _acquire_everywhere(lock: WorkdirLock) -> None:
    """Process 0 takes the lock; every process learns whether it did (a collective), so all stop together."""
    error = None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except Exception as e:  # noqa: BLE001  (any failure here must reach the other processes too)
            error = e if isinstance(e, ConfigError) else ConfigError(
                f"--workdir: cannot take {lock.path}: {type(e).__name__}: {e}")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        busy = int(multihost_utils.broadcast_one_to_all(np.asarray(error is not None, np.int32)))
        if busy and error is None:
            error = ConfigError(f"--workdir: {str(lock.path.parent)!r} is in use by another run (process 0 "
                                "says which)")
    if error is not None:
        raise error


def _train(config, settings, task, optimizer, schedule, mesh_shape, workdir, is_main, stop_at_step):
    # ----------------------------------------------------------------------------------------------
    # Mesh, logical-axis rules, shapes and shardings (`jax.eval_shape`: nothing is allocated yet).
    # ----------------------------------------------------------------------------------------------
    plan = make_plan(settings, task, optimizer, schedule, mesh_shape)
    batch_shardings = plan.batch_shardings

    # ----------------------------------------------------------------------------------------------
    # Data: each process reads only the rows of each global batch that its devices hold.
    # ----------------------------------------------------------------------------------------------
    rows = sharding.local_rows(next(iter(batch_shardings.values())), settings.batch_size)
    train_data, eval_data, data_info = task.datasets(rows)
    train_iter = iter(train_data)
    make_batch = functools.partial(sharding.make_global_batch, shardings=batch_shardings,
                                   global_batch=settings.batch_size)
    flops_per_step = task.model_flops_per_step()
    # A quick peak for the live MFU (0.7 s on a 2-core CPU, where it stops at a 2048² product; the
    # benchmark's 0.2 s-per-product measurement would add 6 s to every start).
    peak_flops = flops.global_peak_flops(task.compute_dtype, min_seconds=0.05)

    with jax.set_mesh(plan.mesh), nn.logical_axis_rules(plan.rules):
        # ------------------------------------------------------------------------------------------
        # Compile the steps from shapes, and refuse a step that cannot fit before allocating anything.
        # ------------------------------------------------------------------------------------------
        train_step_fn = plan.compile_train_step(task)
        memory.check_fits(train_step_fn, what="config: the train step",
                          hint="lower batch_size or the example size (e.g. data.seq_len), add devices, shard "
                               "with mesh.fsdp/mesh.model, or set model.remat (and model.scan_layers)")
        eval_step_fn = plan.jit_eval_step(task)

        # ------------------------------------------------------------------------------------------
        # Restore the newest usable checkpoint, or initialise (sharded from the start).
        # ------------------------------------------------------------------------------------------
        checkpointer = checkpointing.Checkpointer(workdir / "checkpoints", keep=settings.keep_checkpoints)
        try:
            state = checkpointer.restore_newest_usable(plan.sharded_abstract_state(), train_iter)
        except checkpointing.CheckpointMismatchError:  # another run's checkpoints: never trained over
            checkpointer.close()
            raise
        except checkpointing.CheckpointError as error:
            if not (settings.start_fresh_if_checkpoints_unusable
                    and isinstance(error, checkpointing.NoUsableCheckpointError)):
                checkpointer.close()  # stops Orbax's background threads before the process exits
                raise
            log.warning("no usable checkpoint; starting from scratch as start_fresh_if_checkpoints_unusable asks")
            state = None
        resumed = state is not None
        if is_main:  # after the restore: a run refused for another config leaves the workdir's config.json alone
            (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
            task.write_assets(workdir)
        if state is None:
            state = jax.jit(plan.init_fn, out_shardings=plan.state_shardings)(plan.rng, plan.spec_batch)
            pretrained = task.pretrained_params()
            if pretrained:
                try:
                    state = state_lib.with_pretrained(state, pretrained)
                except ValueError as error:
                    checkpointer.close()
                    raise ConfigError(f"config: {error}") from None
        start_step = int(state.step)
        if start_step > settings.total_steps:
            checkpointer.close()
            raise ConfigError(f"--workdir: {str(workdir)!r} holds a checkpoint at step {start_step}, past this config's "
                              f"total_steps={settings.total_steps}; raise total_steps to continue it, or use a new "
                              "workdir")
        metrics_writer = MetricsWriter(workdir, enabled=is_main)
        metrics_writer.truncate_after(start_step)
        if is_main:
            log.info("devices: %d (%s), processes: %d, mesh: %s", jax.device_count(),
                     jax.devices()[0].platform, jax.process_count(), mesh_shape)
            log.info("task: %s, %s parameters, %s per step (peak %s/s); %s", settings.task, f"{plan.num_params:,}",
                     flops.describe(flops_per_step), flops.describe(peak_flops),
                     ", ".join(f"{key}: {value}" for key, value in data_info.items()))
            log.info("%s at step %d", "resuming" if resumed else "starting", start_step)

        def run_eval(step: int) -> dict[str, float]:  # on every process: the eval step is a collective
            results = evaluate(eval_step_fn, state.params, eval_data, make_batch, task, state.model_state)
            if state.ema_params is not None:
                ema = evaluate(eval_step_fn, state.ema_params, eval_data, make_batch, task, state.model_state)
                results.update({f"ema_{k}": v for k, v in ema.items()})
            metrics_writer.write(step, "eval", results)
            if is_main:
                plot_curves(workdir)
            return results

        # ------------------------------------------------------------------------------------------
        # Loop: log every log_every_steps, evaluate every eval_every_steps, checkpoint every
        # checkpoint_every_steps and at the end. A non-finite loss stops the run (or is skipped).
        # ------------------------------------------------------------------------------------------
        progress = ProgressBar(total=settings.total_steps, initial=start_step, unit=task.throughput_unit,
                               enabled=is_main)
        watcher = preemption.PreemptionWatcher().__enter__()
        pending: list[dict[str, jax.Array]] = []  # device metrics since the last log
        previous = None  # the last step's metrics, checked for non-finite values one step later
        eval_results: dict[str, float] = {}
        timer_start, timer_steps = None, 0
        last_step = settings.total_steps if stop_at_step is None else min(stop_at_step, settings.total_steps)
        last_step = max(last_step, start_step)  # a --stop_at_step the workdir is already past trains nothing
        preempted_by = None
        try:
            for step in range(start_step + 1, last_step + 1):
                state, metrics = train_step_fn(state, make_batch(next(train_iter)))
                # Check the previous step while this one runs: one step of lag keeps dispatch asynchronous.
                if previous is not None:
                    _check_finite(previous, step - 1, settings)
                previous = metrics
                pending.append(metrics)
                progress.update()
                if timer_start is None:  # time from the end of the first step
                    jax.block_until_ready(metrics["loss"])
                    timer_start, timer_steps = time.perf_counter(), 0
                else:
                    timer_steps += 1

                if step % settings.log_every_steps == 0 or step == last_step:
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
                if step % settings.eval_every_steps == 0 or step == settings.total_steps:
                    eval_results = run_eval(step)
                    progress.write(f"step {step}: eval " + ", ".join(f"{k}={v:.4f}" for k, v in eval_results.items()))
                    timer_start, timer_steps = time.perf_counter(), 0
                stop_now = watcher.should_stop(step)
                if step % settings.checkpoint_every_steps == 0 or step == last_step or stop_now:
                    _check_finite(metrics, step, settings)  # never checkpoint a step that failed
                    checkpointer.save(step, state, train_iter)
                if stop_now:
                    preempted_by, last_step = watcher.signal_name, step
                    break
            if previous is not None:
                _check_finite(previous, last_step, settings)
        finally:
            # --------------------------------------------------------------------------------------
            # Wait for the asynchronous checkpoint writes (also when stopping on an error).
            # --------------------------------------------------------------------------------------
            watcher.__exit__()
            progress.close()
            checkpointer.wait_until_finished()
            checkpointer.close()
            metrics_writer.close()

        # The parameters for the report are gathered to every host: a collective all processes join.
        finished = not preempted_by and last_step == settings.total_steps
        reporting = finished and task.has_final_report
        if reporting:
            params = sharding.host_local(state.ema_params if state.ema_params is not None else state.params)
            model_state = None if state.model_state is None else sharding.host_local(state.model_state)

    # ----------------------------------------------------------------------------------------------
    # Report: process 0 alone, outside the mesh (so its computations stay on its own devices), from
    # host-local parameters; the others wait for it in a barrier, not in JAX's shutdown (which times out).
    # ----------------------------------------------------------------------------------------------
    report = ""
    if finished and is_main:
        plot_curves(workdir)
        if reporting:
            report = (task.final_report(params) if model_state is None else
                      task.final_report(params, model_state=model_state))
    if reporting and jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("end-of-run report written")
    if preempted_by:
        log.warning("%s: stopped after step %d with a checkpoint; rerun the same command to continue",
                    preempted_by, last_step)
    elif not finished and stop_at_step < start_step:
        log.warning("--stop_at_step=%d: the workdir's newest checkpoint is at step %d already, so nothing was "
                    "trained; rerun without --stop_at_step to continue to %d", stop_at_step, start_step,
                    settings.total_steps)
    elif not finished:
        log.warning("--stop_at_step=%d: stopped after step %d of %d with a checkpoint; rerun the same command "
                    "without --stop_at_step to continue", stop_at_step, last_step, settings.total_steps)
    elif is_main:
        print(f"{report}\n\n" if report else "", end="")
        print(f"metrics:     {workdir / 'metrics.jsonl'} (curves: {workdir / 'curves.png'})\n"
              f"tensorboard: {workdir / 'tensorboard'} (event files; view with `pip install tensorboard`, then "
              f"`tensorboard --logdir {workdir / 'tensorboard'}`)\ncheckpoints: {workdir / 'checkpoints'}")
    return {"eval": eval_results, "step": last_step, "preempted": bool(preempted_by)}


def _check_finite(metrics: dict[str, Any], step: int, settings: TrainerSettings) -> None:
    """Raises NonFiniteLossError if `step` was non-finite, unless the config skips such steps."""
    if not settings.skip_nonfinite_steps and float(metrics["nonfinite"]) > 0:
        raise NonFiniteLossError(f"non-finite loss or gradient at step {step} (loss={float(metrics['loss'])}); "
                                 "its update was not applied and the newest checkpoint is the last good one", step)
