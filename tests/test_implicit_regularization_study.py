"""experiments/implicit_regularization.py: its integrator against the closed-form flow of a quadratic, and the
O(h) / O(h²) orders of post 7787 at the quick size."""
import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg

from experiments import implicit_regularization as study


def test_rk4_flow_and_gradient_descent_on_a_quadratic_are_the_closed_forms():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(5, 5))
    a = q @ q.T / 5 + 0.1 * np.eye(5)
    theta0 = rng.normal(size=5)
    with jax.enable_x64(True):
        loss = lambda t: 0.5 * t @ jnp.asarray(a) @ t  # noqa: E731
        flowed = np.asarray(study.flow(loss, jnp.asarray(theta0), 1.5, 0.01))
        stepped = np.asarray(study.gradient_descent(loss, jnp.asarray(theta0), 0.1, 15))
    np.testing.assert_allclose(flowed, linalg.expm(-1.5 * a) @ theta0, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stepped, np.linalg.matrix_power(np.eye(5) - 0.1 * a, 15) @ theta0, rtol=1e-12)


def test_gradient_descent_is_first_order_to_the_flow_and_second_order_to_the_modified_flow():
    config = study.get_config("quick")
    config.examples, config.hidden, config.step_sizes = 32, 4, (0.2, 0.1, 0.05)
    text = study.run(config)
    slopes = text.split("Log-log slopes against h: flow of L ")[1]
    plain, modified = float(slopes.split(",")[0]), float(slopes.split("modified loss ")[1].split(" ")[0])
    assert 0.85 < plain < 1.15 and 1.8 < modified < 2.3, text
