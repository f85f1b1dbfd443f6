"""ZLPR (dense, soft, sparse) against float64 NumPy, its identities, and hypothesis properties."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from losses import multilabel_categorical_crossentropy as zlpr
from losses import sparse_multilabel_categorical_crossentropy as sparse_zlpr
from tests.losses import numpy_reference as ref

PROPERTY_SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)


def _random(seed, shape, scale=3.0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=shape) * scale, rng


def test_dense_matches_reference_hard_and_soft_float64():
    logits, rng = _random(0, (4, 3, 7))
    hard = (rng.random((4, 3, 7)) < 0.3).astype(np.float64)
    soft = rng.random((4, 3, 7))
    with jax.enable_x64(True):
        np.testing.assert_allclose(zlpr(logits, hard), ref.zlpr_hard(logits, hard), rtol=1e-12)
        np.testing.assert_allclose(zlpr(logits, soft), ref.zlpr_soft(logits, soft), rtol=1e-12)


def test_dense_matches_reference_float32_with_mask():
    logits, rng = _random(1, (5, 9))
    labels = rng.random((5, 9))
    mask = rng.random((5, 9)) < 0.6
    mask[0] = False  # a fully masked row has loss 0
    out = zlpr(jnp.float32(logits), jnp.float32(labels), where=mask)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref.zlpr_soft(logits, labels, mask), rtol=2e-6, atol=1e-6)
    assert out[0] == 0.0


def test_class_mask_broadcasts_over_the_batch():
    logits, rng = _random(2, (3, 6))
    labels = (rng.random((3, 6)) < 0.5).astype(np.float32)
    mask = np.array([True, False, True, True, False, True])
    np.testing.assert_allclose(
        zlpr(logits.astype(np.float32), labels, where=mask),
        zlpr(logits[:, mask].astype(np.float32), labels[:, mask]),
        rtol=1e-6,
    )


def test_single_class_hard_labels_equal_sigmoid_bce():
    # With n = 1 the class is either positive (log(1 + e^-s)) or negative (log(1 + e^s)).
    logits = jnp.linspace(-30.0, 30.0, 41)[:, None]
    for label in (0.0, 1.0):
        labels = jnp.full_like(logits, label)
        np.testing.assert_allclose(
            zlpr(logits, labels),
            optax.sigmoid_binary_cross_entropy(logits[:, 0], labels[:, 0]),
            rtol=1e-6, atol=1e-7,
        )


def test_single_class_soft_label_minimiser_is_sigmoid_2s_not_sigmoid_s():
    t = jnp.array([0.05, 0.3, 0.5, 0.8, 0.97])
    grad = jax.jit(jax.vmap(jax.grad(lambda s, t: zlpr(s[None], t[None]))))
    s_star = 0.5 * jnp.log(t / (1 - t))  # σ(2 s*) = t
    np.testing.assert_allclose(grad(s_star, t), 0.0, atol=1e-6)
    assert np.all(np.abs(grad(2 * s_star, t)[t != 0.5]) > 1e-2)  # σ(s) = t is not the optimum


def test_sparse_with_mask_zero_equals_dense_without_class_zero():
    logits, _ = _random(3, (2, 3, 8))
    indices = np.array([[[3, 5, 0], [1, 0, 0], [0, 0, 0]], [[7, 2, 4], [6, 0, 0], [2, 0, 0]]])
    labels = ref.multi_hot(indices, 8, mask_zero=True)
    where = np.arange(8) != 0
    with jax.enable_x64(True):
        np.testing.assert_allclose(
            sparse_zlpr(logits, indices, mask_zero=True),
            ref.zlpr_soft(logits, labels, where),
            rtol=1e-12,
        )


def test_sparse_stays_exact_when_positives_dominate():
    # The a + log(1 - e^{b-a}) form (post 8888) cancels here; the exact negative term is
    # log(1 + e^-1 + e^-2) ≈ 0.4076 and the positive term ≈ 0 (the clipped form gives ≈ 9984).
    logits = jnp.array([[1e4, 1e4 - 5.0, -1.0, -2.0]], jnp.float32)
    out = sparse_zlpr(logits, jnp.array([[0, 1]]))
    np.testing.assert_allclose(out, [np.log1p(np.exp(-1) + np.exp(-2))], rtol=1e-6)


def test_sparse_gradient_equals_dense_gradient():
    logits, rng = _random(4, (6, 10))
    indices = np.stack([rng.choice(10, 3, replace=False) for _ in range(6)])
    labels = ref.multi_hot(indices, 10)
    logits = jnp.float32(logits)
    g_sparse, g_dense = jax.jit(lambda s: (jax.grad(lambda s: sparse_zlpr(s, indices).sum())(s),
                                           jax.grad(lambda s: zlpr(s, labels).sum())(s)))(logits)
    np.testing.assert_allclose(g_sparse, g_dense, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: zlpr(jnp.ones((2, 3)), jnp.ones((2, 4))), "labels"),
        (lambda: zlpr(jnp.ones((2, 3)), jnp.full((2, 3), 1.5)), "labels"),
        (lambda: zlpr(jnp.ones((2, 3)), -jnp.ones((2, 3))), "labels"),
        (lambda: zlpr(jnp.ones((2, 3), jnp.int32), jnp.ones((2, 3))), "logits"),
        (lambda: zlpr(jnp.ones((2, 3)), jnp.ones((2, 3)), where=jnp.ones((2,), bool)), "where"),
        (lambda: zlpr(jnp.ones((2, 3)), jnp.ones((2, 3)), where=jnp.ones((2, 3))), "where"),
        (lambda: sparse_zlpr(jnp.ones((2, 3)), jnp.array([[0], [3]])), "label_indices"),
        (lambda: sparse_zlpr(jnp.ones((2, 3)), jnp.array([[1, 1], [0, 2]])), "label_indices"),
        (lambda: sparse_zlpr(jnp.ones((2, 3)), jnp.array([[1.0], [2.0]])), "label_indices"),
        (lambda: sparse_zlpr(jnp.ones((2, 3)), jnp.array([1, 2])), "label_indices"),
        (lambda: sparse_zlpr(jnp.ones((2, 3), jnp.int8), jnp.array([[1], [2]])), "logits"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_label_range_is_not_checked_under_jit():
    # Documented: under tracing the values are unknown, so only shapes/dtypes are validated.
    out = jax.jit(zlpr)(jnp.zeros((1, 2)), jnp.full((1, 2), 2.0))
    assert np.isfinite(out).all()


def test_sparse_padding_index_may_repeat_with_mask_zero():
    logits = jnp.array([[0.0, 1.0, -1.0]])
    out = sparse_zlpr(logits, jnp.array([[1, 0, 0]]), mask_zero=True)
    np.testing.assert_allclose(out, ref.zlpr_hard(np.array([[1.0, -1.0]]), np.array([[1.0, 0.0]])), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Hypothesis properties: float64, fixed shapes (one compilation per test; varying the effective
# number of classes through masks and padding instead of array shapes), bounded example counts.

_SHAPE = (3, 8)
_logits = hnp.arrays(np.float64, _SHAPE, elements=st.floats(-50, 50))
_zlpr = jax.jit(zlpr)
_sparse = jax.jit(sparse_zlpr, static_argnames="mask_zero")


def _binary(seed, shape=_SHAPE, p=0.4):
    return (np.random.default_rng(seed).random(shape) < p).astype(np.float64)


@PROPERTY_SETTINGS
@given(logits=_logits, seed=st.integers(0, 2**16))
def test_property_hard_equals_soft_form_at_binary_labels(logits, seed):
    labels = _binary(seed)
    with jax.enable_x64(True):
        np.testing.assert_allclose(
            _zlpr(logits, labels), ref.zlpr_hard(logits, labels), rtol=1e-10, atol=1e-12
        )


@PROPERTY_SETTINGS
@given(logits=_logits, seed=st.integers(0, 2**16), num_padding=st.integers(0, 3))
def test_property_sparse_with_padding_equals_dense_on_multi_hot(logits, seed, num_padding):
    rng = np.random.default_rng(seed)
    n, k = _SHAPE[-1], 4
    classes = np.arange(1, n)  # with mask_zero, class 0 is reserved and index 0 pads
    indices = np.stack([
        np.concatenate([rng.choice(classes, k - num_padding, replace=False), [0] * num_padding])
        for _ in range(_SHAPE[0])
    ]).astype(np.int32)
    labels = ref.multi_hot(indices, n, mask_zero=True)
    with jax.enable_x64(True):
        np.testing.assert_allclose(
            _sparse(logits, indices, mask_zero=True),
            _zlpr(logits, labels, where=np.arange(n) != 0),
            rtol=1e-10, atol=1e-12,
        )


@PROPERTY_SETTINGS
@given(logits=_logits, seed=st.integers(0, 2**16), k=st.sampled_from([0, 1, 3, 8]))
def test_property_sparse_equals_dense_on_multi_hot(logits, seed, k):
    rng = np.random.default_rng(seed)
    indices = np.stack([rng.choice(_SHAPE[-1], k, replace=False) for _ in range(_SHAPE[0])])
    indices = indices.reshape(_SHAPE[0], k).astype(np.int32)
    labels = ref.multi_hot(indices, _SHAPE[-1])
    with jax.enable_x64(True):
        np.testing.assert_allclose(_sparse(logits, indices), _zlpr(logits, labels), rtol=1e-10, atol=1e-12)


_zlpr_grad = jax.jit(jax.grad(lambda s, t, m: zlpr(s, t, where=m).sum()))


@PROPERTY_SETTINGS
@given(logits=_logits, seed=st.integers(0, 2**16))
def test_property_bounds_and_monotonicity_for_hard_labels(logits, seed):
    """softplus bounds <= loss <= bounds + log counts; raising a positive lowers the loss."""
    labels, mask = _binary(seed), _binary(seed + 1, p=0.7) > 0
    with jax.enable_x64(True):
        loss = np.asarray(_zlpr(logits, labels, where=mask))
        grads = np.asarray(_zlpr_grad(logits, labels, mask))
    for s, t, m, value in zip(logits, labels, mask, loss):
        pos, neg = s[m & (t == 1)], s[m & (t == 0)]
        lower = np.logaddexp(0, np.max(-pos, initial=-np.inf)) + np.logaddexp(0, np.max(neg, initial=-np.inf))
        upper = lower + np.log1p(pos.size) + np.log1p(neg.size)  # logsumexp <= max + log n (post 9070)
        assert 0.0 <= lower <= value + 1e-9 and value <= upper + 1e-9
    assert np.all(grads[mask & (labels == 1)] <= 0.0) and np.all(grads[mask & (labels == 0)] >= 0.0)
    assert np.all(grads[~mask] == 0.0)


_soft_grad = jax.jit(jax.grad(lambda s, t: zlpr(s, t).sum()))


@PROPERTY_SETTINGS
@given(targets=hnp.arrays(np.float64, _SHAPE, elements=st.floats(0.01, 0.99)))
def test_property_soft_minimiser_is_half_logit_of_target(targets):
    s_star = 0.5 * np.log(targets / (1 - targets))  # σ(2 s*) = t for every class, any n
    with jax.enable_x64(True):
        np.testing.assert_allclose(_soft_grad(s_star, targets), 0.0, atol=1e-12)
