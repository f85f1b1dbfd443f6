"""Performer FAVOR+ (post 7921): orthogonal features, the positive-feature kernel estimate, and linear
attention (causal, chunked) against a direct float64 computation with the same features."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import performer


def test_orthogonal_features_are_orthogonal_within_blocks():
    omega = np.asarray(performer.orthogonal_gaussian_features(jax.random.PRNGKey(0), 40, 16), np.float64)
    assert omega.shape == (40, 16)
    for block in (omega[:16], omega[16:32]):
        directions = block / np.linalg.norm(block, axis=1, keepdims=True)
        np.testing.assert_allclose(directions @ directions.T, np.eye(16), atol=1e-5)
    # norms are chi_16-distributed like a Gaussian vector's: mean ≈ √16 · (1 − 1/(4·16))
    assert abs(np.linalg.norm(omega, axis=1).mean() - 4 * (1 - 1 / 64)) < 0.4


def test_positive_features_estimate_the_softmax_kernel():
    """E[φ(q)ᵀφ(k)] = exp(qᵀk): with m = 16384 features and ‖q‖, ‖k‖ ≈ 0.8 the estimate is within 5%."""
    rng = np.random.default_rng(0)
    q, k = (rng.normal(scale=0.2, size=(6, 16)).astype(np.float32) for _ in range(2))  # relative std ≈ 2%
    omega = performer.orthogonal_gaussian_features(jax.random.PRNGKey(1), 16384, 16)
    features = lambda x: np.asarray(performer.positive_random_features(jnp.asarray(x), omega, is_query=False),  # noqa: E731
                                    np.float64)
    estimate = features(q) @ features(k).T
    exact = np.exp(q.astype(np.float64) @ k.T.astype(np.float64))
    np.testing.assert_allclose(estimate, exact, rtol=0.05)
    assert np.all(features(q) > 0)


@pytest.mark.parametrize("causal", [True, False])
def test_linear_attention_matches_direct_float64(causal):
    """Chunked causal sums (n = 10, C = 4) and the query shift give φ(q_i)·Σ_j φ(k_j)v_j / φ(q_i)·Σ_j φ(k_j)."""
    rng = np.random.default_rng(2)
    q, k = (rng.normal(scale=0.5, size=(2, 10, 8)).astype(np.float32) for _ in range(2))
    v = rng.normal(size=(2, 10, 5)).astype(np.float32)
    key_valid = np.ones((2, 10), bool)
    key_valid[1, [2, 9]] = False
    omega = performer.orthogonal_gaussian_features(jax.random.PRNGKey(3), 32, 8)
    got = jax.jit(lambda q, k, v: performer.linear_attention(
        performer.positive_random_features(q, omega, is_query=True),
        performer.positive_random_features(k, omega, is_query=False), v, causal=causal, chunk_size=4,
        key_valid=jnp.asarray(key_valid), epsilon=0.0))(q, k, v)
    om = np.asarray(omega, np.float64)
    phi = lambda x: np.exp(x @ om.T - 0.5 * np.sum(x ** 2, -1, keepdims=True)) / np.sqrt(len(om))  # noqa: E731
    want = np.zeros(v.shape)
    for b in range(2):
        for i in range(10):
            js = [j for j in range(10) if key_valid[b, j] and (j <= i or not causal)]
            w = np.array([phi(q[b, i].astype(np.float64)) @ phi(k[b, j].astype(np.float64)) for j in js])
            want[b, i] = w @ v[b, js] / w.sum()
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
