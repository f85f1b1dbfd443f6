"""with_gradient_penalty: the formula on a quadratic, and the backward-error claim of post 7787."""
import jax
import jax.numpy as jnp
import numpy as np

from losses import with_gradient_penalty

A = np.array([[3.0, 1.0], [1.0, 2.0]])
B = np.array([1.0, -2.0])


def _quadratic(theta, a, b):
    return 0.5 * theta @ a @ theta - b @ theta


def test_quadratic_value_and_gradient_match_closed_form():
    theta = np.array([0.3, -0.7])
    penalized = with_gradient_penalty(_quadratic, coefficient=0.2)
    residual = A @ theta - B  # ∇L
    with jax.enable_x64(True):
        value, grad = jax.value_and_grad(penalized)(jnp.asarray(theta), A, B)
    np.testing.assert_allclose(value, _quadratic(theta, A, B) + 0.2 * residual @ residual, rtol=1e-12)
    np.testing.assert_allclose(grad, residual + 2 * 0.2 * A @ residual, rtol=1e-12)  # ∇L + 2c H ∇L


def test_pytree_params_and_keyword_arguments():
    params = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(0.5)}
    loss = lambda p, x, *, scale: scale * jnp.sum((p["w"] * x + p["b"]) ** 2)
    x = jnp.array([1.0, -1.0])
    residual = params["w"] * x + params["b"]  # [1.5, -1.5]
    grad_w, grad_b = 2 * 3.0 * residual * x, 2 * 3.0 * jnp.sum(residual)
    want = loss(params, x, scale=3.0) + 0.1 * (jnp.sum(grad_w**2) + grad_b**2)
    penalized = with_gradient_penalty(loss, coefficient=0.1)
    np.testing.assert_allclose(penalized(params, x, scale=3.0), want, rtol=1e-6)


def _loss(theta):
    return 0.5 * theta @ jnp.asarray(A) @ theta + 0.25 * jnp.sum(theta**4)


def _flow(loss, theta, duration, steps=200):
    """θ' = -∇loss(θ) integrated over `duration` with classical RK4."""
    field = lambda t: -jax.grad(loss)(t)  # noqa: E731
    dt = duration / steps

    def step(_, t):
        k1 = field(t)
        k2 = field(t + dt / 2 * k1)
        k3 = field(t + dt / 2 * k2)
        k4 = field(t + dt * k3)
        return t + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)

    return jax.lax.fori_loop(0, steps, step, theta)


@jax.jit
def _distances_from_one_gd_step(theta, h):
    """‖GD step − flow of L‖ and ‖GD step − flow of L + h/4 ‖∇L‖²‖ after time h."""
    gd = theta - h * jax.grad(_loss)(theta)
    modified = with_gradient_penalty(_loss, coefficient=h / 4)
    return jnp.linalg.norm(gd - _flow(_loss, theta, h)), jnp.linalg.norm(gd - _flow(modified, theta, h))


def test_gradient_descent_follows_the_penalized_flow_to_higher_order():
    """One GD step of size h is O(h²) from the flow of L but O(h³) from that of L + h/4 ‖∇L‖²."""
    with jax.enable_x64(True):
        errors = np.array([_distances_from_one_gd_step(jnp.array([0.8, -0.5]), h) for h in (0.04, 0.02)])
    order_plain, order_penalized = np.log2(errors[0] / errors[1])
    assert 1.8 < order_plain < 2.2, errors
    assert 2.8 < order_penalized < 3.2, errors
