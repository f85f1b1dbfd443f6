"""FlatNCE against float64 NumPy and its identities; GradCache against the full-batch gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from losses import contrastive_grad_cache, flatnce
from tests.losses import numpy_reference as ref

SHAPE = (5, 8)


def _inputs(seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=SHAPE) * 3, rng.integers(0, SHAPE[-1], SHAPE[:-1])


def test_flatnce_matches_reference_value_and_gradient():
    s, y = _inputs(0)
    with jax.enable_x64(True):
        value, grad = jax.jit(lambda s: (flatnce(s, y), jax.grad(lambda s: flatnce(s, y).sum())(s)))(s)
    np.testing.assert_allclose(value, ref.flatnce(s, y), rtol=1e-12)
    np.testing.assert_allclose(grad, ref.flatnce_grad(s, y), rtol=1e-10, atol=1e-14)


def test_flatnce_is_infonce_plus_log_one_minus_p_target():
    s, y = _inputs(1)
    p_t = np.take_along_axis(ref.softmax(s), y[..., None], -1)[..., 0]
    with jax.enable_x64(True):
        infonce = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(s), y)
        np.testing.assert_allclose(flatnce(s, y), infonce + np.log1p(-p_t), rtol=1e-10)


def test_flatnce_gradient_equals_gradient_of_xi_over_stopped_xi():
    s, y = _inputs(2)

    def xi_over_sg_xi(s):
        others = jnp.arange(SHAPE[-1]) != y[:, None]
        s_t = jnp.take_along_axis(s, y[:, None], -1)
        xi = jnp.sum(jnp.where(others, jnp.exp(s - s_t), 0.0), axis=-1)
        return jnp.sum(xi / jax.lax.stop_gradient(xi))

    both = jax.jit(lambda s: (jax.grad(lambda s: flatnce(s, y).sum())(s), jax.grad(xi_over_sg_xi)(s)))
    with jax.enable_x64(True):
        grad_flat, grad_xi = both(s)
    np.testing.assert_allclose(grad_flat, grad_xi, rtol=1e-10, atol=1e-14)


def test_flatnce_gradient_survives_where_infonce_vanishes_in_float32():
    # p_t ≈ 1: InfoNCE's gradient (p - onehot) rounds to exactly 0 in float32; FlatNCE's does not.
    s = jnp.array([[40.0, 0.0, 1.0, -1.0]])
    y = jnp.array([0])
    infonce = lambda s: optax.softmax_cross_entropy_with_integer_labels(s, y).sum()  # noqa: E731
    grads = jax.jit(lambda s: (jax.grad(infonce)(s), jax.grad(lambda s: flatnce(s, y).sum())(s)))
    grad_info, grad_flat = grads(s)
    assert grad_info[0, 0] == 0.0 and np.all(np.abs(np.asarray(grad_info)) < 1e-16)  # 1 - p_t -> 0
    np.testing.assert_allclose(grad_flat, ref.flatnce_grad(np.asarray(s), np.asarray(y)), rtol=1e-6)


def test_flatnce_mask_drops_candidates_and_empty_rows_give_zero():
    s, y = _inputs(3)
    mask = np.random.default_rng(3).random(SHAPE) < 0.5
    mask[np.arange(SHAPE[0]), y] = True
    mask[0] = False
    mask[0, y[0]] = True  # positive only, no negatives -> 0
    with jax.enable_x64(True):
        out = np.asarray(flatnce(s, y, where=mask))
    want = ref.flatnce(np.where(mask, s, -np.inf), y)
    np.testing.assert_allclose(out[1:], want[1:], rtol=1e-10)
    assert out[0] == 0.0


def test_flatnce_bad_inputs():
    with pytest.raises(ValueError, match="logits"):
        flatnce(jnp.ones((2, 1)), jnp.zeros(2, int))  # needs a negative
    with pytest.raises(ValueError, match="labels"):
        flatnce(jnp.ones((2, 3)), jnp.zeros((2, 1), int))
    with pytest.raises(ValueError, match="labels"):
        flatnce(jnp.ones((2, 3)), jnp.array([0, 5]))


# ----------------------------------------------------------------------------------------------
# GradCache: a two-tower dual encoder with dropout, in-batch InfoNCE.

BATCH, DIM, HIDDEN, OUT = 16, 6, 12, 4


def _params(seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"w1": (DIM, HIDDEN), "w2": (HIDDEN, OUT), "v1": (DIM, HIDDEN), "v2": (HIDDEN, OUT)}
    return {name: jnp.float32(rng.normal(size=shape) / np.sqrt(shape[0])) for name, shape in shapes.items()}


def _embed(params, batch, rng):
    """(queries, documents) embeddings; dropout on both towers' hidden layers."""
    rq, rd = jax.random.split(rng)

    def tower(x, w1, w2, key):
        h = jnp.tanh(x @ w1)
        keep = jax.random.bernoulli(key, 0.7, h.shape)
        h = jnp.where(keep, h / 0.7, 0.0)
        e = h @ w2
        return e / jnp.linalg.norm(e, axis=-1, keepdims=True)

    return (tower(batch["query"], params["w1"], params["w2"], rq),
            tower(batch["doc"], params["v1"], params["v2"], rd))


def _in_batch_infonce(embeddings):
    queries, docs = embeddings
    scores = queries @ docs.T / 0.1
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(scores, jnp.arange(scores.shape[0])))


def _batch(seed=1):
    rng = np.random.default_rng(seed)
    return {name: jnp.float32(rng.normal(size=(BATCH, DIM))) for name in ("query", "doc")}


def _full_batch_reference(params, batch, rng, num_chunks):
    """jax.value_and_grad of the loss on all embeddings at once, chunk c embedded with keys[c]."""
    keys = jax.random.split(rng, num_chunks)
    chunks = jax.tree.map(lambda x: x.reshape(num_chunks, -1, *x.shape[1:]), batch)

    def loss(p):
        embeddings = jax.vmap(_embed, in_axes=(None, 0, 0))(p, chunks, keys)
        return _in_batch_infonce(jax.tree.map(lambda e: e.reshape(BATCH, -1), embeddings))

    return jax.value_and_grad(loss)(params)


def test_grad_cache_equals_full_batch_gradient_with_dropout():
    params, batch, rng = _params(), _batch(), jax.random.key(0)
    value_and_grad = jax.jit(contrastive_grad_cache(_embed, _in_batch_infonce, num_chunks=4))
    value, grads = value_and_grad(params, batch, rng)
    reference = jax.jit(_full_batch_reference, static_argnums=3)
    ref_value, ref_grads = reference(params, batch, rng, 4)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    for name in params:
        np.testing.assert_allclose(grads[name], ref_grads[name], rtol=2e-5, atol=2e-6)
    # Dropout is live: other keys give another gradient, so reusing the keys matters.
    other_keys = reference(params, batch, jax.random.key(1), 4)[1]
    assert not np.allclose(other_keys["w1"], ref_grads["w1"], rtol=1e-3)


def test_grad_cache_bad_chunking():
    value_and_grad = contrastive_grad_cache(_embed, _in_batch_infonce, num_chunks=3)
    with pytest.raises(ValueError, match="num_chunks"):
        value_and_grad(_params(), _batch(), jax.random.key(0))
    with pytest.raises(ValueError, match="num_chunks"):
        contrastive_grad_cache(_embed, _in_batch_infonce, num_chunks=0)
