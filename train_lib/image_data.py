"""Image datasets as NumPy arrays, for any image family: scikit-learn digits and CIFAR-10 from local pickles.

Images are `[N, H, W, C]` float32 in [−1, 1] on the grid −1 + 2k/(levels − 1), k = 0..levels−1, so the
discretised-Gaussian decoder of `models.diffusion.likelihood` can use `levels`; labels are `[N]` int32.
`pipelines` builds the grain input pipelines of an image family from them: examples carry their index in the
split, so a family can draw per-example randomness from it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import sys

import numpy as np

from train_lib.config_lib import ConfigError

DIGITS_TEST_SIZE = 0.2  # 1797 images -> 1437 train / 360 test
DIGITS_SEED = 0
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"


@dataclasses.dataclass(frozen=True)
class ImageDataset:
    """Train/test images `[N, H, W, C]` in [−1, 1], labels `[N]`, and what the models need to know."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    levels: int  # grey levels per channel (17 for digits, 256 for 8-bit images)
    num_classes: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])


def levels_to_unit_range(values: np.ndarray, levels: int) -> np.ndarray:
    """Integer levels 0..levels−1 -> float32 on the grid −1 + 2k/(levels−1) in [−1, 1]."""
    return (np.asarray(values, np.float32) * (2.0 / (levels - 1)) - 1.0).astype(np.float32)


def unit_range_to_levels(images: np.ndarray, levels: int) -> np.ndarray:
    """Float images in [−1, 1] -> the nearest integer level 0..levels−1 (clipped), int32."""
    scaled = np.rint((np.asarray(images, np.float64) + 1.0) * (levels - 1) / 2.0)
    return np.clip(scaled, 0, levels - 1).astype(np.int32)


def load_digits(*, test_size: float = DIGITS_TEST_SIZE, seed: int = DIGITS_SEED) -> ImageDataset:
    """scikit-learn's bundled 8×8 digits (17 grey levels 0..16), split stratified by class.

    The split is `train_test_split(test_size=0.2, stratify=labels, random_state=0)`: fixed, so every
    experiment and the sample-quality classifier see the same 1437 training and 360 test images.
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    data = sklearn_digits()
    images = data.images.reshape(-1, 8, 8, 1)
    if images.min() < 0 or images.max() > 16 or np.any(images != np.round(images)):
        raise ValueError("scikit-learn digits are expected to be integers in 0..16.")
    labels = data.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_size, stratify=labels, random_state=seed)
    return ImageDataset("digits", levels_to_unit_range(x_train, 17), y_train,
                        levels_to_unit_range(x_test, 17), y_test, levels=17, num_classes=10)


def _read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 Python pickle batch -> (uint8 `[N, 32, 32, 3]`, int32 `[N]`)."""
    if not os.path.isfile(path):
        raise ValueError(f"CIFAR-10 batch file {path} is missing; expected the Python-version batches "
                         f"{', '.join(CIFAR10_TRAIN_FILES)}, {CIFAR10_TEST_FILE} (cifar-10-batches-py).")
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise ValueError(f"CIFAR-10 batch file {path} is not a readable Python pickle: {err}") from err
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"CIFAR-10 batch file {path} should be a dict with b'data' and b'labels'; got {keys}.")
    data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"], np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8 or labels.shape != (data.shape[0],):
        raise ValueError(f"CIFAR-10 batch file {path}: b'data' should be uint8 [N, 3072] with N labels; got "
                         f"{data.dtype} {data.shape} and {labels.shape[0]} labels.")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"CIFAR-10 batch file {path}: labels must be in 0..9.")
    # Rows are channel-major: 1024 red, 1024 green, 1024 blue values, each row-major 32×32.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels.astype(np.int32)


def load_cifar10(directory: str) -> ImageDataset:
    """CIFAR-10 from the standard Python pickle batches in `directory` (no download), 256 levels."""
    if not os.path.isdir(directory):
        raise ValueError(f"CIFAR-10 directory {directory} does not exist; point it at the extracted "
                         "cifar-10-batches-py folder.")
    train = [_read_cifar_batch(os.path.join(directory, name)) for name in CIFAR10_TRAIN_FILES]
    x_test, y_test = _read_cifar_batch(os.path.join(directory, CIFAR10_TEST_FILE))
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return ImageDataset("cifar10", levels_to_unit_range(x_train, 256), y_train,
                        levels_to_unit_range(x_test, 256), y_test, levels=256, num_classes=10)


DATASETS = {
    "digits": lambda directory=None: load_digits(),
    "cifar10": lambda directory=None: load_cifar10(directory),
}
# Image shapes and grey levels of the datasets, known before any file is read (the trainer needs shapes first).
IMAGE_SHAPES = {"digits": (8, 8, 1), "cifar10": (32, 32, 3)}
LEVELS = {"digits": 17, "cifar10": 256}


def check_dataset(name: str, path: str) -> str:
    """`name` (the config's `data.dataset`), checked against `data.path`: CIFAR-10 is read from the directory
    `path`, digits are bundled with scikit-learn and take none."""
    if name not in IMAGE_SHAPES:
        raise ConfigError(f"config: 'data.dataset' is {name!r}; expected one of {sorted(IMAGE_SHAPES)}")
    if name == "cifar10" and not path:
        raise ConfigError("config: 'data.path' must name the directory of CIFAR-10's Python pickle batches "
                          "(cifar-10-batches-py) for data.dataset='cifar10'; nothing is downloaded")
    if name == "digits" and path:
        raise ConfigError(f"config: data.dataset='digits' is bundled with scikit-learn and reads no 'data.path' "
                          f"(got {path!r}); set data.path='' or data.dataset='cifar10'")
    return name


def load_image_dataset(name: str, directory: str | None = None) -> ImageDataset:
    """The dataset `name` from `DATASETS` (`directory` is needed for CIFAR-10)."""
    if name not in DATASETS:
        raise ValueError(f"Unknown image dataset {name!r}; choose one of {sorted(DATASETS)}.")
    if name == "cifar10" and not directory:
        raise ValueError("The cifar10 dataset needs a directory with the Python pickle batches.")
    return DATASETS[name](directory)


class ImageExamples:
    """Random-access source of {"images": `[H, W, C]`, "labels": scalar, "index": the example's index} for grain."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self._images, self._labels = images, labels

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"images": self._images[index], "labels": self._labels[index], "index": np.int32(index)}


def stack_examples(examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {"images": np.stack([e["images"] for e in examples]).astype(np.float32),
            "labels": np.asarray([e["labels"] for e in examples], np.int32),
            "index": np.asarray([e["index"] for e in examples], np.int32)}


def pipelines(data: ImageDataset, *, batch_size: int, eval_batches: int, seed: int, rows: tuple[int, int]):
    """(train, eval batches, number of eval batches) of {"images", "labels", "index"} for the rows `rows` of
    every global batch: train shuffled with `seed`, reshuffled every epoch and repeated (a checkpointable grain
    iterator); eval the test split in order, at most `eval_batches` full batches. A batch larger than either
    split is a ConfigError naming `batch_size`."""
    import grain

    from train_lib.input_pipeline import batched

    if len(data.train_images) < batch_size:
        raise ConfigError(f"config: 'batch_size' {batch_size} exceeds the {len(data.train_images)} training images "
                          f"of {data.name}")
    num_eval = min(eval_batches, len(data.test_images) // batch_size)
    if num_eval == 0:
        raise ConfigError(f"config: 'batch_size' {batch_size} exceeds the {len(data.test_images)} test images of "
                          f"{data.name}; evaluation needs at least one full batch")
    train = grain.MapDataset.source(ImageExamples(data.train_images, data.train_labels))
    train = batched(train.shuffle(seed=seed).repeat(None), global_batch=batch_size, rows=rows,
                    num_batches=sys.maxsize // batch_size, collate=stack_examples)
    train = train.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
    evaluation = batched(grain.MapDataset.source(ImageExamples(data.test_images, data.test_labels)),
                         global_batch=batch_size, rows=rows, num_batches=num_eval, collate=stack_examples)
    return train, evaluation, num_eval


def fingerprint(data: ImageDataset) -> str:
    """12 hex digits of a SHA-256 over the dataset's arrays (logged at the start of a run)."""
    digest = hashlib.sha256()
    for array in (data.train_images, data.train_labels, data.test_images, data.test_labels):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:12]


ASCII_RAMP = " .:-=+*#%@"


def ascii_digits(images: np.ndarray, levels: int, *, per_line: int = 5) -> str:
    """Greyscale images `[N, H, W, 1]` in [−1, 1] as text, `per_line` side by side, two characters per pixel."""
    grey = unit_range_to_levels(images[..., 0], levels) * (len(ASCII_RAMP) - 1) // (levels - 1)
    blocks = []
    for start in range(0, len(grey), per_line):
        group = grey[start:start + per_line]
        blocks.append("\n".join("  ".join("".join(2 * ASCII_RAMP[v] for v in image[row]) for image in group)
                                for row in range(grey.shape[1])))
    return "\n\n".join(blocks)
