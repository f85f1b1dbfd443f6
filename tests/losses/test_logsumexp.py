"""The logsumexp inequalities of post 9070 ("寻求一个光滑的最大值函数", https://kexue.fm/archives/9070) as
hypothesis properties of the masked log-sum-exp kernel every softmax loss here is built on
(`losses._numerics.masked_logsumexp_parts`): max < lse ≤ max + log n, lse ≥ mean + log n,
|lse(x) − lse(y)| ≤ ‖x − y‖∞, convexity, and masking = dropping the entries."""
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from losses import _numerics

PROPERTY = settings(max_examples=60, deadline=None, derandomize=True)
TOL = 1e-12  # float64 rounding of sums of a few terms of size ≤ 30

_rows = st.integers(2, 12).flatmap(lambda n: hnp.arrays(np.float64, (3, n), elements=st.floats(-10, 10)))
_pairs = st.integers(2, 12).flatmap(lambda n: st.tuples(
    hnp.arrays(np.float64, (3, n), elements=st.floats(-10, 10)),
    hnp.arrays(np.float64, (3, n), elements=st.floats(-10, 10))))


def lse(x, mask=None):
    """The kernel's logsumexp, shift + log_total, in float64."""
    with jax.enable_x64(True):
        x = jnp.asarray(x)
        mask = jnp.ones(x.shape, bool) if mask is None else jnp.asarray(mask)
        shift, log_total = _numerics.masked_logsumexp_parts(x, mask)
        return np.asarray(shift + log_total)[..., 0], np.asarray(log_total)[..., 0]


@PROPERTY
@given(x=_rows)
def test_lse_lies_strictly_above_the_max_and_at_most_log_n_above(x):
    value, _ = lse(x)
    n = x.shape[-1]
    assert np.all(value > x.max(-1))  # n ≥ 2 and the entries are within 20 of each other: no underflow
    assert np.all(value <= x.max(-1) + np.log(n) + TOL)


@PROPERTY
@given(x=_rows)
def test_lse_is_at_least_the_mean_plus_log_n(x):
    value, _ = lse(x)
    assert np.all(value >= x.mean(-1) + np.log(x.shape[-1]) - TOL)


@PROPERTY
@given(xy=_pairs)
def test_lse_is_1_lipschitz_in_the_max_norm(xy):
    x, y = xy
    assert np.all(np.abs(lse(x)[0] - lse(y)[0]) <= np.abs(x - y).max(-1) + TOL)


@PROPERTY
@given(xy=_pairs, t=st.floats(0, 1))
def test_lse_is_convex(xy, t):
    x, y = xy
    assert np.all(lse(t * x + (1 - t) * y)[0] <= t * lse(x)[0] + (1 - t) * lse(y)[0] + TOL)


@PROPERTY
@given(x=_rows, seed=st.integers(0, 2**16))
def test_masking_an_entry_is_dropping_it(x, seed):
    mask = np.random.default_rng(seed).random(x.shape) < 0.6
    mask[:, 0] = True
    got, _ = lse(x, mask)
    for row in range(x.shape[0]):
        kept = x[row][mask[row]]
        expected = kept.max() + np.log(np.sum(np.exp(kept - kept.max())))
        np.testing.assert_allclose(got[row], expected, rtol=0, atol=TOL)
        assert got[row] <= lse(x[row])[0] + TOL  # more entries, larger lse


@PROPERTY
@given(x=st.integers(2, 12).flatmap(lambda n: hnp.arrays(np.float32, (3, n), elements=st.floats(
    width=32, allow_nan=False, allow_infinity=False, allow_subnormal=False))))  # XLA:CPU flushes subnormals
def test_the_log_total_stays_in_0_to_log_n_at_any_float32_scale(x):
    """The bounds hold for the part the kernel keeps apart from the shift, however large the logits: no overflow,
    no NaN, and the max-bounds survive float32 rounding."""
    shift, log_total = _numerics.masked_logsumexp_parts(jnp.asarray(x), jnp.ones(x.shape, bool))
    log_total = np.asarray(log_total)[..., 0]
    assert np.all(np.isfinite(log_total)) and np.all(np.asarray(shift)[..., 0] == x.max(-1))
    assert np.all(log_total >= 0) and np.all(log_total <= np.log(x.shape[-1]) * (1 + 1e-6))
