"""The generalised sampler against Ho's Algorithm 2, DDIM identities and the Analytic-DPM bounds."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.diffusion import samplers, schedules
from tests.models import diffusion_oracles as oracles

SHAPE = (6, 4, 4, 1)
K10 = schedules.respace(oracles.FULL, 10)


def _ho_ancestral_reference(model_fn, rng, schedule, shape):
    """Algorithm 2 of Ho et al. (arXiv 2006.11239) on a respaced schedule, float64, σ² = β̃."""
    x_key, noise_key = jax.random.split(rng)
    x = np.asarray(jax.random.normal(x_key, shape), np.float64)
    ab_all = oracles.ALPHA_BAR64[np.asarray(schedule.timesteps) - 1]
    for i in reversed(range(schedule.num_steps)):
        ab = ab_all[i]
        abp = ab_all[i - 1] if i > 0 else 1.0
        alpha, beta = ab / abp, 1.0 - ab / abp
        t = jnp.full((shape[0],), schedule.timesteps[i], jnp.int32)
        eps = np.asarray(model_fn(None, jnp.asarray(x, jnp.float32), t), np.float64)
        x = (x - beta / np.sqrt(1.0 - ab) * eps) / np.sqrt(alpha)
        if i > 0:
            z = np.asarray(jax.random.normal(jax.random.fold_in(noise_key, i), shape), np.float64)
            x = x + np.sqrt(beta * (1.0 - abp) / (1.0 - ab)) * z
    return x


def test_ancestral_beta_tilde_matches_ho_algorithm_2():
    rng = jax.random.PRNGKey(0)
    got = samplers.sample(oracles.gaussian_eps, None, rng, schedule=K10, shape=SHAPE, method="ddpm_beta_tilde")
    want = _ho_ancestral_reference(oracles.gaussian_eps, rng, K10, SHAPE)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_ddim_eta_one_equals_ancestral_beta_tilde():
    rng = jax.random.PRNGKey(1)
    ddim = samplers.sample(oracles.gaussian_eps, None, rng, schedule=K10, shape=SHAPE, method="ddim", eta=1.0)
    ddpm = samplers.sample(oracles.gaussian_eps, None, rng, schedule=K10, shape=SHAPE, method="ddpm_beta_tilde")
    np.testing.assert_allclose(ddim, ddpm, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(samplers.ddim_lambda2(K10, 1.0)[1:], K10.beta_tilde[1:], rtol=1e-5)


def test_ddpm_beta_differs_from_beta_tilde_only_through_the_variance():
    rng = jax.random.PRNGKey(2)
    x_T = jax.random.normal(jax.random.PRNGKey(3), SHAPE)
    a = samplers.sample(oracles.gaussian_eps, None, rng, schedule=K10, shape=SHAPE, method="ddpm_beta", x_T=x_T)
    b = samplers.sample(oracles.gaussian_eps, None, rng, schedule=K10, shape=SHAPE, method="ddpm_beta_tilde", x_T=x_T)
    assert not np.allclose(a, b, atol=1e-3)
    pb = samplers.reverse_process(K10, "ddpm_beta")
    np.testing.assert_allclose(pb.sigma2[1:], K10.beta[1:])


def test_ddim_eta_zero_is_deterministic():
    x_T = jax.random.normal(jax.random.PRNGKey(4), SHAPE)
    a = samplers.sample(oracles.gaussian_eps, None, jax.random.PRNGKey(5), schedule=K10, shape=SHAPE,
                        method="ddim", eta=0.0, x_T=x_T)
    b = samplers.sample(oracles.gaussian_eps, None, jax.random.PRNGKey(6), schedule=K10, shape=SHAPE,
                        method="ddim", eta=0.0, x_T=x_T)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("fixed_point_iters,num_steps,decode_tol,flow_rtol",
                         [(3, 100, 1e-4, 0.05), (0, 1000, 1e-2, 0.01)])
def test_ddim_encode_then_decode_returns_the_input(fixed_point_iters, num_steps, decode_tol, flow_rtol):
    schedule = schedules.respace(oracles.FULL, num_steps)
    x0 = oracles.SCALE * jax.random.normal(jax.random.PRNGKey(7), SHAPE)
    x_T = samplers.ddim_encode(oracles.gaussian_eps, None, x0, schedule=schedule,
                               fixed_point_iters=fixed_point_iters)
    # The probability-flow map of Gaussian data is linear, x_T = x0 √(ᾱ_T s² + 1 − ᾱ_T) / s; DDIM's
    # Euler steps approach it as K grows.
    ab_T = oracles.ALPHA_BAR64[-1]
    flow = x0 * np.sqrt(ab_T * oracles.SCALE**2 + 1 - ab_T) / oracles.SCALE
    np.testing.assert_allclose(x_T, flow, rtol=flow_rtol, atol=1e-3)
    decoded = samplers.sample(oracles.gaussian_eps, None, jax.random.PRNGKey(8), schedule=schedule, shape=SHAPE,
                              method="ddim", eta=0.0, x_T=x_T)
    np.testing.assert_allclose(decoded, x0, atol=decode_tol)


@pytest.mark.parametrize("model_fn,prediction", [(oracles.gaussian_x0, "x0"), (oracles.gaussian_v, "v")])
def test_prediction_types_give_the_same_samples(model_fn, prediction):
    rng = jax.random.PRNGKey(9)
    want = samplers.sample(oracles.gaussian_eps, None, rng, schedule=K10, shape=SHAPE, method="ddim", eta=0.5)
    got = samplers.sample(model_fn, None, rng, schedule=K10, shape=SHAPE, method="ddim", eta=0.5,
                          prediction=prediction)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


def _steps(schedule):
    ab = np.asarray(schedule.alpha_bar, np.float64)[1:]
    abp = np.asarray(schedule.alpha_bar_prev, np.float64)[1:]
    return ab, abp, ab / abp


def test_analytic_variance_closed_forms():
    ab, abp, alpha = _steps(K10)
    beta, bbar, bbarp = 1 - alpha, 1 - ab, 1 - abp
    beta_tilde = beta * bbarp / bbar
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    # DDPM (λ² = β̃), Γ = 0, no data bound: β̃ + β²/(α β̄) = β/α.
    got = samplers.analytic_variance(f32(beta_tilde), 0.0, alpha_bar=f32(ab), alpha_bar_prev=f32(abp),
                                     data_half_range=None)
    np.testing.assert_allclose(got, beta / alpha, rtol=1e-4)
    # For any Γ in [0, 1]: β̃ + β²/(α β̄)(1 − Γ) (Analytic-DPM eq. for DDPM).
    gamma = np.linspace(0.0, 1.0, ab.size)
    got = samplers.analytic_variance(f32(beta_tilde), f32(gamma), alpha_bar=f32(ab), alpha_bar_prev=f32(abp),
                                     data_half_range=None)
    np.testing.assert_allclose(got, beta_tilde + beta**2 / (alpha * bbar) * (1 - gamma), rtol=1e-4)
    # DDIM (λ = 0), Γ = 0: (√(β̄/α) − √β̄')².
    got = samplers.analytic_variance(f32(0 * ab), 0.0, alpha_bar=f32(ab), alpha_bar_prev=f32(abp),
                                     data_half_range=None)
    np.testing.assert_allclose(got, (np.sqrt(bbar / alpha) - np.sqrt(bbarp)) ** 2, rtol=1e-4)
    # With data in [-1, 1] the x0-variance bound ᾱ'β²/β̄² applies where it is tighter (high SNR).
    got = samplers.analytic_variance(f32(beta_tilde), 0.0, alpha_bar=f32(ab), alpha_bar_prev=f32(abp))
    np.testing.assert_allclose(got, np.minimum(beta / alpha, beta_tilde + abp * beta**2 / bbar**2), rtol=1e-4)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(gamma=st.lists(st.floats(-0.5, 1.5), min_size=9, max_size=9), eta=st.floats(0.0, 1.0))
def test_analytic_variance_stays_within_the_bounds(gamma, eta):
    ab, abp, alpha = _steps(K10)
    lam2 = eta**2 * (1 - abp) / (1 - ab) * (1 - ab / abp)
    upper = lam2 + (np.sqrt((1 - ab) / alpha) - np.sqrt(1 - abp - lam2)) ** 2
    gamma = np.asarray(gamma)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    got = np.asarray(samplers.analytic_variance(f32(lam2), f32(gamma), alpha_bar=f32(ab), alpha_bar_prev=f32(abp),
                                                data_half_range=None), np.float64)
    assert np.all(got >= lam2 * (1 - 1e-5) - 1e-9) and np.all(got <= upper * (1 + 1e-5) + 1e-9)
    inside = (gamma >= 0) & (gamma <= 1)
    # float32 rounding is relative to the bound, not to the (possibly tiny) result: with Γ → 1 the
    # variance is λ² + (upper − λ²)(1 − Γ), a small difference of terms of size `upper`.
    want = lam2 + (upper - lam2) * (1 - gamma)
    assert np.all(np.abs(got - want)[inside] <= 1e-4 * want[inside] + 1e-6 * upper[inside])


def test_estimate_gamma_matches_the_gaussian_closed_form():
    data = oracles.SCALE * np.asarray(jax.random.normal(jax.random.PRNGKey(10), (4, 256, 4, 4, 1)))
    gamma = samplers.estimate_gamma(oracles.gaussian_eps, None, iter(data), jax.random.PRNGKey(11), schedule=K10)
    np.testing.assert_allclose(gamma, oracles.gaussian_gamma(K10.alpha_bar), rtol=0.05)


def test_analytic_samplers_validate_gamma():
    with pytest.raises(ValueError, match="need gamma"):
        samplers.sample(oracles.gaussian_eps, None, jax.random.PRNGKey(0), schedule=K10, shape=SHAPE,
                        method="analytic_ddpm")
    with pytest.raises(ValueError, match="must have shape"):
        samplers.sample(oracles.gaussian_eps, None, jax.random.PRNGKey(0), schedule=K10, shape=SHAPE,
                        method="analytic_ddim", gamma=np.zeros(5))
    with pytest.raises(ValueError, match="Unknown sampler"):
        samplers.reverse_process(K10, "euler")


def _ddim_reference(model_fn, x_T, schedule, *, eps_from_clipped_x0: bool):
    """DDIM η = 0 with x̂₀ clipped to [−1, 1], float64: the direction term uses ε recomputed from the clipped x̂₀
    (guided-diffusion) or the network's own ε (the official Analytic-DPM code, `reverse_ddim.py`)."""
    x = np.asarray(x_T, np.float64)
    ab_all = oracles.ALPHA_BAR64[np.asarray(schedule.timesteps) - 1]
    for i in reversed(range(schedule.num_steps)):
        ab, abp = ab_all[i], (ab_all[i - 1] if i > 0 else 1.0)
        t = jnp.full((x.shape[0],), schedule.timesteps[i], jnp.int32)
        eps = np.asarray(model_fn(None, jnp.asarray(x, jnp.float32), t), np.float64)
        x0 = np.clip((x - np.sqrt(1 - ab) * eps) / np.sqrt(ab), -1.0, 1.0)
        if eps_from_clipped_x0:
            eps = (x - np.sqrt(ab) * x0) / np.sqrt(1 - ab)
        x = np.sqrt(abp) * x0 + np.sqrt(1 - abp) * eps
    return x


@pytest.mark.parametrize("eps_from_clipped_x0", [True, False])
def test_clipped_ddim_follows_either_convention(eps_from_clipped_x0):
    x_T = 3.0 * jax.random.normal(jax.random.PRNGKey(7), SHAPE)  # large: x̂₀ leaves [−1, 1] and is clipped
    got = samplers.sample(oracles.scaled_input, None, jax.random.PRNGKey(0), schedule=K10, shape=SHAPE, method="ddim",
                          x_T=x_T, clip_x0=True, eps_from_clipped_x0=eps_from_clipped_x0)
    want = _ddim_reference(oracles.scaled_input, x_T, K10, eps_from_clipped_x0=eps_from_clipped_x0)
    other = _ddim_reference(oracles.scaled_input, x_T, K10, eps_from_clipped_x0=not eps_from_clipped_x0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.abs(want - other).max() > 1e-2  # the two conventions really differ here


def test_second_last_sigma_cap_changes_only_that_step():
    """The cap of Analytic-DPM's code: σ² of the step to the first timestep at most (k · 2/(L−1) · √(π/2))²."""
    np.testing.assert_allclose(samplers.pixel_sigma2_cap(2, 256), (2 * 2 / 255 * np.sqrt(np.pi / 2)) ** 2, rtol=1e-12)
    np.testing.assert_allclose(samplers.pixel_sigma2_cap(1, 256), 9.6627e-5, rtol=1e-4)  # clip_pixel=1 in the code
    cap = samplers.pixel_sigma2_cap(1, 17)
    rng, x_T = jax.random.PRNGKey(8), jax.random.normal(jax.random.PRNGKey(9), SHAPE)
    plain = samplers.sample(oracles.gaussian_eps, None, rng, schedule=K10, shape=SHAPE, method="ddpm_beta", x_T=x_T)
    capped = samplers.sample(oracles.gaussian_eps, None, rng, schedule=K10, shape=SHAPE, method="ddpm_beta", x_T=x_T,
                             second_last_sigma2_cap=cap)
    # With the same noise, only step 1's noise term is scaled, by √(cap/β₁); the last step (to x₀) is
    # linear in x with coefficient c = posterior_mean_coef_xt[0] + the x₀ coefficient's share of it.
    beta1 = float(K10.beta[1])
    assert cap < beta1
    z1 = np.asarray(jax.random.normal(jax.random.fold_in(jax.random.split(rng)[1], 1), SHAPE), np.float64)
    ab1 = oracles.ALPHA_BAR64[int(K10.timesteps[0]) - 1]
    # x₀ = (x₁ − √(1−ᾱ₁) ε̂(x₁))/√ᾱ₁ with ε̂ of the Gaussian oracle linear in x₁: ε̂ = √(1−ᾱ₁) x₁/(ᾱ₁s² + 1 − ᾱ₁).
    slope = (1 - (1 - ab1) / (ab1 * oracles.SCALE**2 + 1 - ab1)) / np.sqrt(ab1)
    np.testing.assert_allclose(np.asarray(plain) - np.asarray(capped),
                               slope * (np.sqrt(beta1) - np.sqrt(cap)) * z1, rtol=2e-3, atol=2e-5)
