"""FCD / KID against independent references, the digits classifier and its cache, the PNG grid."""
import numpy as np
import pytest
import scipy.linalg
from PIL import Image

from train_lib import image_data
from train_lib import sample_quality


def _fd_reference(a, b):
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * covmean)


def test_frechet_distance_against_scipy_sqrtm_and_identities():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 8)) @ rng.normal(size=(8, 8))
    b = rng.normal(size=(400, 8)) @ rng.normal(size=(8, 8)) + 0.5
    assert sample_quality.frechet_distance(a, b) == pytest.approx(_fd_reference(a, b), rel=1e-6)
    assert abs(sample_quality.frechet_distance(a, a)) < 1e-8 * np.trace(np.cov(a, rowvar=False))
    shift = rng.normal(size=8)
    assert sample_quality.frechet_distance(a, a + shift) == pytest.approx(np.sum(shift**2), rel=1e-6)


def test_kernel_distance_is_the_unbiased_mmd():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(30, 4)), rng.normal(size=(20, 4)) + 0.3
    k = lambda x, y: (x @ y / 4 + 1.0) ** 3  # noqa: E731
    aa = sum(k(a[i], a[j]) for i in range(30) for j in range(30) if i != j) / (30 * 29)
    bb = sum(k(b[i], b[j]) for i in range(20) for j in range(20) if i != j) / (20 * 19)
    ab = sum(k(a[i], b[j]) for i in range(30) for j in range(20)) / (30 * 20)
    assert sample_quality.kernel_distance(a, b) == pytest.approx(aa + bb - 2 * ab, rel=1e-9)
    same = sample_quality.kernel_distance(rng.normal(size=(300, 4)), rng.normal(size=(300, 4)))
    assert abs(same) < 0.2 * sample_quality.kernel_distance(rng.normal(size=(300, 4)), rng.normal(size=(300, 4)) + 1)


@pytest.fixture(scope="module")
def quality(tmp_path_factory):
    cache_dir = str(tmp_path_factory.mktemp("classifier_cache"))
    return cache_dir, sample_quality.digits_sample_quality(cache_dir)


def test_classifier_is_accurate_and_cached(quality, monkeypatch):
    cache_dir, sq = quality
    data = image_data.load_digits()
    assert sq.extractor.accuracy(data.test_images, data.test_labels) > 0.9

    def no_training(*args, **kwargs):
        raise AssertionError("the cached classifier should have been loaded, not retrained")

    monkeypatch.setattr(sample_quality, "train_classifier", no_training)
    again = sample_quality.load_or_train_classifier(cache_dir, data.train_images, data.train_labels)
    np.testing.assert_allclose(again.features(data.test_images), sq.reference, rtol=1e-6)
    other = sample_quality.ClassifierConfig(steps=10)
    with pytest.raises(AssertionError, match="should have been loaded"):  # another config is another key
        sample_quality.load_or_train_classifier(cache_dir, data.train_images, data.train_labels, config=other)


def test_distances_order_noise_far_above_the_real_data_floor(quality):
    _, sq = quality
    data = image_data.load_digits()
    scale = np.trace(np.cov(sq.reference, rowvar=False))
    assert abs(sq.evaluate(data.test_images)["fcd"]) < 1e-7 * scale
    noise = np.random.default_rng(2).uniform(-1, 1, data.test_images.shape).astype(np.float32)
    real, fake = sq.evaluate(data.train_images[:360]), sq.evaluate(noise)
    assert 0 < real["fcd_floor"] and fake["fcd"] > 10 * real["fcd_floor"] and fake["fcd"] > 10 * real["fcd"]
    assert fake["kid"] > 10 * max(real["kid_floor"], real["kid"], 1e-6)


def test_save_image_grid_round_trip(tmp_path):
    images = np.stack([np.full((2, 3, 1), v, np.float32) for v in (-1.0, 0.0, 1.0)])
    path = tmp_path / "grid" / "samples.png"
    sample_quality.save_image_grid(images, str(path), ncols=2, scale=2)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * (2 * 3 + 1), 2 * (2 * 4 + 1))
    assert grid[2, 2] == 0 and grid[2, 2 * 5] == 128 and grid[2 * 4, 2] == 255 and grid[0, 0] == 0
    sample_quality.save_image_grid(images, str(path), ncols=2, pad_value=96)
    grid = np.asarray(Image.open(path))
    assert grid[0, 0] == 96 and grid[1, 1] == 0 and grid[1, 4] == 96 and grid[1, 5] == 128
    with pytest.raises(ValueError, match="expects"):
        sample_quality.save_image_grid(np.zeros((2, 3, 3)), str(path))
