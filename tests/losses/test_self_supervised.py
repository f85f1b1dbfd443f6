"""SimSiam's negative cosine and its symmetric loss against float64 NumPy, and the stop-gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import losses


def _cosine64(p, z):
    p, z = np.asarray(p, np.float64), np.asarray(z, np.float64)
    return -np.sum(p * z, -1) / (np.linalg.norm(p, axis=-1) * np.linalg.norm(z, axis=-1))


def test_negative_cosine_matches_float64_and_byols_squared_distance():
    rng = np.random.default_rng(0)
    p, z = rng.normal(size=(2, 5, 7)).astype(np.float32), rng.normal(size=(2, 5, 7)).astype(np.float32)
    d = losses.negative_cosine_similarity(p, z)
    assert d.shape == (2, 5) and d.dtype == jnp.float32
    np.testing.assert_allclose(d, _cosine64(p, z), rtol=1e-5, atol=1e-6)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    byol = np.sum((unit(p.astype(np.float64)) - unit(z.astype(np.float64))) ** 2, -1)  # BYOL, Eq. 2
    np.testing.assert_allclose(byol, 2 + 2 * np.asarray(d, np.float64), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(losses.negative_cosine_similarity(p, 3.0 * p), -1.0, rtol=1e-6)
    assert float(losses.negative_cosine_similarity(np.zeros(3), np.ones(3))) == 0.0  # a zero vector: finite
    grad = jax.grad(lambda x: losses.negative_cosine_similarity(x, jnp.ones(3)))(jnp.zeros(3))
    assert bool(jnp.all(jnp.isfinite(grad)))  # and so is its gradient (the norm's is NaN at 0)
    assert losses.negative_cosine_similarity(p.astype(jnp.bfloat16), z).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="same shape"):
        losses.negative_cosine_similarity(p, z[..., :3])


def test_simsiam_loss_is_symmetric_and_stops_the_targets_gradient():
    rng = np.random.default_rng(1)
    p1, p2, z1, z2 = (jnp.asarray(rng.normal(size=(4, 6)), jnp.float32) for _ in range(4))
    value = losses.simsiam_loss(p1, p2, z1, z2)
    np.testing.assert_allclose(value, 0.5 * _cosine64(p1, z2) + 0.5 * _cosine64(p2, z1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(value, losses.simsiam_loss(p2, p1, z2, z1), rtol=1e-6)

    def total(z, stop):
        return jnp.sum(losses.simsiam_loss(p1, p2, z, z2, stop_gradient=stop))

    assert float(jnp.abs(jax.grad(total)(z1, True)).max()) == 0.0  # SimSiam: the target is a constant
    free = jax.grad(total)(z1, False)  # the ablation: d/dz₁ of ½D(p₂, z₁)
    reference = jax.grad(lambda z: jnp.sum(0.5 * losses.negative_cosine_similarity(p2, z)))(z1)
    np.testing.assert_allclose(free, reference, rtol=1e-6)
    assert float(jnp.abs(free).max()) > 0
