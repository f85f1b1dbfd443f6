"""k-occurrence and its skewness against brute-force NumPy/SciPy; whitening reduces hubness."""
import numpy as np
import pytest
import scipy.stats

from models.hubness import k_occurrence, k_occurrence_skewness
from models.whitening import fit_whitening


def _reference_k_occurrence(x, k, metric):
    x = np.asarray(x, np.float64)
    if metric == "cosine":
        unit = x / np.linalg.norm(x, axis=1, keepdims=True)
        similarity = unit @ unit.T
    else:
        similarity = -np.sum((x[:, None, :] - x[None, :, :]) ** 2, axis=-1)
    np.fill_diagonal(similarity, -np.inf)
    neighbours = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    return np.bincount(neighbours.ravel(), minlength=len(x))


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_matches_brute_force_with_uneven_blocks(metric):
    x = np.float32(np.random.default_rng(0).normal(size=(203, 16)) + 0.5)
    counts = k_occurrence(x, k=7, metric=metric, block_size=64)  # 203 = 3 * 64 + 11: padded block
    want = _reference_k_occurrence(x, 7, metric)
    np.testing.assert_array_equal(counts, want)
    assert int(np.sum(counts)) == 7 * 203
    np.testing.assert_allclose(
        k_occurrence_skewness(x, k=7, metric=metric, block_size=64), scipy.stats.skew(want), rtol=1e-5
    )


def test_whitening_removes_the_hubs_of_offset_embeddings():
    x = np.float32(np.random.default_rng(1).normal(size=(600, 60)) + 1.0)
    before = float(k_occurrence_skewness(x, k=10))
    after = float(k_occurrence_skewness(fit_whitening(x)(x), k=10))
    assert before > 1.0 and after < 0.5, (before, after)


def test_bad_arguments():
    x = np.zeros((5, 3), np.float32)
    with pytest.raises(ValueError, match="k"):
        k_occurrence(x, k=5)
    with pytest.raises(ValueError, match="metric"):
        k_occurrence(x, k=2, metric="manhattan")
    with pytest.raises(ValueError, match="embeddings"):
        k_occurrence(np.zeros(5, np.float32), k=2)
