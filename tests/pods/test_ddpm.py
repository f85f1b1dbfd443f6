"""The DDPM paper's CIFAR-10 U-Net (`ddpm_digits.py:cifar10`, float32, batch 128) compiled for a 16-chip slice
and a 256-chip v5e pod. A compile reads no data, so `data.path` need only be set."""
import pytest

from tests.pods.conftest import POD, SLICE, assert_arguments_are_the_sharded_state, assert_fits, \
    assert_only_gradient_all_reduce, compiled

pytestmark = pytest.mark.pods

SPEC = "ddpm_digits.py:cifar10"
PATH = "cifar-10-batches-py"


def test_fits_shards_and_adds_only_the_gradient_all_reduce():
    small = compiled(SPEC, SLICE, data__path=PATH)
    pod = compiled(SPEC, POD, data__path=PATH, batch_size=128 * 16)
    for result in (small, pod):
        assert result["mesh"] == {"data": result["chips"], "fsdp": 1, "model": 1}
        assert_fits(result)
        assert result["state_bytes_per_chip"] == result["state_bytes"] >= 4 * 4 * result["params"]  # + Adam, EMA
        assert_arguments_are_the_sharded_state(result)
        assert_only_gradient_all_reduce(result, compute_bytes=4)  # float32 gradients
    assert pod["collectives"]["all-reduce"]["bytes"] == small["collectives"]["all-reduce"]["bytes"]
    assert pod["peak_memory_bytes"] == pytest.approx(small["peak_memory_bytes"], rel=0.05)
