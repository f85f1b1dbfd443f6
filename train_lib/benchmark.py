"""Time the real jitted train step of an experiment: `python -m train_lib.benchmark --config=FILE:VARIANT`.

    python -m train_lib.benchmark --config=experiments/gau_lm.py:flash_peer --steps=10
    python -m train_lib.benchmark --config=experiments/ddpm_digits.py:unet_peer
    python -m train_lib.benchmark --config=experiments/gau_lm.py:tiny --config.data.seq_len=2048

The step is the trainer's own (`trainer.make_plan`: same mesh, shardings, donation, gradient
accumulation and optimizer) on a real batch of the experiment's data. After compiling and `--warmup`
steps, each of `--steps` steps is timed to completion; the median is reported. A task may time more
(`Task.benchmark_extras`): for diffusion the sampler's step (one U-Net evaluation on `--sample_batch`
images inside the jitted `lax.scan` sampler of `--sample_steps` steps). Prints a table, then one JSON line:

    step_ms, tokens_per_sec | images_per_sec, model_flops_per_step (counted: `train_lib.flops`),
    peak_flops (a large matmul, measured in this run), mfu, peak_memory_bytes (XLA's buffer
    assignment for the step: arguments + outputs + temporaries − aliased), compile_s, ...

A/B mode, for changes smaller than the machine's drift between runs: `--ab='KEY=VALUE;KEY=VALUE'` also
compiles the step of the config with those overrides (B) and alternates timed steps of A and B in this
process, so both see the same machine. The table and the JSON line gain `ab_step_ms` (B's median),
`ab_ratio` (B's median / A's) and `ab_overrides`, e.g.

    python -m train_lib.benchmark --config=experiments/ddpm_digits.py:unet_peer --steps=30 --ab='model.dropout=0.0'

`--compile_only` compiles the step without initialising or running anything and reports the compile
time (trace + lower + compile) and XLA's peak memory per device; with `--ab`, B's too:

    python -m train_lib.benchmark --config=experiments/gau_lm.py:base --compile_only --ab='model.scan_layers=True'

`--topology=v5e:16x16` (any topology libtpu accepts; needs the `tpu` extra) compiles the same step for the
chips of that TPU slice instead of this machine's devices, with libtpu's compiler, and reports per chip:
memory against HBM, XLA's FLOPs and bytes, the collectives in the optimized HLO, and a roofline estimate of
step time and MFU (`train_lib.pods`). It implies `--compile_only`:

    python -m train_lib.benchmark --config=experiments/gau_lm.py:base --compile_only --topology=v5e:16x16 \
        --config.batch_size=2048

Nothing is written to disk. Numbers depend on what else the machine runs: benchmark on a quiet one.
"""
from __future__ import annotations

import json
import sys
import time

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from train_lib import cli, xla_flags

_CONFIG = None  # the --config flag, defined by _define_flags


def _define_flags() -> None:
    """Flags of the command line (defined when it runs, so other scripts can import this module)."""
    global _CONFIG
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file, e.g. "
                                              "experiments/gau_lm.py:flash_peer.", lock_config=True)
    flags.DEFINE_integer("steps", 10, "Timed train steps (the median is reported).")
    flags.DEFINE_integer("warmup", 2, "Untimed steps after compiling.")
    flags.DEFINE_integer("sample_steps", 10, "Tasks that sample (diffusion): steps of the timed sampler run "
                         "(0: skip).")
    flags.DEFINE_integer("sample_batch", None, "Tasks that sample: examples per sampler step (default: the "
                         "config's batch_size).")
    flags.DEFINE_bool("compile_only", False, "Only compile the train step (no state is initialised, nothing "
                      "runs): compile seconds and XLA's peak memory, e.g. for a model too large for this machine; "
                      "--steps, --warmup and --sample_steps do not apply.")
    flags.DEFINE_string("topology", None, "Compile for this TPU slice instead of the local devices, e.g. "
                        "v5e:4x4, v5e:16x16, v4:4x4x4 (needs libtpu: pip install -e '.[tpu]'); implies --compile_only.")
    flags.DEFINE_string("ab", None, "Overrides 'KEY=VALUE;KEY=VALUE' (Python literals) of a second config B whose "
                        "step is timed alternately with A's in this process (see the module docstring).")
    cli.define_distributed_flags()


def _compiled_step(config, *, abstract: bool = False, topology=None):
    """(task, plan, compiled train step, initial state, one global batch, compile seconds) for `config`.

    `abstract`: state and batch are shape/sharding stand-ins (nothing is initialised or read), for
    compiling a step too large to run here. `topology` (a `train_lib.pods.Topology`, abstract only): the
    plan is over its TPU chips and the step is traced and compiled for them. Compile seconds include
    tracing and lowering.
    """
    import contextlib

    from models import backend
    from train_lib import sharding, trainer  # after jax.distributed

    task, plan = trainer.plan_for(config, devices=None if topology is None else topology.devices)
    settings = plan.settings
    if abstract:
        batch = plan.abstract_batch()
    else:
        rows = sharding.local_rows(next(iter(plan.batch_shardings.values())), settings.batch_size)
        train_data, _, _ = task.datasets(rows)
        batch = sharding.make_global_batch(next(iter(train_data)), shardings=plan.batch_shardings,
                                           global_batch=settings.batch_size)
    target = contextlib.nullcontext() if topology is None else backend.compiling_for("tpu")
    with target, jax.set_mesh(plan.mesh), nn.logical_axis_rules(plan.rules):
        if abstract:
            state = plan.sharded_abstract_state()
        else:
            state = jax.jit(plan.init_fn, out_shardings=plan.state_shardings)(plan.rng, plan.spec_batch)
        start = time.perf_counter()
        try:
            step_fn = plan.jit_train_step(task).lower(state, batch).compile()
        except Exception as e:  # libtpu checks HBM at compile time: report it, as a result
            from train_lib import pods
            if topology is None or not pods.is_out_of_memory(e):
                raise
            raise pods.DoesNotFit(str(e), task=task, plan=plan, compile_s=time.perf_counter() - start) from e
        compile_s = time.perf_counter() - start
    return task, plan, step_fn, state, batch, compile_s


def _header(plan, name: str | None) -> dict:
    """What ran where: the first keys of both result dicts."""
    devices = plan.mesh.devices.flat
    return {"config": config_name() if name is None else name, "task": plan.settings.task,
            "platform": devices[0].platform, "devices": plan.mesh.size,
            "processes": len({d.process_index for d in devices}),
            "mesh": dict(plan.mesh.shape), "batch_size": plan.settings.batch_size, "params": plan.num_params}


def _timed(ab: list) -> float:
    """Runs one step of the A/B config `[step_fn, state, batch]` in place; returns its seconds."""
    start = time.perf_counter()
    ab[1], _ = ab[0](ab[1], ab[2])
    jax.block_until_ready(ab[1])
    return time.perf_counter() - start


def benchmark_train_step(config, *, steps: int = 10, warmup: int = 2, sample_steps: int = 10,
                         sample_batch: int | None = None, name: str | None = None,
                         ab_overrides: dict | None = None, with_rows: bool = False):
    """Measures the experiment's train step (and the task's extras, e.g. a sampler step); returns the
    result dict, and with `with_rows` also the task's rows for the table.

    With `ab_overrides` ({dotted key: value}), also times the step of the config with those overrides,
    alternating with this one's (`ab_step_ms`, `ab_ratio` = B / A).
    """
    from train_lib import flops, memory  # after jax.distributed

    ab_config = with_overrides(config, ab_overrides) if ab_overrides else None  # bad overrides fail before compiling
    task, plan, step_fn, state, batch, compile_s = _compiled_step(config)
    ab = None if ab_config is None else list(_compiled_step(ab_config)[2:5])  # [step_fn, state, batch]
    peak = flops.global_peak_flops(task.compute_dtype)
    flops_per_step = task.model_flops_per_step()
    with jax.set_mesh(plan.mesh), nn.logical_axis_rules(plan.rules):
        for _ in range(warmup):
            state, metrics = step_fn(state, batch)
            if ab is not None:
                _timed(ab)
        jax.block_until_ready(state if ab is None else (state, ab[1]))
        times, ab_times = [], []
        for i in range(steps):
            if ab is not None and i % 2 == 1:  # B first on odd steps: neither always runs right after the other
                ab_times.append(_timed(ab))
            start = time.perf_counter()
            state, metrics = step_fn(state, batch)
            jax.block_until_ready(state)
            times.append(time.perf_counter() - start)
            if ab is not None and i % 2 == 0:
                ab_times.append(_timed(ab))
        loss = float(metrics["loss"])
    step_s = float(np.median(times))
    result = {
        **_header(plan, name), "step_ms": 1e3 * step_s,
        "step_ms_min": 1e3 * min(times), "step_ms_max": 1e3 * max(times),
        f"{task.throughput_unit}_per_sec": task.units_per_batch / step_s,
        "model_flops_per_step": flops_per_step, "peak_flops": peak, "mfu": flops.mfu(flops_per_step, step_s, peak),
        "peak_memory_bytes": memory.needed_bytes(step_fn), "compile_s": compile_s, "loss": loss,
    }
    if ab is not None:
        ab_ms = 1e3 * float(np.median(ab_times))
        result.update({"ab_overrides": ab_overrides, "ab_step_ms": ab_ms, "ab_ratio": ab_ms / result["step_ms"]})
    result.update(task.benchmark_extras(state.params, peak_flops=peak, repeats=steps, sample_steps=sample_steps,
                                        sample_batch=sample_batch or plan.settings.batch_size))
    return (result, task.benchmark_rows(result)) if with_rows else result


def compile_train_step(config, *, name: str | None = None, ab_overrides: dict | None = None,
                       topology=None) -> dict:
    """Compiles the experiment's train step without running it (`--compile_only`): compile seconds, XLA's
    peak memory per device and the counted FLOPs. Nothing is initialised, so any size compiles on a CPU.
    With `ab_overrides`, the config with those overrides is compiled after it (`ab_compile_s`, ...).

    `topology` (a name such as 'v5e:16x16', or a `train_lib.pods.Topology`): compile for that TPU slice and
    add `train_lib.pods.analyse`'s per-chip report (B's under the key 'ab' with `ab_overrides`)."""
    from train_lib import memory, pods  # after jax.distributed

    if isinstance(topology, str):
        topology = pods.topology(topology)
    ab_config = with_overrides(config, ab_overrides, topology) if ab_overrides else None

    def compile_one(cfg) -> tuple:
        """(task, plan, compile seconds, peak memory, the topology report or {})."""
        try:
            task, plan, step_fn, _, _, compile_s = _compiled_step(cfg, abstract=True, topology=topology)
        except pods.DoesNotFit as e:  # only with a topology
            return e.task, e.plan, e.compile_s, None, pods.not_fitting_report(e, topology)
        report = {} if topology is None else pods.analyse(
            step_fn, topology, model_flops_per_step=task.model_flops_per_step(), plan=plan)
        return task, plan, compile_s, memory.needed_bytes(step_fn), report

    task, plan, compile_s, peak, report = compile_one(config)
    result = {**_header(plan, name), "model_flops_per_step": task.model_flops_per_step(),
              "peak_memory_bytes": peak, "compile_s": compile_s, **report}
    if ab_config is not None:
        _, _, ab_compile_s, ab_peak, ab_report = compile_one(ab_config)
        result.update({"ab_overrides": ab_overrides, "ab_compile_s": ab_compile_s, "ab_peak_memory_bytes": ab_peak})
        if topology is not None:
            result["ab"] = ab_report
    return result


def with_overrides(config, overrides: dict, topology=None):
    """A copy of `config` with `overrides` ({dotted key: value}) applied as `--config.KEY=VALUE` would, validated
    (for `topology`'s devices if given, else this machine's).

    Raises ConfigError naming `--ab` for an unknown key, a value of the wrong type or an invalid result.
    """
    from train_lib import config_lib, trainer

    copy = ml_collections.ConfigDict(config.to_dict())
    copy.lock()  # unknown keys raise, as on the command line
    try:
        config_lib.apply_overrides(copy, overrides)
        if topology is None:
            trainer.setup(copy)
        else:
            trainer.setup(copy, num_devices=topology.num_chips, num_processes=topology.num_hosts)
    except (KeyError, AttributeError, TypeError, ValueError) as e:
        raise config_lib.ConfigError(f"--ab: cannot apply {describe_overrides(overrides)!r} to the config: {e}") from e
    return copy


def describe_overrides(overrides: dict) -> str:
    return "; ".join(f"{k}={v!r}" for k, v in overrides.items())


def parse_overrides(text: str) -> dict:
    """'model.dropout=0.0;batch_size=32' -> {'model.dropout': 0.0, 'batch_size': 32} (values as Python
    literals; anything else, such as `flash`, as a string)."""
    import ast

    values = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            cli.fail(f"--ab: {item!r} is not KEY=VALUE (separate several with ';')")
        try:
            values[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            values[key.strip()] = value.strip()
    if not values:
        cli.fail("--ab: no KEY=VALUE given")
    return values


def config_name() -> str:
    return flags.FLAGS["config"].serialize().split("=", 1)[-1] if flags.FLAGS["config"].present else ""


def format_table(result: dict, extra_rows: list[tuple[str, str]] = ()) -> str:
    """The result as an aligned table; `extra_rows` are the task's (`Task.benchmark_rows`)."""
    from train_lib import flops

    unit = next(k for k in result if k.endswith("_per_sec") and not k.startswith("sample"))
    extra_rows = list(extra_rows)
    rows = [
        *_header_rows(result),
        ("train step", f"{result['step_ms']:.1f} ms median (min {result['step_ms_min']:.1f}, "
                       f"max {result['step_ms_max']:.1f}); compiled in {result['compile_s']:.1f} s"),
        (unit.replace("_", " "), f"{result[unit]:,.0f}"),
        ("model FLOPs / step", flops.describe(result["model_flops_per_step"])),
        ("matmul peak", flops.describe(result["peak_flops"], "FLOP/s")),
        ("MFU", f"{100 * result['mfu']:.1f}%"),
        ("peak memory (XLA)", _mebibytes(result["peak_memory_bytes"])),
    ]
    if "ab_step_ms" in result:
        rows += [("A/B", f"B ({describe_overrides(result['ab_overrides'])}): {result['ab_step_ms']:.1f} ms median, "
                         f"B/A = {result['ab_ratio']:.3f} "
                         f"(steps alternated in this process)")]
    return _aligned(rows + extra_rows)


def format_compile_table(result: dict) -> str:
    from train_lib import flops

    rows = [
        *_header_rows(result),
        ("model FLOPs / step", flops.describe(result["model_flops_per_step"])),
        ("compile (not run)", f"{result['compile_s']:.1f} s (trace + lower + compile)"),
        ("peak memory (XLA)", _mebibytes(result["peak_memory_bytes"])),
    ]
    if "topology" in result:
        from train_lib import pods
        rows += pods.table_rows(result)
    if "ab_compile_s" in result:
        rows += [("B compile", f"{describe_overrides(result['ab_overrides'])}: {result['ab_compile_s']:.1f} s, "
                               f"peak memory {_mebibytes(result['ab_peak_memory_bytes'])}")]
        if "ab" in result:
            rows += [(f"B {key}", value) for key, value in pods.table_rows(result["ab"])[1:]]
    return _aligned(rows)


def _header_rows(result: dict) -> list[tuple[str, str]]:
    mesh = ", ".join(f"{k}={v}" for k, v in result["mesh"].items())
    return [("config", result["config"]),
            ("devices", f"{result['devices']} {result['platform']} (mesh {mesh}), {result['processes']} process(es)"),
            ("parameters", f"{result['params']:,}")]


def _mebibytes(size: int | None) -> str:
    return "n/a" if size is None else f"{size / 2**20:,.1f} MiB"



def _aligned(rows) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str]) -> None:
    _define_flags()
    cli.parse_flags(argv)
    config = cli.load_config(_CONFIG)
    f = flags.FLAGS
    if f.steps < 1 or f.warmup < 0 or f.sample_steps < 0 or (f.sample_batch is not None and f.sample_batch < 1):
        cli.fail("--steps and --sample_batch must be ≥ 1, --warmup and --sample_steps ≥ 0")
    ab_overrides = parse_overrides(f.ab) if f.ab else None

    def body():
        from train_lib import pods, registry
        cli.setup_logging()
        if f.topology:  # one process compiles for the whole slice: no cluster, and the XLA:CPU flags do not apply
            pods.prepare()  # before JAX starts a backend
        else:
            xla_flags.apply_defaults(registry.task_class(config.task).xla_cpu_flags)  # before JAX starts a backend
            cli.initialize_distributed()
        if f.compile_only or f.topology:
            result = compile_train_step(config, ab_overrides=ab_overrides, topology=f.topology)
            table = format_compile_table(result)
        else:
            result, rows = benchmark_train_step(config, steps=f.steps, warmup=f.warmup, sample_steps=f.sample_steps,
                                                sample_batch=f.sample_batch, ab_overrides=ab_overrides,
                                                with_rows=True)
            table = format_table(result, rows)
        if jax.process_index() == 0:
            print(table)
            print(json.dumps(result), flush=True)

    cli.run_guarded(body)


if __name__ == "__main__":
    main(sys.argv)
