"""Closed-form logistic regression vs scikit-learn's LDA, and the unargmaxable-class LP vs brute force."""
import jax
import numpy as np
import pytest
import scipy.spatial
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

from models.linear_classifiers import fit_closed_form_logistic_regression, unargmaxable_classes
from models.whitening import fit_whitening

K, D = 4, 3


def _gaussian_classes(seed=0, n=1200):
    rng = np.random.default_rng(seed)
    labels = rng.choice(K, size=n, p=[0.4, 0.3, 0.2, 0.1])
    means = rng.normal(size=(K, D)) * 2
    mixing = rng.normal(size=(D, D))
    return means[labels] + rng.normal(size=(n, D)) @ mixing, labels


def test_matches_sklearn_linear_discriminant_analysis():
    x, y = _gaussian_classes()
    with jax.enable_x64(True):
        classifier = fit_closed_form_logistic_regression(x, y, num_classes=K)
        logits = np.asarray(classifier(x))
    lda = LinearDiscriminantAnalysis(solver="lsqr").fit(x, y)
    np.testing.assert_allclose(np.asarray(classifier.kernel), lda.coef_.T, rtol=1e-8)
    np.testing.assert_allclose(np.asarray(classifier.bias), lda.intercept_, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(logits, lda.decision_function(x), rtol=1e-8, atol=1e-8)


def test_whitened_features_give_the_posts_covariance():
    """After whitening, Σ = I - Σ_k p_k μ_k μ_kᵀ (the formula in post 8578's script)."""
    x, y = _gaussian_classes(1)
    with jax.enable_x64(True):
        white = np.asarray(fit_whitening(x)(x))
        classifier = fit_closed_form_logistic_regression(white, y, num_classes=K)
    p = np.bincount(y) / len(y)
    mu = np.stack([white[y == k].mean(0) for k in range(K)])
    sigma = np.eye(D) - np.einsum("k,kd,ke->de", p, mu, mu)
    kernel = np.linalg.solve(sigma, mu.T)
    np.testing.assert_allclose(np.asarray(classifier.kernel), kernel, rtol=1e-8, atol=1e-10)
    bias = np.log(p) - 0.5 * np.sum(mu.T * kernel, 0)
    np.testing.assert_allclose(np.asarray(classifier.bias), bias, rtol=1e-8)


def test_missing_class_and_bad_shapes_raise():
    x, y = _gaussian_classes()
    with pytest.raises(ValueError, match="labels"):
        fit_closed_form_logistic_regression(x, np.where(y == 3, 0, y), num_classes=K)
    with pytest.raises(ValueError, match="labels"):
        fit_closed_form_logistic_regression(x, y[:-1], num_classes=K)
    with pytest.raises(ValueError, match="features"):
        fit_closed_form_logistic_regression(x.astype(int), y, num_classes=K)


def _brute_force_argmax_winners(kernel, bias, radius=50.0, points=20001, seed=0):
    """Classes that win the argmax somewhere on a dense random sample of a 2-D disc."""
    rng = np.random.default_rng(seed)
    angle, r = rng.uniform(0, 2 * np.pi, points), radius * np.sqrt(rng.uniform(0, 1, points))
    z = np.stack([r * np.cos(angle), r * np.sin(angle)], 1)
    return set(np.unique(np.argmax(z @ kernel + bias, axis=1)).tolist())


def test_the_example_of_post_9046():
    """w_5 = (1, 1) with w_1..w_4 = w_5 + (0, 1), (1, 0), (0, -1), (-1, 0): class 5 never wins."""
    kernel = np.array([[1.0, 2.0], [2.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]).T
    np.testing.assert_array_equal(unargmaxable_classes(kernel), [4])
    assert _brute_force_argmax_winners(kernel, np.zeros(5)) == {0, 1, 2, 3}


def test_equal_norm_weights_have_no_unargmaxable_class():
    """The post's remark: distinct weight vectors of equal norm (no bias) can all win."""
    rng = np.random.default_rng(3)
    kernel = rng.normal(size=(3, 40))
    kernel /= np.linalg.norm(kernel, axis=0)
    np.testing.assert_array_equal(unargmaxable_classes(kernel), [])
    kernel[:, 0] *= 0.2  # shrink one: now inside the hull of the others
    np.testing.assert_array_equal(unargmaxable_classes(kernel), [0])


def test_weight_inside_the_triangle_is_unargmaxable():
    """Post 9046's picture: with no bias, a class whose weight lies inside the convex hull of the
    others' can never win; moving it outside, or giving it a bias, makes it argmaxable."""
    inside = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0], [0.1, 0.1]]).T
    outside = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0], [1.0, 1.0]]).T
    zero, rescue = np.zeros(4), np.array([0.0, 0.0, 0.0, 0.5])
    np.testing.assert_array_equal(unargmaxable_classes(inside), [3])
    np.testing.assert_array_equal(unargmaxable_classes(outside), [])
    np.testing.assert_array_equal(unargmaxable_classes(inside, rescue), [])
    for kernel, bias in [(inside, zero), (outside, zero), (inside, rescue)]:
        winners = _brute_force_argmax_winners(kernel, bias)
        assert winners == set(range(4)) - set(unargmaxable_classes(kernel, bias).tolist())


def test_one_dimensional_outputs_allow_at_most_two_winners_without_bias():
    kernel = np.array([[-2.0, -0.5, 0.3, 1.0, 2.0]])  # d = 1: only the extreme weights can win
    np.testing.assert_array_equal(unargmaxable_classes(kernel), [1, 2, 3])
    # With biases, the upper envelope of the lines w_i z + b_i decides: class 2 now wins near z = 0.
    np.testing.assert_array_equal(unargmaxable_classes(kernel, np.array([0.0, 0.0, 1.0, 0.0, 0.0])), [1, 3])


def _upper_hull_vertices(kernel, bias):
    """Independent criterion: max_i w_i·z + b_i is the support function of the lifted points
    (w_i, b_i) in direction (z, 1), so class k can win strictly iff its point is a vertex of an
    upper facet (outward normal with positive last coordinate) of their convex hull."""
    hull = scipy.spatial.ConvexHull(np.column_stack([kernel.T, bias]))
    upper = hull.equations[:, -2] > 0  # equations: [normal, offset]; normal[-1] is column -2
    return set(np.unique(hull.simplices[upper]).tolist())


def test_random_layers_agree_with_the_convex_hull_criterion():
    rng = np.random.default_rng(7)
    for d in (2, 3):
        for _ in range(4):
            kernel, bias = rng.normal(size=(d, 12)), rng.normal(size=12) * 0.5
            argmaxable = set(range(12)) - set(unargmaxable_classes(kernel, bias).tolist())
            assert argmaxable == _upper_hull_vertices(kernel, bias)
