"""experiments/rnn_gradients.py: the adding problem is what it says."""
import jax
import numpy as np

from experiments import rnn_gradients as study


def test_adding_problem_has_one_marker_per_half_and_sums_the_marked_values():
    x, y = (np.asarray(a) for a in study.sequences(jax.random.key(0), 256, 20))
    values, markers = x[..., 0], x[..., 1]
    assert np.all(markers[:, :10].sum(1) == 1) and np.all(markers[:, 10:].sum(1) == 1)
    assert np.all((values >= 0) & (values < 1))
    np.testing.assert_allclose(y, (values * markers).sum(1), rtol=1e-6)
    assert abs(np.mean((y - 1.0) ** 2) - 1 / 6) < 0.03  # the constant answer's MSE, Var(U + U) = 1/6
