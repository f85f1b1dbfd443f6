"""Sample quality for digits: a small classifier's features, Fréchet and kernel distances, image grids.

FID and KID need an Inception network trained on ImageNet, which 8×8 digits neither fit nor may we
download. We train a small MLP on the digits training split in seconds (cached as .npz, keyed by its
config and data) and compare penultimate-layer features:

- FCD, "Fréchet classifier distance": ‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a^½ Σ_b Σ_a^½)^½), the FID formula
  (Heusel et al., arXiv 1706.08500) on our features;
- KID: the unbiased MMD² with the polynomial kernel k(x, y) = (xᵀy/d + 1)³ (Bińkowski et al., arXiv
  1801.01401).

Both are reported next to their floor, the same distance between the real train and test splits.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from train_lib import image_data


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """The feature classifier's architecture and training; part of its cache key."""

    hidden: tuple[int, ...] = (256, 128)
    steps: int = 1000
    batch_size: int = 128
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0


class FeatureClassifier(nn.Module):
    """MLP `[N, H, W, C] -> (logits [N, num_classes], features [N, hidden[-1]])`."""

    hidden: Sequence[int]
    num_classes: int

    @nn.compact
    def __call__(self, x):
        h = x.reshape(x.shape[0], -1)
        for width in self.hidden:
            h = nn.relu(nn.Dense(width)(h))
        return nn.Dense(self.num_classes)(h), h


def train_classifier(images: np.ndarray, labels: np.ndarray, *, num_classes: int, config: ClassifierConfig):
    """Train `FeatureClassifier` with AdamW on (images, labels); returns its params (one `lax.scan`)."""
    model = FeatureClassifier(tuple(config.hidden), num_classes)
    x, y = jnp.asarray(images, jnp.float32), jnp.asarray(labels, jnp.int32)
    init_key, data_key = jax.random.split(jax.random.PRNGKey(config.seed))
    params = model.init(init_key, x[:1])["params"]
    tx = optax.adamw(config.learning_rate, weight_decay=config.weight_decay)

    def step(carry, key):
        params, opt_state = carry
        idx = jax.random.randint(key, (config.batch_size,), 0, x.shape[0])

        def loss_fn(p):
            logits, _ = model.apply({"params": p}, x[idx])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y[idx]).mean()

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    keys = jax.random.split(data_key, config.steps)
    (params, _), _ = jax.jit(lambda c: jax.lax.scan(step, c, keys))((params, tx.init(params)))
    return params


class FeatureExtractor:
    """A trained `FeatureClassifier`: `features(images) -> [N, F]` float64, `logits`, `accuracy`."""

    def __init__(self, params, *, hidden: Sequence[int], num_classes: int):
        self.params = params
        self._apply = jax.jit(FeatureClassifier(tuple(hidden), num_classes).apply)

    def _run(self, images):
        return self._apply({"params": self.params}, jnp.asarray(images, jnp.float32))

    def features(self, images) -> np.ndarray:
        return np.asarray(self._run(images)[1], np.float64)

    def logits(self, images) -> np.ndarray:
        return np.asarray(self._run(images)[0], np.float64)

    def accuracy(self, images, labels) -> float:
        return float(np.mean(self.logits(images).argmax(-1) == np.asarray(labels)))


def _cache_key(images, labels, num_classes, config: ClassifierConfig) -> str:
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(config), sort_keys=True).encode())
    digest.update(f"{num_classes}".encode())
    digest.update(np.ascontiguousarray(images, np.float32).tobytes())
    digest.update(np.ascontiguousarray(labels, np.int32).tobytes())
    return digest.hexdigest()[:16]


def load_or_train_classifier(cache_dir: str, images, labels, *, num_classes: int = 10,
                             config: ClassifierConfig = ClassifierConfig()) -> FeatureExtractor:
    """The classifier for (images, labels, config), read from `cache_dir` or trained and saved there."""
    path = os.path.join(cache_dir, f"feature_classifier_{_cache_key(images, labels, num_classes, config)}.npz")
    if os.path.exists(path):
        with np.load(path) as stored:
            flat = {tuple(k.split("/")): jnp.asarray(stored[k]) for k in stored.files}
        params = traverse_util.unflatten_dict(flat)
    else:
        params = train_classifier(images, labels, num_classes=num_classes, config=config)
        os.makedirs(cache_dir, exist_ok=True)
        flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
        tmp = path + ".tmp.npz"
        np.savez(tmp, **flat)
        os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    return FeatureExtractor(params, hidden=config.hidden, num_classes=num_classes)


def _sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets `[N, F]`, `[M, F]` (float64).

    tr((Σ_a Σ_b)^½) is computed as Σ √eig(Σ_a^½ Σ_b Σ_a^½), a symmetric PSD matrix, which avoids the
    complex round-off of a general matrix square root.
    """
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _sqrtm_psd(cov_a)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0.0, None)).sum()
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * cross)


def kernel_distance(features_a: np.ndarray, features_b: np.ndarray, *, degree: int = 3, coef0: float = 1.0) -> float:
    """Unbiased MMD² between feature sets `[N, F]` and `[M, F]` with k(x, y) = (xᵀy/F + coef0)^degree."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    n, m, dim = a.shape[0], b.shape[0], a.shape[1]
    k_aa = (a @ a.T / dim + coef0) ** degree
    k_bb = (b @ b.T / dim + coef0) ** degree
    k_ab = (a @ b.T / dim + coef0) ** degree
    within_a = (k_aa.sum() - np.trace(k_aa)) / (n * (n - 1))
    within_b = (k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
    return float(within_a + within_b - 2.0 * k_ab.mean())


class SampleQuality:
    """FCD and KID of samples against reference (test) images, with the train-vs-test floor."""

    def __init__(self, extractor: FeatureExtractor, reference_images, floor_images):
        self.extractor = extractor
        self.reference = extractor.features(reference_images)
        floor = extractor.features(floor_images)
        self.floor = {"fcd_floor": frechet_distance(floor, self.reference),
                      "kid_floor": kernel_distance(floor, self.reference)}

    def evaluate(self, samples) -> dict[str, float]:
        """{"fcd", "kid", "fcd_floor", "kid_floor"} for `samples` `[N, H, W, C]` in [−1, 1]."""
        features = self.extractor.features(samples)
        return {"fcd": frechet_distance(features, self.reference),
                "kid": kernel_distance(features, self.reference), **self.floor}


def digits_sample_quality(cache_dir: str, config: ClassifierConfig = ClassifierConfig()) -> SampleQuality:
    """`SampleQuality` for digits: classifier on the train split, reference = test, floor = train."""
    data = image_data.load_digits()
    extractor = load_or_train_classifier(cache_dir, data.train_images, data.train_labels,
                                         num_classes=data.num_classes, config=config)
    return SampleQuality(extractor, data.test_images, data.train_images)


def save_image_grid(images, path: str, *, ncols: int | None = None, scale: int = 1, padding: int = 1,
                    pad_value: int = 0) -> None:
    """Save images `[N, H, W, C]` in [−1, 1] (C = 1 or 3) as one PNG grid, each pixel `scale`× enlarged.

    The `padding` pixels between images have the 8-bit value `pad_value` (grey shows black-background digits apart).
    """
    from PIL import Image

    images = np.asarray(images, np.float64)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"save_image_grid expects [N, H, W, 1 or 3] images, got shape {images.shape}.")
    n, height, width, channels = images.shape
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    pixels = image_data.unit_range_to_levels(images, 256).astype(np.uint8)
    grid = np.full((nrows * (height + padding) + padding, ncols * (width + padding) + padding, channels), pad_value,
                   np.uint8)
    for k in range(n):
        top, left = padding + (k // ncols) * (height + padding), padding + (k % ncols) * (width + padding)
        grid[top:top + height, left:left + width] = pixels[k]
    grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid[..., 0] if channels == 1 else grid).save(path)
