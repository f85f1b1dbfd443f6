"""Augmentations of small greyscale images in [−1, 1] (background −1), as pure functions of a key.

Every view is `augment(key, image, settings)`: a random shift of up to `max_shift` pixels each way (the image
slides over a background-filled border), random erasing of a rectangle of 1..`erase_max` pixels a side with
probability `erase_prob` (Zhong et al., arXiv 1708.04896), then Gaussian pixel noise of std `noise_std`, clipped
to [−1, 1]. The trainer's step key and an example's index in the dataset fix its views
(`augment_batch`), so a step is reproducible and independent of how the batch is sharded.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

BACKGROUND = -1.0


@dataclasses.dataclass(frozen=True)
class AugmentSettings:
    """`config.augment`."""

    max_shift: int  # pixels, each way
    erase_prob: float
    erase_max: int  # the erased rectangle's largest side, pixels
    noise_std: float  # in the [−1, 1] pixel scale

    def validate(self, image_shape: tuple[int, int, int]) -> None:
        height, width = image_shape[:2]
        if not 0 <= self.max_shift < min(height, width):
            raise ValueError(f"'augment.max_shift' must be in 0..{min(height, width) - 1}, got {self.max_shift}")
        if not 0.0 <= self.erase_prob <= 1.0:
            raise ValueError(f"'augment.erase_prob' must be in [0, 1], got {self.erase_prob}")
        if not 1 <= self.erase_max <= min(height, width):
            raise ValueError(f"'augment.erase_max' must be in 1..{min(height, width)}, got {self.erase_max}")
        if self.noise_std < 0:
            raise ValueError(f"'augment.noise_std' must be non-negative, got {self.noise_std}")


def augment(key: jax.Array, image: jax.Array, settings: AugmentSettings) -> jax.Array:
    """One random view of `image` `[H, W, C]`."""
    shift_key, size_key, corner_key, erase_key, noise_key = jax.random.split(key, 5)
    height, width, channels = image.shape
    s = settings.max_shift
    if s > 0:
        offset = jax.random.randint(shift_key, (2,), 0, 2 * s + 1)
        padded = jnp.pad(image, ((s, s), (s, s), (0, 0)), constant_values=BACKGROUND)
        image = jax.lax.dynamic_slice(padded, (offset[0], offset[1], 0), (height, width, channels))
    if settings.erase_prob > 0:
        size = jax.random.randint(size_key, (2,), 1, settings.erase_max + 1)
        corner = jax.random.randint(corner_key, (2,), 0, jnp.array([height, width]))
        rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
        inside = ((rows >= corner[0]) & (rows < corner[0] + size[0])
                  & (cols >= corner[1]) & (cols < corner[1] + size[1]))
        erase = jax.random.bernoulli(erase_key, settings.erase_prob) & inside
        image = jnp.where(erase[:, :, None], BACKGROUND, image)
    if settings.noise_std > 0:
        image = jnp.clip(image + settings.noise_std * jax.random.normal(noise_key, image.shape), -1.0, 1.0)
    return image


def augment_batch(key: jax.Array, images: jax.Array, indices: jax.Array, settings: AugmentSettings) -> jax.Array:
    """A view of each image `[B, H, W, C]`, from `fold_in(key, index)` of its dataset index `indices` `[B]`."""
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)
    return jax.vmap(lambda k, x: augment(k, x, settings))(keys, images)
