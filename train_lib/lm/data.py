"""Byte-level text for the language models: the corpus as byte streams and grain pipelines of windows.

The batches are built by `train_lib.input_pipeline.batched`: global batch j always holds the same
windows in the same order, whatever the number of processes, and each process reads only its rows.
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
import sys
import grain
import numpy as np

from train_lib.config_lib import ConfigError
from train_lib.input_pipeline import batched
from train_lib import stdlib_corpus as corpus

log = logging.getLogger(__name__)

# Fraction of a single text file held out for validation when `data.path` is one file.
_SINGLE_FILE_VALIDATION_FRACTION = 0.05
_MIN_BYTES = 1024


@dataclasses.dataclass(frozen=True)
class TextData:
    """Byte streams of the train and validation splits, and where they came from."""

    train: np.ndarray  # uint8 [num_bytes]
    validation: np.ndarray  # uint8 [num_bytes]
    description: str
    fingerprint: str


def _read_text(path: pathlib.Path) -> bytes | None:
    """File bytes if they decode as UTF-8 text, else None (binary files are skipped)."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return data


def _join(chunks: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"\n".join(chunks), dtype=np.uint8)


def load_text(path: str) -> TextData:
    """Reads the corpus: '' = the embedded standard-library source, else a text file or directory."""
    if not path:
        root = corpus.stdlib_root()
        files = corpus.stdlib_source_files(root)
        train, validation = [], []
        for rel in files:
            (validation if corpus.is_validation_file(rel) else train).append((root / rel).read_bytes())
        return TextData(_join(train), _join(validation),
                        f"Python {sys.version.split()[0]} standard library: {len(train)} train and "
                        f"{len(validation)} validation files", corpus.fingerprint(files, root))
    target = pathlib.Path(path)
    if target.is_file():
        text = _read_text(target)
        if not text or len(text) < _MIN_BYTES:
            raise ConfigError(f"config: 'data.path' {path!r} holds no usable text (need at least {_MIN_BYTES} bytes "
                              "of UTF-8)")
        cut = int(len(text) * (1 - _SINGLE_FILE_VALIDATION_FRACTION))
        stream = np.frombuffer(text, dtype=np.uint8)
        return TextData(stream[:cut], stream[cut:], f"{target.name}: last 5% held out",
                        corpus.fingerprint([target.name], target.parent))
    files = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    texts = {rel: t for rel in files if (t := _read_text(target / rel))}
    if sum(map(len, texts.values())) < _MIN_BYTES:
        raise ConfigError(f"config: 'data.path' {path!r} holds no usable text (no UTF-8 files, or under "
                          f"{_MIN_BYTES} bytes in all)")
    train = [t for rel, t in texts.items() if not corpus.is_validation_file(rel)]
    validation = [t for rel, t in texts.items() if corpus.is_validation_file(rel)]
    if not validation or not train:  # too few files to split by file: split the stream instead
        stream = _join(list(texts.values()))
        cut = int(len(stream) * (1 - _SINGLE_FILE_VALIDATION_FRACTION))
        return TextData(stream[:cut], stream[cut:], f"{path}: {len(texts)} files, last 5% held out",
                        corpus.fingerprint(sorted(texts), target))
    return TextData(_join(train), _join(validation), f"{path}: {len(train)} train and {len(validation)} "
                    "validation files", corpus.fingerprint(sorted(texts), target))


class TokenWindows:
    """Random-access source of non-overlapping `[seq_len + 1]` windows (inputs and shifted targets)."""

    def __init__(self, stream: np.ndarray, seq_len: int):
        self._stream, self._seq_len = stream, seq_len
        self._len = (len(stream) - 1) // seq_len

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> np.ndarray:
        start = index * self._seq_len
        return self._stream[start:start + self._seq_len + 1].astype(np.int32)


def stack_tokens(windows: list[np.ndarray]) -> dict[str, np.ndarray]:
    return {"tokens": np.stack(windows)}


def language_model_datasets(path: str, *, seq_len: int, batch_size: int, eval_batches: int, seed: int,
                            rows: tuple[int, int]) -> tuple[grain.IterDataset, grain.MapDataset, TextData]:
    """(train iterator dataset, eval batches, text info) for the byte-level LM on `load_text(path)`.

    Train: windows shuffled with `seed`, reshuffled every epoch, repeated forever.
    Eval: the first `eval_batches` global batches of validation windows, in order.
    """
    text = load_text(path)
    batch = batch_size
    train_windows, val_windows = TokenWindows(text.train, seq_len), TokenWindows(text.validation, seq_len)
    if len(train_windows) < batch:
        raise ConfigError(f"config: 'data.path' gives {len(train_windows)} training windows of length {seq_len}, "
                          f"fewer than one batch of {batch}; use more text or a smaller data.seq_len/batch_size")
    if len(val_windows) < batch * eval_batches:
        available = len(val_windows) // batch
        if available == 0:
            raise ConfigError(f"config: 'data.path' gives {len(val_windows)} validation windows, fewer than one "
                              f"batch of {batch}; use more text or a smaller batch_size")
        log.warning("only %d validation batches available; evaluating on those, not eval_batches=%d",
                        available, eval_batches)
    train = grain.MapDataset.source(train_windows).shuffle(seed=seed).repeat(None)
    train = batched(train, global_batch=batch, rows=rows, num_batches=sys.maxsize // batch, collate=stack_tokens)
    train = train.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
    num_eval = min(eval_batches, len(val_windows) // batch)
    evaluation = batched(grain.MapDataset.source(val_windows), global_batch=batch, rows=rows,
                         num_batches=num_eval, collate=stack_tokens)
    return train, evaluation, text
