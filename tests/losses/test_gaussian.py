"""Gaussian KL, Bhattacharyya and W2² against float64 NumPy/SciPy (W2 via scipy.linalg.sqrtm)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from losses import (
    gaussian_bhattacharyya_distance,
    gaussian_kl_divergence,
    gaussian_wasserstein_distance_squared,
)
from tests.losses import numpy_reference as ref

DIVERGENCES = [
    (gaussian_kl_divergence, ref.gaussian_kl),
    (gaussian_bhattacharyya_distance, ref.gaussian_bhattacharyya),
    (gaussian_wasserstein_distance_squared, ref.gaussian_w2_squared),
]
D = 4


def _spd(rng, batch=()):
    a = rng.normal(size=batch + (D, D))
    return a @ np.swapaxes(a, -1, -2) + 0.5 * np.eye(D)


def _gaussians(seed, batch=(3,)):
    rng = np.random.default_rng(seed)
    return rng.normal(size=batch + (D,)), _spd(rng, batch), rng.normal(size=batch + (D,)), _spd(rng, batch)


@pytest.mark.parametrize("fn, reference", DIVERGENCES)
def test_matches_reference_float64(fn, reference):
    mp, cp, mq, cq = _gaussians(0)
    want = [reference(*args) for args in zip(mp, cp, mq, cq)]
    with jax.enable_x64(True):
        np.testing.assert_allclose(fn(mp, cp, mq, cq), want, rtol=1e-9)


@pytest.mark.parametrize("fn, reference", DIVERGENCES)
def test_batch_dims_broadcast(fn, reference):
    mp, cp, mq, cq = _gaussians(1, batch=(2, 3))
    out = fn(jnp.float32(mp), jnp.float32(cp), jnp.float32(mq[0, 0]), jnp.float32(cq[0, 0]))
    assert out.shape == (2, 3) and out.dtype == jnp.float32
    want = [[reference(mp[i, j], cp[i, j], mq[0, 0], cq[0, 0]) for j in range(3)] for i in range(2)]
    np.testing.assert_allclose(out, want, rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize("fn, _", DIVERGENCES)
def test_divergence_of_a_distribution_to_itself_is_zero_with_finite_gradient(fn, _):
    mp, cp, _, _ = _gaussians(2)
    mp, cp = jnp.float32(mp), jnp.float32(cp)
    np.testing.assert_allclose(fn(mp, cp, mp, cp), 0.0, atol=1e-4)
    identity = jnp.broadcast_to(jnp.eye(D), cp.shape)  # repeated eigenvalues: W2 needs no eigenvectors
    grads = jax.grad(lambda c: fn(mp, c, mp, identity).sum())(identity)
    assert np.all(np.isfinite(grads))


def test_bhattacharyya_and_w2_are_symmetric_and_kl_is_not():
    mp, cp, mq, cq = _gaussians(3)
    with jax.enable_x64(True):
        for fn in (gaussian_bhattacharyya_distance, gaussian_wasserstein_distance_squared):
            np.testing.assert_allclose(fn(mp, cp, mq, cq), fn(mq, cq, mp, cp), rtol=1e-9)
        assert not np.allclose(gaussian_kl_divergence(mp, cp, mq, cq), gaussian_kl_divergence(mq, cq, mp, cp))


def test_half_precision_inputs_compute_in_float32_and_return_input_dtype():
    mp, cp, mq, cq = _gaussians(4)
    for dtype in (jnp.bfloat16, jnp.float16):
        out = gaussian_kl_divergence(*(jnp.asarray(x, dtype) for x in (mp, cp, mq, cq)))
        assert out.dtype == dtype
        want = [ref.gaussian_kl(*(np.asarray(jnp.asarray(x, dtype), np.float64) for x in args))
                for args in zip(mp, cp, mq, cq)]
        np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=2e-2)


@pytest.mark.parametrize(
    "args, message",
    [
        ((jnp.zeros(3), jnp.eye(3), jnp.zeros(2), jnp.eye(3)), "mean_q"),
        ((jnp.zeros(3), jnp.eye(2), jnp.zeros(3), jnp.eye(3)), "cov_p"),
        ((jnp.zeros(3), jnp.eye(3), jnp.zeros(3), jnp.ones(3)), "cov_q"),
        ((jnp.zeros(3, int), jnp.eye(3), jnp.zeros(3), jnp.eye(3)), "mean_p"),
        ((jnp.zeros((2, 3)), jnp.eye(3), jnp.zeros((4, 3)), jnp.eye(3)), "broadcast"),
    ],
)
@pytest.mark.parametrize("fn, _", DIVERGENCES)
def test_bad_inputs(fn, _, args, message):
    with pytest.raises(ValueError, match=message):
        fn(*args)
