"""R-Drop, softmax focal, logit-adjusted CE, smooth accuracy and EXACT against float64 NumPy."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from losses import (exact_loss, exact_sigma_schedule, logit_adjusted_cross_entropy, rdrop_loss, smooth_accuracy_loss,
                    softmax_focal_loss)
from tests.losses import numpy_reference as ref

SHAPE = (4, 3, 6)


def _inputs(seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=SHAPE) * 3, rng.normal(size=SHAPE) * 3, rng.integers(0, SHAPE[-1], SHAPE[:-1])


def test_rdrop_matches_reference():
    z1, z2, y = _inputs(0)
    with jax.enable_x64(True):
        np.testing.assert_allclose(rdrop_loss(z1, z2, y, alpha=0.7), ref.rdrop(z1, z2, y, 0.7), rtol=1e-12)


def test_rdrop_identical_passes_is_twice_cross_entropy():
    z, _, y = _inputs(1)
    z = jnp.float32(z)
    np.testing.assert_allclose(
        rdrop_loss(z, z, y, alpha=4.0),
        2 * optax.softmax_cross_entropy_with_integer_labels(z, y),
        rtol=1e-6,
    )


def test_rdrop_kl_term_is_symmetric_and_positive():
    z1, z2, y = _inputs(2)
    with jax.enable_x64(True):
        kl12 = rdrop_loss(z1, z2, y, alpha=2.0) - rdrop_loss(z1, z2, y, alpha=0.0)
        kl21 = rdrop_loss(z2, z1, y, alpha=2.0) - rdrop_loss(z2, z1, y, alpha=0.0)
    np.testing.assert_allclose(kl12, kl21, rtol=1e-12)
    assert np.all(np.asarray(kl12) > 0)


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_focal_matches_reference(gamma):
    z, _, y = _inputs(3)
    alpha = np.linspace(0.5, 1.5, SHAPE[-1])
    with jax.enable_x64(True):
        np.testing.assert_allclose(softmax_focal_loss(z, y, gamma=gamma), ref.focal(z, y, gamma), rtol=1e-10)
        np.testing.assert_allclose(
            softmax_focal_loss(z, y, gamma=gamma, alpha=alpha), ref.focal(z, y, gamma, alpha), rtol=1e-10
        )
        np.testing.assert_allclose(
            softmax_focal_loss(z, y, gamma=gamma, alpha=0.25), ref.focal(z, y, gamma, 0.25), rtol=1e-10
        )


def test_focal_with_gamma_zero_is_cross_entropy():
    z, _, y = _inputs(4)
    z = jnp.float32(z)
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels(z, y)
    np.testing.assert_allclose(softmax_focal_loss(z, y, gamma=0.0), cross_entropy, rtol=1e-6, atol=1e-6)


def test_focal_gradient_is_finite_at_certainty_for_gamma_below_one():
    # (1 - p)^γ has an infinite derivative at p = 1 for γ < 1; exp(γ log(1 - p)) does not.
    z = jnp.array([[60.0, 0.0, 0.0]])
    grad = jax.grad(lambda z: softmax_focal_loss(z, jnp.array([0]), gamma=0.5).sum())(z)
    assert np.all(np.isfinite(grad))


def test_logit_adjusted_matches_reference_and_ignores_prior_scale():
    z, _, y = _inputs(5)
    prior = np.random.default_rng(5).dirichlet(np.ones(SHAPE[-1]))
    with jax.enable_x64(True):
        loss = logit_adjusted_cross_entropy(z, y, class_prior=prior, tau=1.5)
        np.testing.assert_allclose(loss, ref.logit_adjusted(z, y, prior, 1.5), rtol=1e-12)
        scaled = logit_adjusted_cross_entropy(z, y, class_prior=7 * prior, tau=1.5)
        np.testing.assert_allclose(scaled, loss, rtol=1e-12)
        plain = logit_adjusted_cross_entropy(z, y, class_prior=prior, tau=0.0)
        np.testing.assert_allclose(plain, ref.cross_entropy(z, y), rtol=1e-12)


def test_smooth_accuracy_matches_reference():
    z, _, y = _inputs(6)
    with jax.enable_x64(True):
        np.testing.assert_allclose(smooth_accuracy_loss(z, y), ref.smooth_accuracy(z, y), rtol=1e-12)


def test_masked_classes_leave_the_softmax_and_masked_targets_give_zero():
    z, z2, y = _inputs(7)
    mask = np.random.default_rng(7).random(SHAPE) < 0.6
    mask[..., 0] = True
    y = np.where(np.take_along_axis(mask, y[..., None], -1)[..., 0], y, 0)
    y[0, 0] = 1
    mask[0, 0, 1] = False  # target masked out -> loss 0
    masked_z, masked_z2 = np.where(mask, z, -np.inf), np.where(mask, z2, -np.inf)
    keep = np.take_along_axis(mask, y[..., None], -1)[..., 0]
    with np.errstate(invalid="ignore", divide="ignore"), jax.enable_x64(True):
        cases = [
            (smooth_accuracy_loss(z, y, where=mask), ref.smooth_accuracy(masked_z, y)),
            (softmax_focal_loss(z, y, where=mask), ref.focal(masked_z, y, 2.0)),
            (rdrop_loss(z, z2, y, alpha=0.0, where=mask),
             ref.cross_entropy(masked_z, y) + ref.cross_entropy(masked_z2, y)),
        ]
        for got, want in cases:
            np.testing.assert_allclose(np.asarray(got)[keep], want[keep], rtol=1e-10)
            assert np.all(np.asarray(got)[~keep] == 0.0)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: rdrop_loss(jnp.ones((2, 3)), jnp.ones((2, 4)), jnp.zeros(2, int), alpha=1.0), "logits2"),
        (lambda: rdrop_loss(jnp.ones((2, 3), int), jnp.ones((2, 3)), jnp.zeros(2, int), alpha=1.0),
         "logits1"),
        (lambda: softmax_focal_loss(jnp.ones((2, 3)), jnp.zeros(3, int)), "labels"),
        (lambda: softmax_focal_loss(jnp.ones((2, 3)), jnp.zeros(2)), "labels"),
        (lambda: softmax_focal_loss(jnp.ones((2, 3)), jnp.array([0, 3])), "labels"),
        (lambda: softmax_focal_loss(jnp.ones((2, 3)), jnp.zeros(2, int), gamma=-1.0), "gamma"),
        (lambda: softmax_focal_loss(jnp.ones((2, 3)), jnp.zeros(2, int), alpha=jnp.ones(4)), "alpha"),
        (lambda: logit_adjusted_cross_entropy(jnp.ones((2, 3)), jnp.zeros(2, int), class_prior=jnp.ones(4)),
         "class_prior"),
        (lambda: logit_adjusted_cross_entropy(jnp.ones((2, 3)), jnp.zeros(2, int),
                                              class_prior=jnp.array([0.5, 0.5, 0.0])), "class_prior"),
        (lambda: smooth_accuracy_loss(jnp.ones((2, 3), jnp.int32), jnp.zeros(2, int)), "logits"),
        (lambda: smooth_accuracy_loss(jnp.ones((2, 3)), jnp.zeros(2, int), where=jnp.ones(2, bool)), "where"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("sigma, margin", [(1.0, 0.0), (0.3, 0.0), (2.0, 0.5)])
def test_exact_matches_the_quadrature_reference(sigma, margin):
    z, _, y = _inputs(3)
    with jax.enable_x64(True):
        got = exact_loss(z, y, sigma=sigma, margin=margin)
    np.testing.assert_allclose(got, -ref.exact_accuracy(z, y, sigma, margin), rtol=1e-9, atol=1e-13)


def test_exact_is_the_probability_that_the_perturbed_argmax_is_the_label():
    """Monte Carlo of the definition itself, independent of the conditioning on ε_y."""
    rng = np.random.default_rng(4)
    z, y, sigma = rng.normal(size=(5, 4)), np.array([0, 1, 2, 3, 1]), 0.8
    noisy = z[:, None, :] + sigma * rng.standard_normal((5, 400_000, 4))
    frequency = (noisy.argmax(-1) == y[:, None]).mean(1)
    np.testing.assert_allclose(-np.asarray(exact_loss(jnp.float32(z), y, sigma=sigma)), frequency,
                               atol=4 * np.sqrt(0.25 / 400_000))


def test_exact_two_classes_is_the_normal_cdf_and_tends_to_the_accuracy():
    from scipy import special

    z = np.array([[0.0, 0.3], [0.0, -0.2], [1.0, 0.0]])
    y = np.array([1, 1, 0])
    with jax.enable_x64(True):
        got = exact_loss(z, y, sigma=0.7, margin=0.1)
        sharp = exact_loss(z, y, sigma=1e-4)
    gap = np.take_along_axis(z, y[:, None], 1)[:, 0] - np.take_along_axis(z, 1 - y[:, None], 1)[:, 0]
    np.testing.assert_allclose(got, -special.ndtr((gap - 0.1) / (0.7 * np.sqrt(2))), rtol=1e-12)
    np.testing.assert_allclose(sharp, -(gap > 0).astype(float), atol=1e-12)


def test_exact_masked_rivals_never_win_and_masked_targets_give_zero():
    z = jnp.array([[0.0, 5.0, 1.0], [0.0, 5.0, 1.0]])
    where = jnp.array([[True, False, True], [True, False, True]])
    masked = exact_loss(z, jnp.array([2, 1]), sigma=1.0, where=where)
    np.testing.assert_allclose(masked[0], exact_loss(z[:, [0, 2]], jnp.array([1, 1]), sigma=1.0)[0], rtol=1e-6)
    assert masked[1] == 0.0
    grad = jax.grad(lambda v: exact_loss(v, jnp.array([2, 1]), sigma=1.0, where=where).sum())(z)
    assert np.all(np.isfinite(grad)) and np.all(grad[1] == 0.0)


def test_exact_sigma_schedule_is_geometric_then_constant():
    schedule = exact_sigma_schedule(10.0, 0.1, 100)
    np.testing.assert_allclose([schedule(0), schedule(50), schedule(100), schedule(500)], [10.0, 1.0, 0.1, 0.1],
                               rtol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    ({"sigma": 0.0}, "`sigma` must be positive"), ({"sigma": 1.0, "margin": -0.1}, "`margin` must be non-negative"),
    ({"sigma": 1.0, "num_nodes": 1}, "`num_nodes` must be an integer >= 2")])
def test_exact_bad_arguments_name_themselves(kwargs, message):
    with pytest.raises(ValueError, match=message):
        exact_loss(jnp.zeros((2, 3)), jnp.array([0, 1]), **kwargs)
