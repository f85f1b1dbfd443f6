"""Digits split (fixed, stratified, on the 17-level grid) and the CIFAR-10 pickle reader."""
import os
import pickle

import numpy as np
import pytest
from sklearn.datasets import load_digits as sklearn_digits

from train_lib import image_data


def test_digits_split_is_stratified_deterministic_and_on_the_grid():
    data = image_data.load_digits()
    assert data.train_images.shape == (1437, 8, 8, 1) and data.test_images.shape == (360, 8, 8, 1)
    assert data.train_images.dtype == np.float32 and data.levels == 17 and data.num_classes == 10
    assert data.image_shape == (8, 8, 1)
    # Every pixel is exactly one of the 17 levels −1 + 2k/16 (exact in float32), and both ends occur.
    levels = (data.train_images + 1.0) * 8.0
    np.testing.assert_array_equal(levels, np.round(levels))
    assert data.train_images.min() == -1.0 and data.train_images.max() == 1.0
    np.testing.assert_array_equal(image_data.unit_range_to_levels(data.test_images, 17).reshape(360, 64),
                                  _sklearn_levels_of(data.test_images))
    # Stratified: each class's share of the test split is its overall share, to within one image.
    all_labels = sklearn_digits().target
    for c in range(10):
        expected = np.mean(all_labels == c) * 360
        assert abs(np.sum(data.test_labels == c) - expected) <= 1.0
    np.testing.assert_array_equal(np.sort(np.concatenate([data.train_labels, data.test_labels])),
                                  np.sort(all_labels))
    again = image_data.load_digits()
    np.testing.assert_array_equal(again.test_images, data.test_images)
    np.testing.assert_array_equal(again.train_labels, data.train_labels)


def _sklearn_levels_of(images):
    """Map each split image back to the bundled integer image it came from (they are unique rows)."""
    raw = sklearn_digits().images.reshape(-1, 64).astype(np.int32)
    index = {row.tobytes(): row for row in raw}
    found = [index[np.rint((img.reshape(64) + 1) * 8).astype(np.int32).tobytes()] for img in images]
    return np.stack(found)


def _write_batch(path, data, labels):
    with open(path, "wb") as f:
        pickle.dump({b"data": data, b"labels": list(labels), b"batch_label": b"fake"}, f)


def _fake_cifar(directory, n=4):
    rng = np.random.default_rng(0)
    for name in image_data.CIFAR10_TRAIN_FILES + (image_data.CIFAR10_TEST_FILE,):
        _write_batch(os.path.join(directory, name), rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                     rng.integers(0, 10, n))


def test_cifar10_reader_layout_and_scaling(tmp_path):
    _fake_cifar(tmp_path)
    # One known test image: red channel 255 at row 0, column 1; green 0 everywhere; blue 128.
    row = np.zeros(3072, np.uint8)
    row[1] = 255
    row[2048:] = 128
    _write_batch(tmp_path / image_data.CIFAR10_TEST_FILE, row[None], [7])
    data = image_data.load_cifar10(str(tmp_path))
    assert data.train_images.shape == (20, 32, 32, 3) and data.test_images.shape == (1, 32, 32, 3)
    assert data.levels == 256 and data.test_labels.tolist() == [7]
    image = data.test_images[0]
    assert image[0, 1, 0] == 1.0 and image[0, 0, 0] == -1.0 and image[5, 5, 1] == -1.0
    assert image[3, 4, 2] == pytest.approx(-1.0 + 2.0 * 128 / 255, abs=1e-6)


def test_cifar10_errors_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match=str(missing)):
        image_data.load_cifar10(str(missing))
    _fake_cifar(tmp_path)
    os.remove(tmp_path / "data_batch_3")
    with pytest.raises(ValueError, match="data_batch_3 is missing"):
        image_data.load_cifar10(str(tmp_path))
    (tmp_path / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="data_batch_3 is not a readable Python pickle"):
        image_data.load_cifar10(str(tmp_path))
    _write_batch(tmp_path / "data_batch_3", np.zeros((2, 1024), np.uint8), [0, 1])
    with pytest.raises(ValueError, match=r"data_batch_3: b'data' should be uint8 \[N, 3072\]"):
        image_data.load_cifar10(str(tmp_path))
    with pytest.raises(ValueError, match="Unknown image dataset"):
        image_data.load_image_dataset("mnist")
