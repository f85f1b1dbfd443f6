"""experiments/exact_accuracy.py: the three-point toy of post 9098 against its closed forms."""
import numpy as np
import pytest
from scipy import optimize, special

from experiments import exact_accuracy


def _config(steps=1500):
    config = exact_accuracy.get_config("quick")
    config.toy_steps = steps
    return config


def test_cross_entropy_reaches_its_closed_form_optimum_which_misclassifies():
    """Sigmoid CE's stationarity: σ(b − 0.25) = σ(−0.25 − b) + σ(−b), a root outside (0, 0.25)."""
    root = optimize.brentq(lambda b: special.expit(b - 0.25) - special.expit(-0.25 - b) - special.expit(-b), 0, 2)
    result = exact_accuracy.train_toy(_config(), "cross_entropy")
    assert abs(result["b"] - root) < 1e-3 and result["accuracy"] == pytest.approx(2 / 3)
    assert abs(np.mean(result["grid_optimum"]) - root) < 1e-3


def test_exact_with_annealed_sigma_classifies_all_three_points():
    result = exact_accuracy.train_toy(_config(), "exact")
    assert 0 < result["b"] < 0.25 and result["accuracy"] == 1.0
    lo, hi = result["grid_optimum"]
    assert 0 < lo <= 0.125 <= hi < 0.25  # the symmetric, max-margin b is optimal at small σ


def test_normalised_logits_keep_the_argmax_and_fix_the_norm():
    z = np.random.default_rng(0).normal(size=(5, 10)) * 7
    out = np.asarray(exact_accuracy.normalised_logits(z))
    assert np.all(out.argmax(-1) == z.argmax(-1))
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.sqrt(10), rtol=1e-5)
