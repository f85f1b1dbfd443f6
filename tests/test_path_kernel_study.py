"""experiments/path_kernel.py: the path-kernel tool is exact for a model linear in its parameters, and for the MLP
its error shrinks with the step size (post 8009, Domingos 2020)."""
import jax
import jax.numpy as jnp
import numpy as np

from experiments import path_kernel as study


def test_the_kernel_prediction_is_exact_for_a_linear_model_and_steps_are_real_gradient_descent():
    rng = np.random.default_rng(0)
    x, xt = rng.normal(size=(12, 5)), rng.normal(size=(4, 5))
    y = (rng.random(12) < 0.5).astype(np.float64)
    with jax.enable_x64(True):
        linear = lambda p, v: v @ p["w"] + p["b"]  # noqa: E731
        params = {"w": jnp.asarray(rng.normal(size=5)), "b": jnp.float64(0.3)}
        actual, predicted, linearised, trained = study.kernel_prediction(linear, params, jnp.asarray(x),
                                                                         jnp.asarray(y), jnp.asarray(xt), 0.5, 30)
        w, b = np.asarray(params["w"]), 0.3  # the same run by hand: mean logistic loss, full batch
        for _ in range(30):
            r = 1 / (1 + np.exp(-(x @ w + b))) - y
            w, b = w - 0.5 * x.T @ r / 12, b - 0.5 * r.mean()
    np.testing.assert_allclose(np.asarray(trained["w"]), w, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(predicted), np.asarray(actual), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(linearised), np.asarray(actual), rtol=1e-12, atol=1e-12)


def test_the_kernel_error_shrinks_with_the_step_size():
    text = study.run(study.get_config("quick"))
    errors = [float(line.split("|")[3]) for line in text.splitlines() if line.startswith("| 0.")]
    assert len(errors) == 3 and errors[0] > errors[1] > errors[2] and errors[2] < 0.01, text
