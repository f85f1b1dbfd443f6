"""The NLL decomposition, term by term, against float64 NumPy/SciPy and exact identities."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from models.diffusion import likelihood, schedules
from tests.models import diffusion_oracles as oracles

LEVELS = 17
K6 = schedules.respace(oracles.FULL, 6)


def _grid_data(key, shape, levels):
    return -1.0 + 2.0 * np.asarray(jax.random.randint(key, shape, 0, levels)) / (levels - 1)


def test_gaussian_kl_and_prior_kl():
    rng = np.random.default_rng(0)
    mq, mp = rng.normal(size=5), rng.normal(size=5)
    vq, vp = rng.uniform(0.1, 2, 5), rng.uniform(0.1, 2, 5)
    want = np.log(np.sqrt(vp) / np.sqrt(vq)) + (vq + (mq - mp) ** 2) / (2 * vp) - 0.5
    np.testing.assert_allclose(likelihood.gaussian_kl(mq, vq, mp, vp), want, rtol=1e-5)
    x0 = rng.uniform(-1, 1, size=(3, 2, 2, 1))
    for ab in (4e-5, 0.3):
        kl = 0.5 * (ab * x0**2 + (1 - ab) - 1 - np.log(1 - ab))
        np.testing.assert_allclose(likelihood.prior_kl(jnp.asarray(x0, jnp.float32), ab),
                                   kl.reshape(3, -1).sum(1), rtol=1e-4)


@pytest.mark.parametrize("levels", [17, 256])
def test_discretized_gaussian_matches_scipy_and_normalises(levels):
    grid = -1.0 + 2.0 * np.arange(levels) / (levels - 1)
    half = 1.0 / (levels - 1)
    for mean, var in [(0.3, 0.01), (-0.97, 1e-4), (0.0, 4.0), (0.999, 5e-5), (-0.2, 1e-6)]:
        got = np.asarray(likelihood.discretized_gaussian_log_likelihood(
            jnp.asarray(grid, jnp.float32), mean, var, levels=levels), np.float64)
        dist = stats.norm(mean, np.sqrt(var))
        upper = np.where(grid > 1 - half, np.inf, grid + half)
        lower = np.where(grid < -1 + half, -np.inf, grid - half)
        p = dist.cdf(upper) - dist.cdf(lower)
        mask = p > 1e-30
        np.testing.assert_allclose(got[mask], np.log(p[mask]), rtol=2e-4, atol=2e-5)
        assert np.sum(np.exp(got)) == pytest.approx(1.0, abs=1e-4)


def _reference_nll(method, x0, rng, schedule, levels, eta=0.0, gamma=None):
    """Float64 NLL (bits/dim) of `oracles.scaled_input` written from the papers' formulas."""
    ab = oracles.ALPHA_BAR64[np.asarray(schedule.timesteps) - 1]
    abp = np.concatenate([[1.0], ab[:-1]])
    alpha, beta = ab / abp, 1 - ab / abp
    beta_tilde = beta * (1 - abp) / (1 - ab)
    full = oracles.ALPHA_BAR64
    decoder_var = (1 - full[1] / full[0]) * (1 - full[0]) / (1 - full[1])
    dims = x0[0].size
    terms = []
    for i in range(schedule.num_steps):
        eps = np.asarray(jax.random.normal(jax.random.fold_in(rng, i), x0.shape), np.float64)
        x_t = np.sqrt(ab[i]) * x0 + np.sqrt(1 - ab[i]) * eps
        eps_hat = 0.3 * x_t
        x0_hat = (x_t - np.sqrt(1 - ab[i]) * eps_hat) / np.sqrt(ab[i])
        if i == 0:
            half = 1.0 / (levels - 1)
            dist = stats.norm(x0_hat, np.sqrt(decoder_var))
            upper = np.where(x0 > 1 - half, np.inf, x0 + half)
            lower = np.where(x0 < -1 + half, -np.inf, x0 - half)
            terms.append(-np.log(dist.cdf(upper) - dist.cdf(lower)).reshape(len(x0), -1).sum(1))
            continue
        if method.startswith("ddim"):
            var_q = eta**2 * (1 - abp[i]) / (1 - ab[i]) * (1 - ab[i] / abp[i])
            coef = np.sqrt(1 - abp[i] - var_q)
            mean_q = np.sqrt(abp[i]) * x0 + coef * (x_t - np.sqrt(ab[i]) * x0) / np.sqrt(1 - ab[i])
            mean_p = np.sqrt(abp[i]) * x0_hat + coef * eps_hat
        else:
            var_q = beta_tilde[i]
            c0 = np.sqrt(abp[i]) * beta[i] / (1 - ab[i])
            ct = np.sqrt(alpha[i]) * (1 - abp[i]) / (1 - ab[i])
            mean_q, mean_p = c0 * x0 + ct * x_t, c0 * x0_hat + ct * x_t
        var_p = {"ddpm_beta": beta[i], "ddpm_beta_tilde": beta_tilde[i], "ddim": var_q}.get(method)
        if method == "analytic_ddpm":
            upper = min(beta[i] / alpha[i], beta_tilde[i] + abp[i] * beta[i] ** 2 / (1 - ab[i]) ** 2)
            var_p = np.clip(beta_tilde[i] + beta[i] ** 2 / (alpha[i] * (1 - ab[i])) * (1 - gamma[i]),
                            beta_tilde[i], upper)
        kl = 0.5 * (np.log(var_p / var_q) + (var_q + (mean_q - mean_p) ** 2) / var_p - 1)
        terms.append(kl.reshape(len(x0), -1).sum(1))
    prior = (0.5 * (ab[-1] * x0**2 + (1 - ab[-1]) - 1 - np.log(1 - ab[-1]))).reshape(len(x0), -1).sum(1)
    scale = 1.0 / (dims * np.log(2.0))
    return np.stack(terms, 1) * scale, prior * scale


@pytest.mark.parametrize("method,eta,levels", [("ddpm_beta", 0.0, 256), ("ddpm_beta_tilde", 0.0, 17),
                                               ("ddim", 0.5, 256), ("analytic_ddpm", 0.0, 256)])
def test_every_nll_term_matches_float64_reference(method, eta, levels):
    x0 = _grid_data(jax.random.PRNGKey(0), (5, 4, 4, 1), levels)
    rng = jax.random.PRNGKey(1)
    gamma = np.linspace(0.1, 0.9, K6.num_steps)
    got = likelihood.nll_bits_per_dim(oracles.scaled_input, None, x0, rng, schedule=K6, method=method, eta=eta,
                                      gamma=gamma, levels=levels)
    per_step, prior = _reference_nll(method, x0, rng, K6, levels, eta=eta, gamma=gamma)
    np.testing.assert_allclose(got["per_step"], per_step, rtol=2e-3, atol=1e-5)
    np.testing.assert_allclose(got["prior"], prior, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(got["total"], per_step.sum(1) + prior, rtol=2e-3)
    np.testing.assert_allclose(got["reconstruction"], per_step[:, 0], rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("num_steps", [1000, 10])
def test_one_point_data_with_the_optimal_predictor_has_zero_diffusion_terms(num_steps):
    schedule = schedules.respace(oracles.FULL, num_steps)
    x0 = jnp.tile(oracles.POINT, (3, 1, 1, 1))
    got = likelihood.nll_bits_per_dim(oracles.point_eps, None, x0, jax.random.PRNGKey(2), schedule=schedule,
                                      method="ddpm_beta_tilde", levels=LEVELS)
    np.testing.assert_allclose(got["per_step"][:, 1:], 0.0, atol=1e-6)
    np.testing.assert_allclose(got["total"], got["prior"] + got["reconstruction"], rtol=1e-5)
    # x̂₀ = x₀ exactly, so L₀ is the decoder's mass on x₀'s own bin at σ² = β̃₂.
    full = oracles.ALPHA_BAR64
    std = np.sqrt((1 - full[1] / full[0]) * (1 - full[0]) / (1 - full[1]))
    point = np.asarray(oracles.POINT, np.float64).ravel()
    half = 1.0 / (LEVELS - 1)
    upper = np.where(point > 1 - half, np.inf, point + half)
    lower = np.where(point < -1 + half, -np.inf, point - half)
    l0 = -np.sum(np.log(stats.norm.cdf(upper / std - point / std) - stats.norm.cdf(lower / std - point / std)))
    np.testing.assert_allclose(got["reconstruction"], l0 / (16 * np.log(2)), rtol=1e-4, atol=1e-9)


def test_analytic_variance_beats_beta_and_beta_tilde_with_the_exact_gamma():
    # Gaussian data and its optimal predictor: Analytic-DPM's σ*² is the KL-optimal isotropic variance,
    # so its diffusion terms are below both of DDPM's choices (Bao et al., arXiv 2201.06503, Fig. 1).
    schedule = schedules.respace(oracles.FULL, 10)
    x0 = oracles.SCALE * jax.random.normal(jax.random.PRNGKey(3), (256, 4, 4, 1))
    gamma = oracles.gaussian_gamma(schedule.alpha_bar)
    diffusion = {m: float(np.mean(likelihood.nll_bits_per_dim(
        oracles.gaussian_eps, None, x0, jax.random.PRNGKey(4), schedule=schedule, method=m, gamma=gamma,
        levels=256)["diffusion"])) for m in ("analytic_ddpm", "ddpm_beta", "ddpm_beta_tilde")}
    assert diffusion["analytic_ddpm"] < diffusion["ddpm_beta_tilde"]
    assert diffusion["analytic_ddpm"] < diffusion["ddpm_beta"]


def test_nll_rejects_deterministic_ddim():
    with pytest.raises(ValueError, match="eta > 0"):
        likelihood.nll_bits_per_dim(oracles.scaled_input, None, np.zeros((1, 4, 4, 1)), jax.random.PRNGKey(0),
                                    schedule=K6, method="ddim", eta=0.0, levels=LEVELS)


def test_scoring_several_samplers_at_once_equals_scoring_each():
    x0 = _grid_data(jax.random.PRNGKey(5), (4, 4, 4, 1), LEVELS)
    gamma = np.linspace(0.2, 0.95, K6.num_steps)
    methods = {"beta": ("ddpm_beta", 0.0), "analytic": ("analytic_ddpm", 0.0), "ddim": ("ddim", 0.7)}
    together = likelihood.nll_bits_per_dim_of_samplers(oracles.scaled_input, None, x0, jax.random.PRNGKey(6),
                                                       schedule=K6, methods=methods, gamma=gamma, levels=LEVELS)
    assert set(together) == set(methods)
    for name, (method, eta) in methods.items():
        alone = likelihood.nll_bits_per_dim(oracles.scaled_input, None, x0, jax.random.PRNGKey(6), schedule=K6,
                                            method=method, eta=eta, gamma=gamma, levels=LEVELS)
        for key in ("prior", "diffusion", "reconstruction", "total", "per_step"):
            np.testing.assert_allclose(together[name][key], alone[key], rtol=1e-6, err_msg=f"{name} {key}")
    # The three samplers share the draws but not their variances: their bounds differ.
    assert len({round(float(np.mean(v["total"])), 6) for v in together.values()}) == 3
