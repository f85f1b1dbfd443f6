r"""TPU pods from a laptop: compile a train step for a real TPU topology ahead of time, and read what it needs.

libtpu (the `tpu` extra: `pip install -e '.[tpu]'`) describes any TPU slice without one being attached:
`jax.experimental.topologies.get_topology_desc(platform="tpu", topology_name="v5e:16x16")` gives the 256
devices of a v5e pod (with their hosts) on a CPU-only machine. The trainer's own Plan is built over those
devices (`trainer.plan_for(config, devices=...)`: the config's mesh, rules, shardings, donation, optimizer),
the step is traced as on a TPU (`models.backend.compiling_for("tpu")`: 'auto' attention takes the Pallas
kernel, which Mosaic compiles) and libtpu's compiler produces the real executable, from shapes alone. What
it reports (`analyse`) is XLA's, per chip:

  memory      `memory_analysis()`: arguments, outputs, temporaries, less what outputs reuse of donated
              arguments; against the chip's HBM (`CHIPS`).
  cost        `cost_analysis()`: FLOPs and HBM bytes accessed of one chip's program (counting recomputation
              under remat and elementwise work, so more than the model FLOPs). It counts a loop body once:
              under `scan_layers` it sees one layer of the stack. When its FLOPs are below half the model's
              (counted, `train_lib.flops`) per chip, its counts are not the step's: the roofline is then the
              model FLOPs at peak alone, with no MFU estimate (`roofline_bound` and `mfu_estimate` None;
              compile unrolled for them).
  collectives every all-reduce, all-gather, reduce-scatter, all-to-all and collective-permute in the
              optimized HLO, with the bytes each produces on a chip. Counted as written: a collective in a
              loop body (`scan_layers`) counts once however many times the loop runs.
  roofline    an estimate, not a measurement: step time ≥ max(FLOPs / peak bf16 FLOP/s, bytes / HBM
              bandwidth) from the chip's published figures, ignoring communication (which XLA overlaps
              with compute where it can) and every other inefficiency; MFU estimate = model FLOPs per chip /
              peak / that time. A real step is slower; the estimate bounds it and compares layouts.

    python -m train_lib.benchmark --config=experiments/gau_lm.py:base --compile_only --topology=v5e:4x4

MaxText (`train_compile.py`) and axlearn (`run_aot_compilation`) compile ahead of time the same way.
"""
from __future__ import annotations

import collections
import dataclasses
import importlib.util
import math
import os
import re
from typing import Any

import jax

from train_lib.config_lib import ConfigError

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published figures of one TPU chip (Google Cloud's TPU system-architecture pages for each version)."""

    name: str
    hbm_bytes: int
    peak_bf16_flops: float  # per chip, FLOP/s
    hbm_bytes_per_s: float


# Cloud TPU documentation, "TPU v4" / "TPU v5e" / "TPU v5p" / "TPU v6e" (system architecture tables):
# v4 275 TFLOP/s, 32 GiB at 1,200 GB/s; v5e 197 TFLOP/s, 16 GB at 819 GB/s; v5p 459 TFLOP/s, 95 GB at
# 2,765 GB/s; v6e 918 TFLOP/s, 32 GB at 1,638 GB/s. Capacities are taken as GiB, as libtpu reports them.
CHIPS = {
    "v4": Chip("v4", 32 * GiB, 275e12, 1200e9),
    "v5e": Chip("v5e", 16 * GiB, 197e12, 819e9),
    "v5p": Chip("v5p", 95 * GiB, 459e12, 2765e9),
    "v6e": Chip("v6e", 32 * GiB, 918e12, 1638e9),
}
# libtpu's device_kind for each chip (topology names may also say e.g. 'v5litepod').
_DEVICE_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5": "v5p", "TPU v5p": "v5p",
                 "TPU v6 lite": "v6e", "TPU v6e": "v6e"}
EXAMPLE_TOPOLOGIES = ("v5e:4x4", "v5e:16x16", "v4:4x4x4", "v5p:4x4x4", "v6e:8x8")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as given, e.g. 'v5e:16x16'
    chip: Chip
    devices: tuple  # libtpu's device descriptions, one per chip
    num_hosts: int

    @property
    def num_chips(self) -> int:
        return len(self.devices)


def have_libtpu() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def prepare() -> None:
    """Before JAX starts a backend: run on the CPU and let libtpu describe topologies without a TPU attached
    (no metadata-server queries, quieter logs). A no-op for settings the user made."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # else libtpu logs an error for each topology
    os.environ.setdefault("TPU_WORKER_ID", "0")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling touches no chip: no lock on them needed
    os.environ.setdefault("TPU_STDERR_LOG_LEVEL", "3")
    os.environ.setdefault("TPU_MIN_LOG_LEVEL", "3")
    if not jax.config.jax_platforms:
        jax.config.update("jax_platforms", "cpu")


def topology(name: str) -> Topology:
    """The devices of TPU topology `name` ('v5e:16x16', 'v4:4x4x4', ...), from libtpu. Raises ConfigError
    naming the flag if libtpu is missing or refuses the name."""
    if not have_libtpu():
        raise ConfigError(f"--topology={name}: compiling for a TPU needs libtpu; install the tpu extra "
                          "(pip install -e '.[tpu]', or make test-pods, which installs it)")
    prepare()
    from jax.experimental import topologies

    try:
        devices = tuple(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    except Exception as e:  # libtpu raises JaxRuntimeError / ValueError with its own message
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--topology={name}: libtpu refused it ({first}); a topology is CHIP:SHAPE, e.g. "
                          f"{', '.join(EXAMPLE_TOPOLOGIES)}") from e
    return Topology(name, chip_of(name, devices[0].device_kind), devices,
                    len({d.process_index for d in devices}))


def chip_of(name: str, device_kind: str) -> Chip:
    kind = name.split(":", 1)[0].lower()
    kind = kind if kind in CHIPS else _DEVICE_KINDS.get(device_kind)
    if kind is None:
        raise ConfigError(f"--topology={name}: no published figures for chip {device_kind!r} here "
                          f"(train_lib/pods.py CHIPS has {', '.join(CHIPS)})")
    return CHIPS[kind]


# --------------------------------------------------------------------------------------------------
# Reading the optimized HLO.
# --------------------------------------------------------------------------------------------------
_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]+m[0-9]+[a-z]*)?)\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*)$")
_OPCODE = re.compile(r"\s*([a-z][\w\-]*)\(")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")


def shape_bytes(text: str) -> int:
    """Bytes of the array shapes in an HLO type string ('bf16[768,256]{1,0}', or a tuple of them)."""
    total = 0.0
    for dtype, dims in _SHAPE.findall(text):
        if dtype.startswith("f8"):
            size = 1
        else:
            size = _DTYPE_BYTES.get(dtype)
        if size is None:
            continue
        total += size * math.prod(int(d) for d in dims.split(",") if d)
    return int(total)


def _split_type(rest: str) -> tuple[str, str]:
    """'(f32[2], f32[3]) all-reduce(...)' -> ('(f32[2], f32[3])', ' all-reduce(...)')."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[:i + 1], rest[i + 1:]
    cut = rest.find(" ")
    return (rest, "") if cut < 0 else (rest[:cut], rest[cut:])


def _family(opcode: str, tail: str) -> tuple[str | None, str]:
    """(collective family, 'op' | 'start' | 'done') of an instruction, or (None, '')."""
    if opcode in ("async-start", "async-done"):
        called = _CALLS.search(tail)
        name = called.group(1) if called else ""
        family = next((f for f in COLLECTIVES if name.startswith(f)), None)
        return family, opcode.split("-")[1]
    for family in COLLECTIVES:
        if opcode == family:
            return family, "op"
        if opcode == family + "-start":
            return family, "start"
        if opcode == family + "-done":
            return family, "done"
    return None, ""


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{family: {'count', 'bytes'}} of the collectives in an optimized HLO module, per chip.

    A synchronous op, or an async pair (`-start`/`-done`, `async-start` calling one), counts once; its
    bytes are what it produces on the chip (the `-done` result: the reduced, gathered, scattered or
    received array). Every computation is read, so ops in loop bodies and fusions count once each.
    """
    found = {family: {"count": 0, "bytes": 0} for family in COLLECTIVES}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        type_text, tail = _split_type(match.group(1))
        opcode = _OPCODE.match(tail)
        if not opcode:
            continue
        family, kind = _family(opcode.group(1), tail)
        if family is None:
            continue
        if kind in ("op", "start"):
            found[family]["count"] += 1
        if kind in ("op", "done"):
            found[family]["bytes"] += shape_bytes(type_text)
    return found


# --------------------------------------------------------------------------------------------------
# The report.
# --------------------------------------------------------------------------------------------------
class DoesNotFit(Exception):
    """libtpu's compiler refused the step for want of HBM (it checks at compile time, on a TPU target).
    Carries what the trainer had planned, so the report can still say what was asked for."""

    def __init__(self, message: str, *, task=None, plan=None, compile_s: float = 0.0):
        super().__init__(message)
        self.message, self.task, self.plan, self.compile_s = message, task, plan, compile_s
        match = _OUT_OF_MEMORY.search(message)
        self.temp_bytes = _bytes_of(*match.group(1, 2)) if match else None
        self.available_bytes = _bytes_of(*match.group(3, 4)) if match else None


_OUT_OF_MEMORY = re.compile(r"required for HLO temporaries \(([0-9.]+)([KMGT]?)\) exceeds available HBM "
                            r"\(([0-9.]+)([KMGT]?)\)")


def _bytes_of(value: str, unit: str) -> int:
    return int(float(value) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit])


def is_out_of_memory(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text and "memory" in text.lower()


def not_fitting_report(error: DoesNotFit, topo: Topology) -> dict[str, Any]:
    """The report of a step libtpu refused to compile for want of HBM (`fits` False, no cost or collectives)."""
    first = error.message.strip().splitlines()[0]
    result = {
        "topology": topo.name, "chip": topo.chip.name, "chips": topo.num_chips, "hosts": topo.num_hosts,
        "hbm_bytes": topo.chip.hbm_bytes, "fits": False, "compile_error": first,
        "temp_bytes": error.temp_bytes, "available_bytes": error.available_bytes,
    }
    if error.plan is not None:
        total, per_chip = state_bytes(error.plan.abstract_state, error.plan.state_shardings)
        result.update({"state_bytes": total, "state_bytes_per_chip": per_chip,
                       "batch_bytes_per_chip": state_bytes(error.plan.spec_batch, error.plan.batch_shardings)[1]})
    return result

def state_bytes(abstract_state: Any, shardings: Any) -> tuple[int, int]:
    """(bytes of a tree of arrays such as the train state, bytes of it one chip holds under `shardings`)."""
    total = per_chip = 0
    for leaf, sharding in zip(jax.tree.leaves(abstract_state), jax.tree.leaves(
            shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))):
        itemsize = leaf.dtype.itemsize
        total += math.prod(leaf.shape) * itemsize
        per_chip += math.prod(sharding.shard_shape(leaf.shape)) * itemsize
    return total, per_chip


def roofline(flops: float, bytes_accessed: float, chip: Chip) -> tuple[float, str]:
    """(estimated seconds, 'compute' | 'memory'): the larger of FLOPs at peak and bytes at HBM bandwidth."""
    compute_s, memory_s = flops / chip.peak_bf16_flops, bytes_accessed / chip.hbm_bytes_per_s
    return max(compute_s, memory_s), "compute" if compute_s >= memory_s else "memory"


def analyse(compiled, topo: Topology, *, model_flops_per_step: float, plan=None) -> dict[str, Any]:
    """What a compiled step needs per chip of `topo`: memory against HBM, cost, collectives, a roofline
    estimate of step time and MFU, and (with the trainer's `plan`) the train state's bytes per chip."""
    memory = compiled.memory_analysis()
    needed = int(memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
                 - memory.alias_size_in_bytes)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops, accessed = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    per_chip_model_flops = model_flops_per_step / topo.num_chips
    # Below half the model's count: a loop body counted once (unrolled steps count ≥ 0.9× the model's).
    loop_undercount = flops < 0.5 * per_chip_model_flops
    if loop_undercount:  # only the compute term is known: the model FLOPs at peak
        seconds, bound = per_chip_model_flops / topo.chip.peak_bf16_flops, None
    else:
        seconds, bound = roofline(flops, accessed, topo.chip)
    result = {
        "topology": topo.name, "chip": topo.chip.name, "chips": topo.num_chips, "hosts": topo.num_hosts,
        "hbm_bytes": topo.chip.hbm_bytes,
        "argument_bytes": int(memory.argument_size_in_bytes), "output_bytes": int(memory.output_size_in_bytes),
        "temp_bytes": int(memory.temp_size_in_bytes), "alias_bytes": int(memory.alias_size_in_bytes),
        "peak_memory_bytes": needed, "fits": needed <= topo.chip.hbm_bytes,
        "flops_per_chip": flops, "bytes_accessed_per_chip": accessed,
        "cost_counts_loops_once": loop_undercount,
        "collectives": collectives(compiled.as_text()),
        "roofline_step_s": seconds, "roofline_bound": bound,
        "mfu_estimate": (per_chip_model_flops / topo.chip.peak_bf16_flops / seconds
                         if seconds > 0 and not loop_undercount else None),
    }
    if plan is not None:
        total, per_chip = state_bytes(plan.abstract_state, plan.state_shardings)
        result.update({"state_bytes": total, "state_bytes_per_chip": per_chip,
                       "batch_bytes_per_chip": state_bytes(plan.spec_batch, plan.batch_shardings)[1]})
    return result


def describe_collectives(found: dict[str, dict[str, int]]) -> str:
    from train_lib.memory import describe_bytes

    parts = [f"{family} ×{v['count']} ({describe_bytes(v['bytes'])})" for family, v in found.items() if v["count"]]
    return ", ".join(parts) if parts else "none"


def table_rows(result: dict) -> list[tuple[str, str]]:
    """Rows of `train_lib.benchmark`'s table for a topology compile."""
    from train_lib import flops as flops_lib
    from train_lib.memory import describe_bytes

    rows = [("topology", f"{result['topology']}: {result['chips']} {result['chip']} chips, {result['hosts']} hosts")]
    if "compile_error" in result:
        rows.append(("memory / chip", f"DOES NOT FIT: libtpu's compiler refused the step ({result['compile_error']})"))
        if "state_bytes" in result:
            rows.append(("train state", f"{describe_bytes(result['state_bytes'])} in all, "
                                        f"{describe_bytes(result['state_bytes_per_chip'])} per chip"))
        return rows
    rows += [
        ("memory / chip", f"{describe_bytes(result['peak_memory_bytes'])} of {describe_bytes(result['hbm_bytes'])} "
                          f"HBM: {'fits' if result['fits'] else 'DOES NOT FIT'} (arguments "
                          f"{describe_bytes(result['argument_bytes'])}, outputs {describe_bytes(result['output_bytes'])}, "
                          f"temporaries {describe_bytes(result['temp_bytes'])}, donated "
                          f"{describe_bytes(result['alias_bytes'])})"),
    ]
    if "state_bytes" in result:
        rows.append(("train state", f"{describe_bytes(result['state_bytes'])} in all, "
                                    f"{describe_bytes(result['state_bytes_per_chip'])} per chip"))
    rows += [
        ("cost / chip", f"{flops_lib.describe(result['flops_per_chip'])}, "
                        f"{describe_bytes(result['bytes_accessed_per_chip'])} HBM traffic (XLA's cost analysis"
                        + ("; it counts a loop body once, so it is not the step's)"
                           if result["cost_counts_loops_once"] else ")")),
        ("collectives", describe_collectives(result["collectives"])),
    ]
    if result["mfu_estimate"] is None:
        rows.append(("roofline", f"≥ {1e3 * result['roofline_step_s']:.1f} ms per step (the model FLOPs at peak; "
                                 "no HBM term or MFU estimate: compile without scan_layers for them)"))
    else:
        rows.append(("roofline", f"≥ {1e3 * result['roofline_step_s']:.1f} ms per step ({result['roofline_bound']} "
                                 f"bound), MFU ≤ {100 * result['mfu_estimate']:.0f}% (an estimate from peak FLOP/s "
                                 "and HBM bandwidth; communication not counted)"))
    return rows
