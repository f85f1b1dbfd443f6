"""Perturb-and-max estimates against closed forms: Gumbel -> softmax, Gaussian (n = 2) -> Φ."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from losses import perturb_max_probabilities
from tests.losses import numpy_reference as ref

NUM_SAMPLES = 40_000


def _assert_within_monte_carlo_error(estimate, exact, num_samples=NUM_SAMPLES):
    exact = np.asarray(exact, np.float64)
    stderr = np.sqrt(exact * (1 - exact) / num_samples)
    assert np.all(np.abs(np.asarray(estimate, np.float64) - exact) <= 5 * stderr + 1e-6)


def test_gumbel_noise_reproduces_softmax():
    logits = np.random.default_rng(0).normal(size=(3, 5)) * 1.5
    estimate = perturb_max_probabilities(jnp.float32(logits), noise="gumbel", num_samples=NUM_SAMPLES,
                                         rng=jax.random.key(0))
    np.testing.assert_allclose(np.sum(estimate, axis=-1), 1.0, rtol=1e-6)
    _assert_within_monte_carlo_error(estimate, ref.softmax(logits))


def test_gaussian_noise_gives_probit_not_softmax():
    logits = np.array([[2.0, 0.0], [1.0, 0.0]])
    estimate = perturb_max_probabilities(jnp.float32(logits), noise="normal", num_samples=NUM_SAMPLES,
                                         rng=jax.random.key(1))
    exact = norm.cdf((logits[:, 0] - logits[:, 1]) / np.sqrt(2))
    _assert_within_monte_carlo_error(estimate[:, 0], exact)
    assert np.all(np.abs(np.asarray(estimate[:, 0]) - ref.softmax(logits)[:, 0]) > 0.02)


def test_callable_noise_and_output_dtype():
    estimate = perturb_max_probabilities(
        jnp.zeros((2, 4), jnp.bfloat16), noise=jax.random.gumbel, num_samples=NUM_SAMPLES,
        rng=jax.random.key(2),
    )
    assert estimate.dtype == jnp.bfloat16
    _assert_within_monte_carlo_error(np.asarray(estimate, np.float64), np.full((2, 4), 0.25))


def test_bad_arguments():
    with pytest.raises(ValueError, match="noise"):
        perturb_max_probabilities(jnp.zeros(3), noise="cauchy", num_samples=10, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="num_samples"):
        perturb_max_probabilities(jnp.zeros(3), noise="gumbel", num_samples=0, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="logits"):
        perturb_max_probabilities(jnp.zeros(3, int), noise="gumbel", num_samples=10, rng=jax.random.key(0))
