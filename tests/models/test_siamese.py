"""models.siamese: batch-statistics normalisation, the closed-form predictor and the collapse diagnostics
against float64 NumPy and flax's BatchNorm; the network's shapes and logical axes."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import siamese


def test_batch_stats_norm_is_training_mode_batch_norm():
    x = np.random.default_rng(0).normal(2.0, 3.0, size=(32, 5)).astype(np.float32)
    norm = siamese.BatchStatsNorm()
    params = norm.init(jax.random.PRNGKey(0), x)
    params = jax.tree.map(lambda a: a + 0.5, params)  # scale 1.5, bias 0.5
    y = norm.apply(params, x)
    x64 = x.astype(np.float64)
    expected = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-5) * 1.5 + 0.5
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
    variables = flax_bn.init(jax.random.PRNGKey(0), x)
    variables = {**variables, "params": jax.tree.map(lambda a: a + 0.5, variables["params"])}
    y_flax, _ = flax_bn.apply(variables, x, mutable=["batch_stats"])
    np.testing.assert_allclose(y, y_flax, rtol=1e-5, atol=1e-5)


def test_closed_form_predictor_is_the_ridge_regression_solution():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(40, 6)), rng.normal(size=(40, 6))
    ridge = 0.1
    w = siamese.closed_form_predictor(a.astype(np.float32), b.astype(np.float32), ridge=ridge)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    an, bn = unit(a), unit(b)
    # min (1/N)‖AW − B‖² + λ‖W‖² is least squares on A stacked over √(Nλ)·I.
    stacked_a = np.concatenate([an, np.sqrt(40 * ridge) * np.eye(6)])
    stacked_b = np.concatenate([bn, np.zeros((6, 6))])
    expected = np.linalg.lstsq(stacked_a, stacked_b, rcond=None)[0]
    np.testing.assert_allclose(w, expected, rtol=1e-4, atol=1e-5)
    grad = jax.grad(lambda x: jnp.sum(siamese.closed_form_predictor(x, b.astype(np.float32), ridge=ridge)))
    assert float(jnp.abs(grad(a.astype(np.float32))).max()) == 0.0  # solved, not differentiated through


def test_normalized_std_is_zero_when_collapsed_and_one_over_sqrt_d_when_isotropic():
    rng = np.random.default_rng(2)
    d = 16
    spread = rng.normal(size=(20000, d))
    assert float(siamese.normalized_std(spread)) == pytest.approx(1 / np.sqrt(d), rel=0.02)
    collapsed = np.tile(rng.normal(size=(1, d)), (100, 1)) * rng.uniform(0.5, 2.0, size=(100, 1))
    assert float(siamese.normalized_std(collapsed)) < 1e-6  # one direction: the norms do not matter
    grad = jax.grad(lambda x: jnp.sum(siamese.l2_normalize(x)))(jnp.zeros((2, 3)))
    assert bool(jnp.all(jnp.isfinite(grad)))  # a zero output gives a finite gradient, not NaN


def test_effective_rank_matches_the_float64_entropy_of_singular_values():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 8)) * np.array([5, 4, 3, 2, 1, 0.5, 0.1, 0.01])
    sigma = np.linalg.svd(x, compute_uv=False)
    p = sigma / sigma.sum()
    assert float(siamese.effective_rank(x.astype(np.float32))) == pytest.approx(np.exp(-(p * np.log(p)).sum()),
                                                                              rel=1e-4)
    q, _ = np.linalg.qr(rng.normal(size=(50, 8)))
    assert float(siamese.effective_rank(q[:, :3] * 7.0)) == pytest.approx(3.0, rel=1e-4)  # 3 equal σ
    assert float(siamese.effective_rank(np.outer(rng.normal(size=50), rng.normal(size=8)))) == pytest.approx(
        1.0, rel=1e-4)  # collapsed to a line


@pytest.mark.parametrize("predictor", ["mlp", "none", "closed_form"])
def test_network_shapes_and_logical_axes(predictor):
    config = siamese.SiameseConfig(hidden=32, encoder_layers=3, projector_hidden=24, projection_dim=8,
                                   predictor=predictor, predictor_hidden=4, projector_output_norm=True)
    net = siamese.SiameseNetwork(config)
    images = jnp.zeros((5, 8, 8, 1))
    boxed = net.init(jax.random.PRNGKey(0), images)["params"]
    h, z, p = net.apply({"params": nn.unbox(boxed)}, images)
    assert h.shape == (5, 32) and z.shape == (5, 8) and (p.shape == (5, 8) if predictor == "mlp" else p is None)
    assert ("predictor" in boxed) == (predictor == "mlp")
    encoder = boxed["encoder"]
    names = [encoder[f"dense_{i}"]["kernel"].names for i in range(3)]
    assert names == [("pixels", "mlp"), ("mlp", "embed"), ("embed", "mlp")]  # consecutive kernels alternate
    assert boxed["projector"]["dense_0"]["kernel"].names == ("mlp", "embed")
    assert boxed["projector"]["norm_1"]["scale"].names == ("projection",)
    np.testing.assert_array_equal(net.apply({"params": nn.unbox(boxed)}, images, method=net.encode), h)


def test_config_validation_names_the_key():
    with pytest.raises(ValueError, match="'model.predictor' is 'linear'"):
        siamese.SiameseConfig(predictor="linear").validate()
    with pytest.raises(ValueError, match="'model.hidden' must be a positive integer"):
        siamese.SiameseConfig(hidden=0).validate()
