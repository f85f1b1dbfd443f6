r"""Recurrent cells and the Jacobian of the last state with respect to earlier ones (post 7888,
"也来谈谈RNN的梯度消失/爆炸问题", https://kexue.fm/archives/7888).

Each cell maps `(state, x_t) → (new state, output h_t)`; the state is `h` for the tanh RNN and the GRU and
`(c, h)` for the LSTM:

  tanh RNN:  h_t = tanh(W x_t + U h_{t−1} + b)
  GRU (Cho et al. 2014):  z = σ(W_z x + U_z h + b_z),  r = σ(W_r x + U_r h + b_r),
             ĥ = tanh(W_h x + U_h (r ⊙ h) + b_h),  h_t = (1 − z) ⊙ h_{t−1} + z ⊙ ĥ
  LSTM (Hochreiter & Schmidhuber 1997, with a forget gate):  i, f, o = σ(·), g = tanh(·) of W x + U h + b,
             c_t = f ⊙ c_{t−1} + i ⊙ g,  h_t = o ⊙ tanh(c_t);  the forget gate's bias starts at
             `forget_bias` (1.0 in Jozefowicz et al. 2015)

The post's argument: ∂h_T/∂h_t = Π_{k=t+1}^{T} ∂h_k/∂h_{k−1}; for the tanh RNN each factor is diag(1 − h_k²) U, so
the product shrinks or grows geometrically with T − t (vanishing or exploding); in the LSTM the direct path
∂c_k/∂c_{k−1} = diag(f_k) is a gate the model sets, so long-range terms can be kept near 1 (and the GRU's
1 − z plays the same role). `state_jacobian_norms` measures ‖∂s_T/∂s_t‖ along a real input sequence.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree


class _Affine(nn.Module):
    """W x + U h + b for `parts` stacked gates: input weights LeCun-normal, recurrent weights N(0, gain²/d)."""

    features: int
    parts: int = 1
    recurrent_gain: float = 1.0
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, x, h):
        d = self.features
        w = self.param("input_kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.parts * d))
        u = self.param("recurrent_kernel", nn.initializers.normal(self.recurrent_gain / np.sqrt(d)),
                       (h.shape[-1], self.parts * d))
        b = self.param("bias", self.bias_init, (self.parts * d,))
        return x @ w + h @ u + b


class _Cell(nn.Module):
    """A cell whose state is one vector h of `features` (starting at zero)."""

    features: int
    recurrent_gain: float = 1.0

    def initial_state(self, batch_shape=()):
        return jnp.zeros((*batch_shape, self.features))


class TanhRNNCell(_Cell):
    @nn.compact
    def __call__(self, h, x):
        h = jnp.tanh(_Affine(self.features, 1, self.recurrent_gain, name="affine")(x, h))
        return h, h


class GRUCell(_Cell):
    @nn.compact
    def __call__(self, h, x):
        z, r = jnp.split(jax.nn.sigmoid(_Affine(self.features, 2, self.recurrent_gain, name="gates")(x, h)), 2, -1)
        candidate = jnp.tanh(_Affine(self.features, 1, self.recurrent_gain, name="candidate")(x, r * h))
        h = (1 - z) * h + z * candidate
        return h, h


class LSTMCell(_Cell):
    forget_bias: float = 1.0

    def initial_state(self, batch_shape=()):
        zeros = jnp.zeros((*batch_shape, self.features))
        return zeros, zeros

    @nn.compact
    def __call__(self, state, x):
        c, h = state
        d = self.features

        def bias_init(key, shape, dtype=jnp.float32):  # order i, f, g, o; the forget gate's bias starts raised
            return jnp.zeros(shape, dtype).at[d:2 * d].set(self.forget_bias)

        i, f, g, o = jnp.split(_Affine(d, 4, self.recurrent_gain, bias_init, name="gates")(x, h), 4, -1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (c, h), h


CELLS = {"rnn": TanhRNNCell, "gru": GRUCell, "lstm": LSTMCell}


class Recurrent(nn.Module):
    """Runs a cell over `inputs [batch, T, features_in]`; returns (final state, outputs `[batch, T, features]`)."""

    cell: nn.Module

    @nn.compact
    def __call__(self, inputs, state=None):
        if inputs.ndim != 3:
            raise ValueError(f"Recurrent: inputs must be [batch, time, features], got shape {inputs.shape}")
        scan = nn.scan(lambda cell, carry, x: cell(carry, x), variable_broadcast="params",
                       split_rngs={"params": False}, in_axes=1, out_axes=1)
        state = self.cell.initial_state(inputs.shape[:1]) if state is None else state
        return scan(self.cell, state, inputs)


def state_jacobian_norms(cell: nn.Module, params, inputs: jnp.ndarray, state=None) -> np.ndarray:
    """Spectral norms ‖∂s_T/∂s_t‖₂ for t = T−1, …, 0 (entry k: T − t = k + 1) along one sequence `inputs [T, d_in]`,
    s the whole state ((c, h) concatenated for the LSTM), from the per-step Jacobians ∂s_k/∂s_{k−1} (forward-mode)
    multiplied from the end: P_{T} = I, P_{t} = P_{t+1} J_{t+1}."""
    flat0, unravel = ravel_pytree(cell.initial_state() if state is None else state)

    def step(flat, x):
        return ravel_pytree(cell.apply({"params": params}, unravel(flat), x)[0])[0]

    def forward(flat, x):
        return step(flat, x), (flat, x)

    _, (before, xs) = jax.lax.scan(forward, flat0, inputs)  # the state entering each step
    jacobians = jax.vmap(jax.jacfwd(step))(before, xs)  # [T, S, S]: J_k = ∂s_k/∂s_{k−1}

    def backward(product, jacobian):
        product = product @ jacobian
        return product, jnp.linalg.norm(product, ord=2)

    eye = jnp.eye(before.shape[-1], dtype=before.dtype)
    _, norms = jax.lax.scan(backward, eye, jacobians, reverse=True)  # norms[t] = ‖∂s_T/∂s_t‖ (s_t before step t)
    return np.asarray(norms)[::-1]
