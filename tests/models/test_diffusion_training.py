"""The denoising loss: exact predictors give zero loss for every target; weights match the ELBO."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.diffusion import schedules, training
from tests.models import diffusion_oracles as oracles


def _exact_predictor(prediction):
    """Oracle output for one-point data: ε from xₜ, x₀ = c, v = √ᾱ ε − √(1−ᾱ) c."""
    def apply_fn(params, x_t, t, *, labels=None, rngs=None):
        assert set(rngs) == {"dropout"}
        eps = oracles.point_eps(None, x_t, t)
        ab = oracles.FULL.alpha_bar[t - 1].reshape(-1, 1, 1, 1)
        x0 = jnp.broadcast_to(oracles.POINT, x_t.shape)
        return {"eps": eps, "x0": x0, "v": jnp.sqrt(ab) * eps - jnp.sqrt(1 - ab) * x0}[prediction]
    return apply_fn


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("weighting", ["simple", "elbo"])
def test_exact_predictor_has_zero_loss(prediction, weighting):
    x0 = jnp.tile(oracles.POINT, (64, 1, 1, 1))
    loss = training.diffusion_loss(_exact_predictor(prediction), None, x0, jax.random.PRNGKey(0),
                                   schedule=oracles.FULL, prediction=prediction, weighting=weighting)
    assert loss.shape == (64,)
    # ε recovered from x₀-prediction is amplified by 1/√(1−ᾱ) ≤ 100: float32 noise, not a bias.
    np.testing.assert_allclose(loss, 0.0, atol=1e-6 if weighting == "simple" else 1e-3)
    wrong = training.diffusion_loss(lambda *a, **k: jnp.zeros_like(x0), None, x0, jax.random.PRNGKey(0),
                                    schedule=oracles.FULL, prediction=prediction, weighting=weighting)
    assert float(jnp.mean(wrong)) > 1e-2


def test_simple_x0_loss_of_a_zero_predictor_is_the_data_power():
    x0 = jnp.tile(oracles.POINT, (8, 1, 1, 1))
    loss = training.diffusion_loss(lambda *a, **k: jnp.zeros_like(x0), None, x0, jax.random.PRNGKey(1),
                                   schedule=oracles.FULL, prediction="x0")
    np.testing.assert_allclose(loss, np.mean(np.square(oracles.POINT)), rtol=1e-6)


def test_timesteps_are_uniform_over_the_schedule():
    seen = []

    def apply_fn(params, x_t, t, *, labels=None, rngs=None):
        seen.append(t)
        return jnp.zeros_like(x_t)

    training.diffusion_loss(apply_fn, None, jnp.zeros((20000, 1, 1, 1)), jax.random.PRNGKey(2),
                            schedule=schedules.respace(oracles.FULL, 4))
    counts = np.bincount(np.asarray(seen[0]), minlength=1001)[[1, 334, 667, 1000]]
    assert counts.sum() == 20000 and np.all(np.abs(counts / 20000 - 0.25) < 0.02)


def test_elbo_weights_match_the_snr_form_of_the_kl():
    # KL(q ‖ p) at σ² = β̃ is ½ (SNR_{t−1} − SNR_t) ‖x₀ − x̂₀‖² = ½ (SNR_{t−1} − SNR_t)(1−ᾱₜ)/ᾱₜ ‖ε − ε̂‖²
    # (Kingma et al., arXiv 2107.00630); at t = 1 the Gaussian surrogate uses σ² = β̃₂.
    s = oracles.FULL
    ab = oracles.ALPHA_BAR64
    snr = ab / (1 - ab)
    w = np.asarray(training.loss_weights(s, "elbo"), np.float64) / s.num_steps
    np.testing.assert_allclose(w[1:], 0.5 * (snr[:-1] - snr[1:]) * (1 - ab[1:]) / ab[1:], rtol=1e-4)
    beta1 = 1 - ab[0]
    beta_tilde_2 = (1 - ab[1] / ab[0]) * (1 - ab[0]) / (1 - ab[1])
    np.testing.assert_allclose(w[0], beta1**2 / (2 * beta_tilde_2 * ab[0] * beta1), rtol=1e-4)
    np.testing.assert_array_equal(training.loss_weights(s, "simple"), np.ones(s.num_steps))
    with pytest.raises(ValueError, match="Unknown loss weighting"):
        training.loss_weights(s, "min_snr")
