"""models.layers.Dropout: its Threefry matches JAX's bit for bit, its mask is Bernoulli(1 − rate) and unbiased."""
import jax
import jax.extend.random as jax_random
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from models import layers


@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_threefry_is_jaxs_threefry_2x32_bit_for_bit(seed):
    rng = np.random.default_rng(seed)
    key = rng.integers(0, 2**32, 2, dtype=np.uint32)
    counters = rng.integers(0, 2**32, 2 * 1001, dtype=np.uint32)
    # JAX's reference hashes the first half of its input with the second half, pair by pair.
    expected = np.asarray(jax_random.threefry_2x32(jnp.asarray(key), jnp.asarray(counters)))
    x1, x2 = layers.threefry2x32((key[0], key[1]), jnp.asarray(counters[:1001]), jnp.asarray(counters[1001:]))
    np.testing.assert_array_equal(np.concatenate([x1, x2]), expected)


def _apply(rate, x, key, deterministic=False):
    return layers.Dropout(rate).apply({}, x, deterministic=deterministic, rngs={"dropout": key})


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_keep_fraction_is_one_minus_rate_and_the_output_is_unbiased(rate):
    n = 200_000
    out = np.asarray(_apply(rate, jnp.ones((n // 100, 100)), jax.random.PRNGKey(3)), np.float64)
    kept = out != 0
    p = 1.0 - rate
    sigma = np.sqrt(n * p * (1 - p))
    assert abs(kept.sum() - n * p) < 6 * sigma  # binomial count within 6σ
    np.testing.assert_allclose(out[kept], 1.0 / p, rtol=1e-6)  # kept elements scaled by 1/p
    assert abs(out.mean() - 1.0) < 6 * sigma / (n * p)  # E[dropout(x)] = x


def test_the_mask_depends_on_the_key_and_on_nothing_else():
    x = jnp.ones((64, 8, 8, 32))
    a = _apply(0.3, x, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(a, _apply(0.3, x, jax.random.PRNGKey(0)))
    assert float(jnp.mean(a != _apply(0.3, x, jax.random.PRNGKey(1)))) > 0.3  # ≈ 2·0.3·0.7 = 0.42 differ
    # Neighbouring elements, rows and the two halves of the counter stream are not correlated.
    kept = np.asarray(a != 0, np.float64).reshape(-1)
    for lag in (1, 32, kept.size // 2):
        assert abs(np.corrcoef(kept[:-lag], kept[lag:])[0, 1]) < 0.02
    # Any JAX key: typed threefry keys and other PRNG implementations.
    typed = _apply(0.3, x, jax.random.key(0))
    np.testing.assert_array_equal(typed, a)  # same key data as PRNGKey(0)
    rbg = _apply(0.3, x, jax.random.key(0, impl="rbg"))
    assert abs(float(jnp.mean(rbg != 0)) - 0.7) < 0.01


def test_the_mask_does_not_depend_on_how_the_array_is_sharded():
    x = jax.random.normal(jax.random.PRNGKey(0), (16, 6, 10))
    key = jax.random.PRNGKey(7)
    single = _apply(0.25, x, key)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    sharded_x = jax.device_put(x, NamedSharding(mesh, P("data")))
    sharded = jax.jit(lambda x, k: _apply(0.25, x, k))(sharded_x, key)
    assert len(sharded.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(sharded), np.asarray(single))


def test_gradient_is_the_mask_over_the_keep_probability():
    x = jax.random.normal(jax.random.PRNGKey(0), (50, 40))
    key = jax.random.PRNGKey(5)
    grad = jax.grad(lambda x: jnp.sum(_apply(0.2, x, key)))(x)
    kept = _apply(0.2, jnp.ones_like(x), key) != 0
    np.testing.assert_allclose(grad, np.where(kept, 1 / 0.8, 0.0), rtol=1e-6)


def test_identity_when_deterministic_or_rate_zero_zeros_at_rate_one_and_bad_rates_rejected():
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 5))
    key = jax.random.PRNGKey(1)
    np.testing.assert_array_equal(_apply(0.5, x, key, deterministic=True), x)
    np.testing.assert_array_equal(_apply(0.0, x, key), x)
    np.testing.assert_array_equal(_apply(1.0, x, key), np.zeros((4, 5)))
    with pytest.raises(ValueError, match=r"rate must be in \[0, 1\], got 1.5"):
        _apply(1.5, x, key)


def test_scalars_work_and_arrays_too_large_for_32_bit_counters_are_refused():
    kept = [bool(layers.dropout_keep_mask(jax.random.PRNGKey(i), (), 0.5)[0]) for i in range(40)]
    assert 5 < sum(kept) < 35
    with pytest.raises(ValueError, match=r"shape \(1, 4294967296\) has ≥ 2³² elements after its first axis"):
        layers.dropout_keep_mask(jax.random.PRNGKey(0), (1, 2**32), 0.1)
