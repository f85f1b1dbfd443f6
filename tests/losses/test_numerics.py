"""Every logit loss: extreme logits in float32/bfloat16/float16 with masks, and jit/vmap/grad.

Values at |logit| = 1e4 are compared with the float64 NumPy references on the same (rounded)
inputs, so "finite" also means "right".
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import losses
from tests.losses import numpy_reference as ref

B, N = 4, 6
_rng = np.random.default_rng(0)
LABELS = _rng.integers(0, N, B)
SOFT = _rng.random((B, N)).round(1)  # includes exact 0 and 1
MASK = _rng.random((B, N)) < 0.7
MASK[np.arange(B), LABELS] = True
MASK[0] = False
MASK[0, LABELS[0]] = True  # row 0: only the target (FlatNCE: no negative -> 0)
INDICES = np.array([[1, 3, 0], [2, 0, 0], [5, 4, 1], [0, 0, 0]])  # mask_zero padding
PRIOR = _rng.dirichlet(np.ones(N))
MASKED = lambda s: np.where(MASK, s, -np.inf)  # noqa: E731  (reference: masked classes leave)


def _masked_reference(fn, no_negative_is_zero=False):
    """Masked classes leave the softmax (logit -inf); FlatNCE gives 0 to rows without a negative."""
    def reference(s):
        out = fn(MASKED(s))
        return np.where(MASK.sum(-1) > 1, out, 0.0) if no_negative_is_zero else out
    return reference


# name -> (loss of the logits, float64 reference of the same)
CASES = {
    "zlpr": (lambda s: losses.multilabel_categorical_crossentropy(s, SOFT, where=MASK),
             lambda s: ref.zlpr_soft(s, SOFT, MASK)),
    "sparse_zlpr": (lambda s: losses.sparse_multilabel_categorical_crossentropy(s, INDICES, mask_zero=True),
                    lambda s: ref.zlpr_soft(s, ref.multi_hot(INDICES, N, True), np.arange(N) != 0)),
    "flatnce": (lambda s: losses.flatnce(s, LABELS, where=MASK),
                _masked_reference(lambda s: ref.flatnce(s, LABELS), no_negative_is_zero=True)),
    "rdrop": (lambda s: losses.rdrop_loss(s, 0.5 * s[:, ::-1], LABELS, alpha=1.0),
              lambda s: ref.rdrop(s, 0.5 * s[:, ::-1], LABELS, 1.0)),
    "focal": (lambda s: losses.softmax_focal_loss(s, LABELS, gamma=0.5, alpha=PRIOR, where=MASK),
              _masked_reference(lambda s: ref.focal(s, LABELS, 0.5, PRIOR))),
    "logit_adjusted": (lambda s: losses.logit_adjusted_cross_entropy(s, LABELS, class_prior=PRIOR,
                                                                     where=MASK),
                       _masked_reference(lambda s: ref.logit_adjusted(s, LABELS, PRIOR, 1.0))),
    "smooth_accuracy": (lambda s: losses.smooth_accuracy_loss(s, LABELS, where=MASK),
                        _masked_reference(lambda s: ref.smooth_accuracy(s, LABELS))),
}
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}


def _extreme_logits():
    signs = np.random.default_rng(1).choice([-1.0, 1.0, 0.0], size=(B, N), p=[0.4, 0.4, 0.2])
    return 1e4 * signs + np.random.default_rng(2).normal(size=(B, N))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_extreme_logits_give_finite_right_values_and_finite_gradients(name, dtype):
    loss, reference = CASES[name]
    logits = jnp.asarray(_extreme_logits(), dtype)
    value_and_grad = jax.jit(lambda s: (loss(s), jax.grad(lambda s: loss(s).astype(jnp.float32).sum())(s)))
    value, grad = value_and_grad(logits)
    assert value.dtype == dtype and value.shape == (B,)
    assert grad.dtype == dtype and np.all(np.isfinite(np.asarray(grad, np.float32)))
    want = reference(np.asarray(logits, np.float64))
    np.testing.assert_allclose(np.asarray(value, np.float64), want, rtol=TOLERANCE[dtype], atol=1e-3)


@pytest.mark.parametrize("name", sorted(CASES))
def test_jit_vmap_and_grad(name):
    loss, reference = CASES[name]
    stacked = np.random.default_rng(3).normal(size=(3, B, N)) * 2
    x, v = stacked[0], np.random.default_rng(4).normal(size=(B, N))
    transformed = jax.jit(lambda xs, x: (jax.vmap(loss)(xs), jax.grad(lambda s: loss(s).sum())(x)))
    with jax.enable_x64(True):
        vmapped, grad = transformed(stacked, x)
    np.testing.assert_allclose(vmapped, np.stack([reference(x) for x in stacked]), rtol=1e-10)
    # Directional derivative of the summed loss against central differences of the reference.
    eps = 1e-6
    numeric = (reference(x + eps * v).sum() - reference(x - eps * v).sum()) / (2 * eps)
    np.testing.assert_allclose(np.sum(np.asarray(grad) * v), numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("fn, reference", [
    (losses.gaussian_kl_divergence, ref.gaussian_kl),
    (losses.gaussian_bhattacharyya_distance, ref.gaussian_bhattacharyya),
    (losses.gaussian_wasserstein_distance_squared, ref.gaussian_w2_squared),
])
def test_gaussians_jit_vmap_grad(fn, reference):
    rng = np.random.default_rng(5)
    means, a = rng.normal(size=(2, 3, 3)), rng.normal(size=(2, 3, 3, 3))
    covs = a @ np.swapaxes(a, -1, -2) + np.eye(3)
    transformed = jax.jit(lambda m, c: (jax.vmap(fn)(m[0], c[0], m[1], c[1]),
                                        jax.grad(fn)(m[0, 0], c[0, 0], m[1, 0], c[1, 0])))
    with jax.enable_x64(True):
        vmapped, grad = transformed(means, covs)
    want = [reference(means[0, i], covs[0, i], means[1, i], covs[1, i]) for i in range(3)]
    np.testing.assert_allclose(vmapped, want, rtol=1e-9)
    v, eps = rng.normal(size=3), 1e-6
    shifted = [reference(means[0, 0] + sign * eps * v, covs[0, 0], means[1, 0], covs[1, 0])
               for sign in (1, -1)]
    np.testing.assert_allclose(np.dot(grad, v), (shifted[0] - shifted[1]) / (2 * eps), rtol=1e-6, atol=1e-9)


def test_perturb_max_under_jit_and_vmap_and_its_zero_gradient():
    logits = jnp.float32(np.random.default_rng(6).normal(size=(2, B, N)))
    key = jax.random.key(0)
    def estimate(s):
        return losses.perturb_max_probabilities(s, noise="gumbel", num_samples=256, rng=key)

    np.testing.assert_array_equal(jax.jit(jax.vmap(estimate))(logits), [estimate(x) for x in logits])
    grad = jax.jit(jax.grad(lambda s: jnp.sum(estimate(s) * jnp.arange(N))))(logits[0])
    np.testing.assert_array_equal(grad, 0.0)  # a sampler, not a relaxation: piecewise constant
