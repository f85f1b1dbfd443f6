"""BERT-whitening with β, γ, dim against float64 NumPy, and its two limiting cases."""
import jax
import numpy as np
import pytest

from models.whitening import fit_whitening

N, D = 500, 6


def _embeddings(seed=0):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(D, D)) * np.linspace(0.2, 3.0, D)
    return rng.normal(size=(N, D)) @ mixing + rng.normal(size=D) * 4


def _reference(x, beta, gamma, dim):
    """Post 9079 in float64: x̃ = (x - βμ) U Λ^{-γ/2}, top `dim` directions."""
    shifted = x - beta * x.mean(0)
    u, lam, _ = np.linalg.svd(shifted.T @ shifted / len(x))
    return shifted @ u[:, :dim] @ np.diag(lam[:dim] ** (-gamma / 2))


@pytest.mark.parametrize("beta, gamma, dim", [(1.0, 1.0, D), (0.5, 0.3, 4), (0.0, 0.0, 3)])
def test_matches_reference_up_to_direction_signs(beta, gamma, dim):
    x = _embeddings()
    with jax.enable_x64(True):
        got = np.asarray(fit_whitening(x, beta=beta, gamma=gamma, dim=dim)(x))
    want = _reference(x, beta, gamma, dim)
    signs = np.sign(np.sum(got * want, axis=0))  # eigenvectors are defined up to sign
    np.testing.assert_allclose(got * signs, want, rtol=1e-8, atol=1e-8)


def test_beta_gamma_one_whitens_to_zero_mean_identity_covariance():
    x = np.float32(_embeddings(1))
    y = np.asarray(fit_whitening(x, beta=1.0, gamma=1.0)(x), np.float64)
    np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(y.T @ y / N, np.eye(D), atol=1e-3)  # float32, cond(Σ) ≈ 1e4
    with jax.enable_x64(True):
        y64 = np.asarray(fit_whitening(np.float64(x), beta=1.0, gamma=1.0)(np.float64(x)))
    np.testing.assert_allclose(y64.T @ y64 / N, np.eye(D), atol=1e-10)


def test_beta_gamma_zero_keeps_cosine_similarities():
    x = np.float32(_embeddings(2))
    y = np.asarray(fit_whitening(x, beta=0.0, gamma=0.0)(x), np.float64)

    def cosine(z):
        unit = z / np.linalg.norm(z, axis=1, keepdims=True)
        return unit @ unit.T

    np.testing.assert_allclose(cosine(y), cosine(np.float64(x)), atol=1e-5)


def test_rank_deficient_embeddings_stay_finite():
    x = np.float32(np.random.default_rng(3).normal(size=(4, D)))  # fewer points than dimensions
    assert np.all(np.isfinite(fit_whitening(x)(x)))


@pytest.mark.parametrize(
    "kwargs, message",
    [({"dim": 0}, "dim"), ({"dim": D + 1}, "dim")],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fit_whitening(np.zeros((10, D), np.float32), **kwargs)
    with pytest.raises(ValueError, match="embeddings"):
        fit_whitening(np.zeros((10, D), np.int32))
