"""models/recurrent.py: the cells against their formulas in float64 NumPy, and the Jacobian norms against
differentiating the unrolled recurrence (post 7888)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import recurrent


def _sigmoid(v):
    return 1 / (1 + np.exp(-v))


def _numpy_step(name, params, state, x):
    def affine(p, xv, hv):
        return xv @ np.asarray(p["input_kernel"]) + hv @ np.asarray(p["recurrent_kernel"]) + np.asarray(p["bias"])

    if name == "rnn":
        h = np.tanh(affine(params["affine"], x, state))
        return h
    if name == "gru":
        z, r = np.split(_sigmoid(affine(params["gates"], x, state)), 2, -1)
        candidate = np.tanh(affine(params["candidate"], x, r * state))
        return (1 - z) * state + z * candidate
    c, h = state
    i, f, g, o = np.split(affine(params["gates"], x, h), 4, -1)
    c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
    return c, _sigmoid(o) * np.tanh(c)


@pytest.mark.parametrize("name", ["rnn", "gru", "lstm"])
def test_cells_over_a_sequence_match_their_formulas(name):
    with jax.enable_x64(True):
        cell = recurrent.CELLS[name](5)
        model = recurrent.Recurrent(cell)
        x = np.random.default_rng(0).normal(size=(3, 7, 2))
        params = model.init(jax.random.key(0), jnp.asarray(x))["params"]
        params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(1), p.shape, p.dtype), params)
        final, outputs = model.apply({"params": params}, jnp.asarray(x))
    cell_params = jax.tree.map(np.asarray, params["cell"])
    state = (np.zeros((3, 5)), np.zeros((3, 5))) if name == "lstm" else np.zeros((3, 5))
    for t in range(7):
        state = _numpy_step(name, cell_params, state, x[:, t])
        h = state[1] if name == "lstm" else state
        np.testing.assert_allclose(np.asarray(outputs[:, t]), h, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(jax.tree.leaves(final)[-1]), h, rtol=1e-12)


def test_lstm_forget_gate_bias_starts_at_forget_bias():
    cell = recurrent.LSTMCell(4, forget_bias=1.0)
    params = recurrent.Recurrent(cell).init(jax.random.key(0), jnp.zeros((1, 2, 3)))["params"]
    np.testing.assert_array_equal(np.asarray(params["cell"]["gates"]["bias"]), [0] * 4 + [1] * 4 + [0] * 8)


@pytest.mark.parametrize("name", ["rnn", "gru", "lstm"])
def test_jacobian_norms_are_those_of_the_recurrence_by_finite_differences(name):
    """Reference: central differences of the float64 NumPy recurrence (independent of JAX's derivatives)."""
    T, d = 4, 3
    with jax.enable_x64(True):
        cell = recurrent.CELLS[name](d)
        x = np.random.default_rng(1).normal(size=(T, 2))
        params = recurrent.Recurrent(cell).init(jax.random.key(0), jnp.asarray(x)[None])["params"]["cell"]
        params = jax.tree.map(lambda p: p + 0.5 * jax.random.normal(jax.random.key(2), p.shape, p.dtype), params)
        norms = recurrent.state_jacobian_norms(cell, params, jnp.asarray(x))
    p = jax.tree.map(np.asarray, params)
    pack = (lambda s: np.concatenate(s)) if name == "lstm" else (lambda s: s)  # noqa: E731
    unpack = (lambda v: (v[:d], v[d:])) if name == "lstm" else (lambda v: v)  # noqa: E731
    state, states = unpack(np.zeros(2 * d if name == "lstm" else d)), []
    for t in range(T):
        states.append(pack(state))
        state = _numpy_step(name, p, state, x[t])

    def rest(v, t):
        s = unpack(v)
        for k in range(t, T):
            s = _numpy_step(name, p, s, x[k])
        return pack(s)

    eps = 1e-6
    for t in range(T):
        columns = [(rest(states[t] + eps * e, t) - rest(states[t] - eps * e, t)) / (2 * eps)
                   for e in np.eye(len(states[t]))]
        np.testing.assert_allclose(norms[T - t - 1], np.linalg.norm(np.stack(columns, 1), 2), rtol=1e-7)


def test_a_saturated_forget_gate_keeps_the_cell_jacobian_at_one():
    """f = 1, i = 0 everywhere: c_T = c_t, so ∂c_T/∂c_t = I and the whole-state norm stays ≥ 1 at any distance."""
    cell = recurrent.LSTMCell(3)
    params = recurrent.Recurrent(cell).init(jax.random.key(0), jnp.zeros((1, 2, 1)))["params"]["cell"]
    bias = jnp.zeros(12).at[3:6].set(40.0).at[0:3].set(-40.0)
    params = {"gates": {"bias": bias, "input_kernel": params["gates"]["input_kernel"] * 0,
                        "recurrent_kernel": params["gates"]["recurrent_kernel"] * 0}}
    norms = recurrent.state_jacobian_norms(cell, params, jnp.ones((12, 1)))
    assert np.all(norms >= 1 - 1e-6) and np.all(norms < 1.5)
