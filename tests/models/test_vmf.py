"""models.vmf against closed forms: the mean resultant length A_d(κ) = I_{d/2}(κ)/I_{d/2−1}(κ) (and coth κ − 1/κ for
d = 3), the KL to the uniform prior by quadrature of the cosine's density, and samples from the inverse-CDF table."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

from models import vmf


@pytest.mark.parametrize("kappa", [0.5, 5.0, 32.0])
def test_mean_resultant_length_of_the_two_sphere_is_coth_minus_inverse(kappa):
    assert vmf.mean_resultant_length(3, kappa) == pytest.approx(1 / math.tanh(kappa) - 1 / kappa, rel=1e-12)


@pytest.mark.parametrize("dim,kappa", [(2, 1.0), (3, 5.0), (16, 32.0), (128, 32.0), (16, 0.0)])
def test_samples_have_the_closed_form_mean_resultant_length(dim, kappa):
    n = 100_000
    mu = jax.random.normal(jax.random.PRNGKey(1), (dim,)) * 3.0  # any scale: sample normalises it
    z = vmf.sample(jax.random.PRNGKey(0), jnp.broadcast_to(mu, (n, dim)), kappa)
    z = np.asarray(z, np.float64)
    np.testing.assert_allclose(np.linalg.norm(z, axis=-1), 1.0, atol=1e-5)
    mu_hat = np.asarray(mu, np.float64) / np.linalg.norm(np.asarray(mu, np.float64))
    w = z @ mu_hat
    want = vmf.mean_resultant_length(dim, kappa)
    assert abs(w.mean() - want) < 5 * w.std() / math.sqrt(n) + 1e-4, (w.mean(), want)
    # the component orthogonal to μ averages to zero: E[z] = A_d(κ) μ̂
    np.testing.assert_allclose(z.mean(0), want * mu_hat, atol=5 / math.sqrt(n) + 1e-4)
    # and w's spread matches the density's second moment, by quadrature
    density = lambda x: math.exp(kappa * (x - 1)) * (1 - x * x) ** ((dim - 3) / 2)  # noqa: E731
    z0 = integrate.quad(density, -1, 1, limit=200)[0]
    second = integrate.quad(lambda x: x * x * density(x), -1, 1, limit=200)[0] / z0
    assert abs((w * w).mean() - second) < 5 * (w * w).std() / math.sqrt(n) + 1e-4


@pytest.mark.parametrize("dim,kappa", [(3, 2.0), (16, 32.0), (64, 10.0)])
def test_kl_to_uniform_equals_quadrature(dim, kappa):
    """Given w, z and the uniform law are both uniform on the sub-sphere, so the KL is that of w's marginals."""
    log_base = lambda x: ((dim - 3) / 2) * math.log1p(-x * x)  # noqa: E731  the uniform law's w-density, unnormalised
    z_u = integrate.quad(lambda x: math.exp(log_base(x)), -1, 1, limit=200)[0]
    z_f = integrate.quad(lambda x: math.exp(kappa * (x - 1) + log_base(x)), -1, 1, limit=200)[0]
    kl = integrate.quad(lambda x: math.exp(kappa * (x - 1) + log_base(x)) / z_f
                        * (kappa * (x - 1) - math.log(z_f) + math.log(z_u)), -1, 1, limit=200)[0]
    assert vmf.kl_to_uniform(dim, kappa) == pytest.approx(kl, rel=1e-6)
    assert vmf.kl_to_uniform(dim, 0.0) == 0.0


def test_gradient_reaches_the_mean_direction_and_bad_arguments_raise():
    mu = jnp.array([[0.3, -1.2, 0.5, 2.0]])
    grad = jax.grad(lambda m: jnp.sum(vmf.sample(jax.random.PRNGKey(0), m, 8.0) * jnp.array([1.0, 0, 0, 0])))(mu)
    assert np.isfinite(np.asarray(grad)).all() and np.abs(np.asarray(grad)).sum() > 0
    with pytest.raises(ValueError, match="dim >= 2"):
        vmf.cosine_quantiles(1, 1.0)
