"""TPU pod compiles (`make test-pods`): the accelerator-sized experiments compiled with libtpu for real
topologies on this machine's CPU (`train_lib.pods`). Each test module compiles its configs once."""
import functools
import importlib
import json
import os

import pytest

from train_lib import benchmark, config_lib, pods

# The topologies of the tests: a 16-chip slice and a whole 256-chip v5e pod. Batches keep the experiment's
# per-chip batch: batch_size × 16 on the pod.
SLICE, POD = "v5e:4x4", "v5e:16x16"


@pytest.fixture(scope="session", autouse=True)
def _libtpu():
    if not pods.have_libtpu():
        pytest.fail("tests/pods compile for TPUs and need libtpu: pip install -e '.[tpu]' (make test-pods does)")


@functools.cache
def compiled(spec: str, topology: str, **overrides) -> dict:
    """`train_lib.benchmark.compile_train_step` of experiment `spec` ('gau_lm.py:base') with `overrides`
    (dotted keys) for `topology`: the report of `train_lib.pods.analyse` and the benchmark's header."""
    file, _, arg = spec.partition(":")
    module = importlib.import_module("experiments." + file.removesuffix(".py"))
    dotted = {k.replace("__", "."): v for k, v in overrides.items()}
    config = config_lib.apply_overrides(module.get_config(arg), dotted)
    result = benchmark.compile_train_step(config, name=spec, topology=topology)
    if os.environ.get("KEXUE_POD_REPORT"):  # one JSON line per compile, for README's table
        with open(os.environ["KEXUE_POD_REPORT"], "a") as f:
            f.write(json.dumps({"spec": spec, "topology": topology, "overrides": dotted, "result": result}) + "\n")
    return result


def assert_fits(result: dict) -> None:
    assert result["fits"] and result["peak_memory_bytes"] <= result["hbm_bytes"], pods.table_rows(result)


def assert_arguments_are_the_sharded_state(result: dict, slack: float = 0.03) -> None:
    """XLA's argument buffers of one chip are the train state and batch shards the plan's shardings give, up to
    TPU tile padding of small arrays (f32[768] takes 4 KiB, a scalar 512 B, a [6, 64] bias shard an (8, 128)
    tile): `slack` of the total, more where sharding cuts many small arrays into smaller shards."""
    expected = result["state_bytes_per_chip"] + result["batch_bytes_per_chip"]
    assert expected <= result["argument_bytes"] <= (1 + slack) * expected + 4 * 2**20, (
        expected, result["argument_bytes"])


def assert_only_gradient_all_reduce(result: dict, compute_bytes: int) -> None:
    """Data parallelism: the only collective is the all-reduce of the gradients (in the compute dtype,
    `compute_bytes` per parameter, or float32) and of the step's metrics."""
    found = result["collectives"]
    others = {k: v for k, v in found.items() if k != "all-reduce" and v["count"]}
    assert not others, others
    params = result["params"]
    assert compute_bytes * params * 0.98 <= found["all-reduce"]["bytes"] <= 4 * params + 2**20, found
