"""The Pallas GAU attention kernel's TPU (Mosaic) path inside GAU `base`'s train step on a v5e slice, against
the XLA path, at n = 2048 and 8192 (one sequence per chip, `scan_layers` for a short compile)."""
import pytest

from tests.pods.conftest import SLICE, assert_fits, compiled

pytestmark = pytest.mark.pods


def _step(n: int, impl: str) -> dict:
    return compiled("gau_lm.py:base", SLICE, batch_size=16, data__seq_len=n, model__scan_layers=True,
                    model__attention_impl=impl)


def test_pallas_kernel_compiles_for_tpu_and_needs_less_memory():
    from train_lib import pods

    for n in (2048, 8192):
        pallas = _step(n, "auto")  # 'auto' takes the kernel when compiling for a TPU
        assert_fits(pallas)
        xla = _step(n, "xla")
        if n == 2048:
            assert xla["fits"] and pallas["peak_memory_bytes"] < xla["peak_memory_bytes"]
        else:  # the XLA path's n × n scores of 24 layers exceed a v5e's HBM; the kernel's step fits
            assert not xla["fits"] and "HBM" in xla["compile_error"], pods.table_rows(xla)
            assert xla["temp_bytes"] > pallas["temp_bytes"]


def test_the_kernel_is_really_in_the_tpu_program():
    import jax
    import jax.numpy as jnp

    from models import backend
    from models.pallas_attention import blockwise_attention
    from train_lib import pods

    device = pods.topology(SLICE).devices[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    q = jax.ShapeDtypeStruct((1, 1024, 128), jnp.bfloat16, sharding=sharding)
    v = jax.ShapeDtypeStruct((1, 1024, 512), jnp.bfloat16, sharding=sharding)

    def loss(q, k, v):
        return blockwise_attention(q, k, v, normalizer="softmax_plus", causal=True).astype(jnp.float32).sum()

    with backend.compiling_for("tpu"):
        hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, q, v).compile().as_text()
    assert hlo.count('custom_call_target="tpu_custom_call"') == 3  # forward, dK/dV, dQ: Mosaic kernels
