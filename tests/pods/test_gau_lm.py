"""GAU `base` (causal LM) and GAU-α `base,gau_alpha` (masked LM) compiled for a 16-chip slice and a 256-chip
v5e pod, data-parallel as their config says."""
import pytest

from tests.pods.conftest import POD, SLICE, assert_arguments_are_the_sharded_state, assert_fits, \
    assert_only_gradient_all_reduce, compiled

pytestmark = pytest.mark.pods

SPECS = ["gau_lm.py:base", "gau_lm.py:base,gau_alpha"]


@pytest.mark.parametrize("spec", SPECS)
def test_fits_and_shards_as_the_rules_say(spec):
    for result in (compiled(spec, SLICE), compiled(spec, POD, batch_size=128 * 16)):
        assert result["platform"] == "tpu" and result["chip"] == "v5e"
        assert result["mesh"] == {"data": result["chips"], "fsdp": 1, "model": 1}
        assert_fits(result)
        # Data parallel only: every chip holds the whole state (parameters, AdamW's μ and ν, the EMA).
        assert result["state_bytes_per_chip"] == result["state_bytes"] >= 4 * 4 * result["params"]
        assert_arguments_are_the_sharded_state(result)


@pytest.mark.parametrize("spec", SPECS)
def test_256_chips_add_only_the_gradient_all_reduce(spec):
    """The same per-chip work on 16 and 256 chips: the pod's step differs by the width of its one
    all-reduce (bf16 gradients, the compute dtype of `base`), not by any new collective or more bytes."""
    small, pod = compiled(spec, SLICE), compiled(spec, POD, batch_size=128 * 16)
    for result in (small, pod):
        assert_only_gradient_all_reduce(result, compute_bytes=2)
    assert pod["collectives"]["all-reduce"]["bytes"] == small["collectives"]["all-reduce"]["bytes"]
    assert pod["flops_per_chip"] == pytest.approx(small["flops_per_chip"], rel=0.01)
    assert pod["peak_memory_bytes"] == pytest.approx(small["peak_memory_bytes"], rel=0.05)


def test_fsdp_shards_the_state_over_the_pod():
    """`mesh.fsdp` = 16 on the pod: the parameters and optimizer state are split 16 ways over 'embed' (the
    rules' FSDP axis), so a chip holds ≈ 1/16 of the state, and the step gathers parameters and scatters
    gradients instead of all-reducing them."""
    result = compiled("gau_lm.py:base", POD, batch_size=128 * 16, mesh__data=16, mesh__fsdp=16,
                      model__scan_layers=True)
    assert result["mesh"] == {"data": 16, "fsdp": 16, "model": 1}
    assert_fits(result)
    assert result["state_bytes_per_chip"] == pytest.approx(result["state_bytes"] / 16, rel=0.02)
    assert_arguments_are_the_sharded_state(result)
    found = result["collectives"]
    assert found["all-gather"]["count"] + found["collective-permute"]["count"] > 0, found
