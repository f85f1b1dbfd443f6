"""RoFormer-base masked-LM pretraining (`char_mlm.py:base`: 12 layers, 768, bf16, length 512, batch 256)
compiled for a 16-chip slice, data-parallel and FSDP × tensor-parallel, and for a 256-chip v5e pod."""
import pytest

from tests.pods.conftest import POD, SLICE, assert_arguments_are_the_sharded_state, assert_fits, \
    assert_only_gradient_all_reduce, compiled

pytestmark = pytest.mark.pods

SPEC = "char_mlm.py:base"


def test_data_parallel_on_16_and_256_chips():
    small, pod = compiled(SPEC, SLICE), compiled(SPEC, POD, batch_size=256 * 16)
    for result in (small, pod):
        assert result["mesh"] == {"data": result["chips"], "fsdp": 1, "model": 1}
        assert_fits(result)
        assert result["state_bytes_per_chip"] == result["state_bytes"]
        assert_arguments_are_the_sharded_state(result)
        assert_only_gradient_all_reduce(result, compute_bytes=2)  # bf16 gradients
    assert pod["collectives"]["all-reduce"]["bytes"] == small["collectives"]["all-reduce"]["bytes"]


def test_fsdp_and_tensor_parallel_shard_the_state_as_the_rules_say():
    """data 2 × fsdp 4 × model 2: experiments/text_common.py's rules put 'embed' on fsdp and heads, the FFN and
    the vocabulary on model, so every weight matrix is split 8 ways (norms and biases less: they are ≪ 1%)."""
    result = compiled(SPEC, SLICE, mesh__data=2, mesh__fsdp=4, mesh__model=2)
    assert result["mesh"] == {"data": 2, "fsdp": 4, "model": 2}
    assert_fits(result)
    assert result["state_bytes_per_chip"] == pytest.approx(result["state_bytes"] / 8, rel=0.02)
    # Split 8 ways, the norms' and biases' shards ([192], [6, 64], ...) each fill whole TPU tiles: ~10% more.
    assert_arguments_are_the_sharded_state(result, slack=0.15)
    found = result["collectives"]
    assert found["all-gather"]["count"] + found["collective-permute"]["count"] > 0, found
