"""Tokenizers of the text family: Chinese-BERT WordPiece (one token per CJK character), UTF-8 bytes, and
unigram SentencePiece (a large vocabulary of words and phrases; random segmentations for subword regularisation).

All implement `Tokenizer`: `encode` adds no special tokens (`encode_pair` lays out `[CLS] a [SEP] b [SEP]`),
`decode` drops [PAD]/[CLS]/[SEP]/[MASK]; WordPiece's detokenises as a Chinese BERT does (no spaces between CJK
characters, one space between Latin words; a simpler form of bert4keras's `Tokenizer.decode`,
https://github.com/bojone/bert4keras/blob/master/bert4keras/tokenizers.py), the others' gives the text back. `fingerprint` identifies the
vocabulary and its normaliser: equal fingerprints mean equal ids for every text, so a checkpoint's
embeddings are read with the ids they were trained on.

WordPiece vocabularies come from a Hugging Face `vocab.txt` / `tokenizer.json`, or from `train_wordpiece`,
a deterministic BPE-style learner (the trainer of the `tokenizers` library breaks ties between equally
frequent pairs differently from run to run, so the same texts gave different vocabularies).
"""
from __future__ import annotations

import abc
import functools
import hashlib
import heapq
import json
import logging
import math
import os
import re
from collections import Counter, defaultdict
from typing import Callable, Iterable

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from train_lib.config_lib import ConfigError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
META_FILE = "kexue_tokenizer.json"  # written by `save`; names the kind, so `load_tokenizer` needs no guessing
MAX_WORD_CHARS = 100  # BERT's max_input_chars_per_word: a longer word is one [UNK]


def unused_token(i: int) -> str:
    return f"[unused{i}]"


def _fingerprint(kind: str, normalizer, tokens: list[str]) -> str:
    payload = json.dumps([kind, normalizer, tokens], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class Tokenizer(abc.ABC):
    """What the text family needs of a tokenizer. Ids are ints in [0, vocab_size)."""

    kind: str  # 'wordpiece' | 'bytes' | 'sentencepiece'
    vocab_size: int
    pad_id: int
    unk_id: int
    cls_id: int
    sep_id: int
    mask_id: int
    fingerprint: str  # sha256 hex of the kind, normaliser and tokens in id order

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    @abc.abstractmethod
    def encode_with_starts(self, text: str) -> tuple[list[int], list[int]]:
        """(ids as `encode` gives them, the index in `text` of the character each token starts in)."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; [PAD], [CLS], [SEP] and [MASK] are dropped."""

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int | None: ...

    @abc.abstractmethod
    def id_to_token(self, i: int) -> str: ...

    def token_bytes(self) -> list[bytes | None]:
        """Per id, the UTF-8 bytes the token adds to the decoded text (None for special tokens): what token
        healing (`train_lib.text.decoding.TokenHealer`) matches the prompt's removed text against."""
        raise NotImplementedError(f"{type(self).__name__} has no token_bytes(); token healing needs the bytes or "
                                  "sentencepiece tokenizer")

    @abc.abstractmethod
    def save(self, directory: str) -> None:
        """Writes the tokenizer into `directory` (which must exist) so that `load_tokenizer` restores it."""

    def unused_ids(self) -> list[int]:
        """Ids of [unused1], [unused2], ... up to the first one missing (P-tuning's prompt tokens)."""
        ids = []
        while (i := self.token_to_id(unused_token(len(ids) + 1))) is not None:
            ids.append(i)
        return ids

    def _dropped_on_decode(self) -> frozenset[int]:
        return frozenset((self.pad_id, self.cls_id, self.sep_id, self.mask_id))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, fingerprint={self.fingerprint[:12]})"


# --------------------------------------------------------------------------------------------------
# WordPiece.
# --------------------------------------------------------------------------------------------------

# Pieces that BERT's normaliser and pre-tokenizer never join: a CJK character, or a run between the characters
# they split on (' ', '\t', '\n', '\r', the Zs spaces, and the line/paragraph separators).
_CJK = "\u4e00-\u9fff\u3400-\u4dbf\U00020000-\U0002a6df\U0002a700-\U0002ceaf\uf900-\ufaff\U0002f800-\U0002fa1f"
_SPLIT = " \t\n\r\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_ROUGH_WORD = re.compile(f"[{_CJK}]|[^{_CJK}{_SPLIT}]+")
_CJK_CHAR = re.compile(f"[{_CJK}]")


def is_cjk_character(ch: str) -> bool:
    """Whether `ch` is in the CJK ideograph blocks that BERT splits into single characters (`_is_chinese_char`)."""
    return _CJK_CHAR.fullmatch(ch) is not None


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() and not is_cjk_character(ch)


def join_tokens(tokens: Iterable[str]) -> str:
    """Detokenised text of WordPiece tokens: '##' pieces glued to the previous token; a space only between two
    Latin words (letters/digits, not CJK), and after `,;:!?)]}` or a '.' (not a decimal point) before one.

    >>> join_tokens(["我", "用", "py", "##thon", "写", "了", "3", ".", "11", "，", "hello", ",", "world", "."])
    '我用python写了3.11，hello, world.'
    """
    text = ""
    for token in tokens:
        if token.startswith("##") and len(token) > 2:
            text += token[2:]
            continue
        if text and _is_word_char(token[0]):
            prev = text[-1]
            decimal = prev == "." and len(text) > 1 and text[-2].isdigit() and token[0].isdigit()
            if _is_word_char(prev) or prev in ",;:!?)]}" or (prev == "." and not decimal):
                text += " "
        text += token
    return text


def _bert_backend(vocab: dict[str, int], lowercase: bool) -> tokenizers.Tokenizer:
    """A `tokenizers.Tokenizer` that encodes as BERT's does (bert-base-chinese's configuration)."""
    backend = tokenizers.Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", continuing_subword_prefix="##",
                                                    max_input_chars_per_word=MAX_WORD_CHARS))
    backend.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                                    lowercase=lowercase)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    backend.post_processor = processors.TemplateProcessing(  # for Hugging Face users of the saved tokenizer.json
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    backend.add_special_tokens(list(SPECIAL_TOKENS))  # already in the vocabulary: ids unchanged, never split
    return backend


_MAX_CACHED_PIECES = 1 << 16  # distinct pieces kept (the pretraining mix has about 22k)


def _check_specials(has: Callable[[str], bool], source: str) -> None:
    missing = [t for t in SPECIAL_TOKENS if not has(t)]
    if missing:
        raise ConfigError(f"tokenizer {source}: the vocabulary lacks {' '.join(missing)}; a BERT vocabulary needs "
                          f"all of {' '.join(SPECIAL_TOKENS)} (a sentencepiece model: train one with "
                          "tokenizer.kind='sentencepiece', tokenizer.path='')")


def _splits_like_bert(config: dict) -> bool:
    """Whether a tokenizer.json's pipeline is BERT's (so it never joins two `_ROUGH_WORD` pieces, and a text's ids
    are the concatenation of its pieces' ids): BertNormalizer splitting CJK, BertPreTokenizer, and added tokens
    that each lie inside one piece."""
    normalizer, pre_tokenizer = config.get("normalizer") or {}, config.get("pre_tokenizer") or {}
    return (normalizer.get("type") == "BertNormalizer" and normalizer.get("handle_chinese_chars", False)
            and pre_tokenizer.get("type") == "BertPreTokenizer"
            and all(_ROUGH_WORD.fullmatch(t["content"]) and not _CJK_CHAR.search(t["content"])
                    and not t.get("single_word") for t in config.get("added_tokens") or []))


class WordPieceTokenizer(Tokenizer):
    """A WordPiece `tokenizers.Tokenizer` (`backend`) behind the `Tokenizer` interface."""

    kind = "wordpiece"

    def __init__(self, backend: tokenizers.Tokenizer, *, source: str = "a tokenizers.Tokenizer"):
        self.backend = backend
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        _check_specials(lambda t: backend.token_to_id(t) is not None, source)
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (backend.token_to_id(t)
                                                                            for t in SPECIAL_TOKENS)
        tokens = [backend.id_to_token(i) for i in range(self.vocab_size)]
        config = json.loads(backend.to_str())
        self.fingerprint = _fingerprint(self.kind, config.get("normalizer"), tokens)
        self._pieces: dict[str, tuple[list[int], list[int]]] | None = {} if _splits_like_bert(config) else None

    def __getstate__(self):  # grain's worker processes receive the tokenizer without the cache
        return {**self.__dict__, "_pieces": None if self._pieces is None else {}}

    @classmethod
    def from_vocab(cls, tokens: list[str], *, lowercase: bool = True, source: str = "a vocabulary"):
        """From tokens in id order (a vocab.txt's lines); duplicates would give two ids one embedding."""
        vocab: dict[str, int] = {}
        for i, token in enumerate(tokens):
            if token in vocab:
                raise ConfigError(f"tokenizer {source}: token {token!r} appears at lines {vocab[token] + 1} and "
                                  f"{i + 1}; every token must be on one line only")
            vocab[token] = i
        _check_specials(vocab.__contains__, source)
        return cls(_bert_backend(vocab, lowercase), source=source)

    def _encoded_pieces(self, text: str):
        """(start in `text`, (ids, starts within the piece)) of each rough piece, encoded once per distinct piece.
        BERT's pipeline never joins two pieces, so this is exact, and 8x faster on Chinese text than the backend,
        whose per-character alignment bookkeeping dominates."""
        if len(self._pieces) > _MAX_CACHED_PIECES:
            self._pieces.clear()
        for match in _ROUGH_WORD.finditer(text):
            piece = match.group()
            cached = self._pieces.get(piece)
            if cached is None:
                encoding = self.backend.encode(piece, add_special_tokens=False)
                cached = self._pieces[piece] = (encoding.ids, [start for start, _ in encoding.offsets])
            yield match.start(), cached

    def encode(self, text: str) -> list[int]:
        if self._pieces is None:
            return self.backend.encode(text, add_special_tokens=False).ids
        ids: list[int] = []
        for _, (piece_ids, _) in self._encoded_pieces(text):
            ids += piece_ids
        return ids

    def encode_with_starts(self, text: str) -> tuple[list[int], list[int]]:
        if self._pieces is None:
            encoding = self.backend.encode(text, add_special_tokens=False)
            return encoding.ids, [start for start, _ in encoding.offsets]
        ids: list[int] = []
        starts: list[int] = []
        for offset, (piece_ids, piece_starts) in self._encoded_pieces(text):
            ids += piece_ids
            starts += [offset + start for start in piece_starts]
        return ids, starts

    def decode(self, ids: Iterable[int]) -> str:
        dropped = self._dropped_on_decode()
        return join_tokens(self.id_to_token(int(i)) for i in ids if int(i) not in dropped)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str:
        token = self.backend.id_to_token(i) if 0 <= i < self.vocab_size else None
        if token is None:
            raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        return token

    def save(self, directory: str) -> None:
        self.backend.save(os.path.join(directory, "tokenizer.json"), pretty=True)
        _write_meta(directory, {"kind": self.kind, "fingerprint": self.fingerprint})


# --------------------------------------------------------------------------------------------------
# Bytes.
# --------------------------------------------------------------------------------------------------

class ByteTokenizer(Tokenizer):
    """Ids 0..255 are UTF-8 bytes; then [PAD]=256 [UNK]=257 [CLS]=258 [SEP]=259 [MASK]=260, [unused1..N]."""

    kind = "bytes"

    def __init__(self, num_unused: int = 0):
        if num_unused < 0:
            raise ConfigError(f"ByteTokenizer: num_unused must be >= 0, got {num_unused}")
        self.num_unused = num_unused
        self._tokens = ([f"<0x{b:02X}>" for b in range(256)] + list(SPECIAL_TOKENS)
                        + [unused_token(i) for i in range(1, num_unused + 1)])
        self._ids = {t: i for i, t in enumerate(self._tokens)}
        self.vocab_size = len(self._tokens)
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = range(256, 261)
        self.fingerprint = _fingerprint(self.kind, None, self._tokens)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_with_starts(self, text: str) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        starts: list[int] = []
        for i, char in enumerate(text):
            encoded = char.encode("utf-8")
            ids += encoded
            starts += [i] * len(encoded)
        return ids, starts

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def token_bytes(self) -> list[bytes | None]:
        return [bytes([i]) for i in range(256)] + [None] * (self.vocab_size - 256)

    def token_to_id(self, token: str) -> int | None:
        return self._ids.get(token)

    def id_to_token(self, i: int) -> str:
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        return self._tokens[i]

    def save(self, directory: str) -> None:
        _write_meta(directory, {"kind": self.kind, "num_unused": self.num_unused, "fingerprint": self.fingerprint})


# --------------------------------------------------------------------------------------------------
# SentencePiece (unigram).
# --------------------------------------------------------------------------------------------------

SENTENCEPIECE_FILE = "sentencepiece.model"
SENTENCEPIECE_TRAINER_VERSION = "train_sentencepiece/v1"  # keys cached vocabularies: change it with the settings
_UNK_PENALTY = 10.0  # sentencepiece's kUnkPenalty: an unknown character scores min_score - 10


def _check_sentencepiece_settings(proto: bytes, source: str) -> None:
    """Refuses a model whose segmentation this class does not reproduce: `sample_encode`'s lattice, the offsets
    and `decode(encode(text)) == text` assume a unigram model over the raw text (identity normaliser, no dummy
    prefix, whitespace kept, no byte fallback)."""
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    try:
        model.ParseFromString(proto)
    except Exception:  # google.protobuf.message.DecodeError
        raise ConfigError(f"tokenizer {source}: not a sentencepiece model (the file does not parse as a "
                          "ModelProto)") from None
    norm, trainer = model.normalizer_spec, model.trainer_spec
    wrong = [what for what, bad in (
        ("a unigram model", trainer.model_type != sentencepiece_model_pb2.TrainerSpec.UNIGRAM),
        ("the identity normaliser", norm.name not in ("identity", "") or bool(norm.precompiled_charsmap)),
        ("no dummy prefix", norm.add_dummy_prefix), ("extra whitespace kept", norm.remove_extra_whitespaces),
        ("no byte fallback", trainer.byte_fallback)) if bad]
    if wrong:
        raise ConfigError(f"tokenizer {source}: this sentencepiece model is not what the text family reads; it needs "
                          f"{', '.join(wrong)}. Train one on your corpus: tokenizer.kind='sentencepiece', "
                          "tokenizer.path=''")


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (Kudo & Richardson, arXiv 1808.06226) behind the `Tokenizer` interface.

    Trained by `train_sentencepiece` as a unigram LM (Kudo, "Subword Regularization", arXiv 1804.10959) with the
    identity normaliser and no dummy prefix, so `decode(encode(text)) == text` for any text of known characters and
    a token's text is a substring of the input ('▁' stands for a space). `encode` is the most likely
    segmentation (sentencepiece's Viterbi); `sample_encode` draws one with probability ∝ P(segmentation)^α,
    sentencepiece's `enable_sampling` with `nbest_size=-1`, here by forward filtering and backward sampling on
    the same lattice with a NumPy generator, so a (seed, example) pair always gives the same segmentation
    (sentencepiece's own sampler draws from one process-wide generator).
    """

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, *, source: str = "a sentencepiece model"):
        import sentencepiece

        self._proto = bytes(model_proto)
        _check_sentencepiece_settings(self._proto, source)
        try:
            self.processor = sentencepiece.SentencePieceProcessor(model_proto=self._proto)
        except Exception as e:  # RuntimeError on a file that is not a ModelProto
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"tokenizer {source}: not a sentencepiece model ({reason})") from None
        sp = self.processor
        self.vocab_size = sp.get_piece_size()
        self._pieces = [sp.id_to_piece(i) for i in range(self.vocab_size)]
        self._ids = {piece: i for i, piece in enumerate(self._pieces)}
        _check_specials(self._ids.__contains__, source)
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (self._ids[t] for t in SPECIAL_TOKENS)
        scores = [sp.get_score(i) for i in range(self.vocab_size)]
        self._normal = [not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) or sp.is_byte(i))
                        for i in range(self.vocab_size)]
        self.fingerprint = _fingerprint(self.kind, "identity", [f"{p}\t{s!r}" for p, s in zip(self._pieces, scores)])
        # the lattice of `sample_encode`: surface text → (id, score) of every normal piece
        self._lattice = {self._pieces[i].replace("\u2581", " "): (i, scores[i])
                         for i in range(self.vocab_size) if self._normal[i]}
        self._max_piece = max(map(len, self._lattice))
        self._unk_score = min(s for i, s in enumerate(scores) if self._normal[i]) - _UNK_PENALTY

    @property
    def model_proto(self) -> bytes:
        """The serialised sentencepiece ModelProto (what `save` writes and the constructor takes)."""
        return self._proto

    def __getstate__(self):  # grain's worker processes rebuild the processor from the model's bytes
        return {"_proto": self._proto}

    def __setstate__(self, state):
        self.__init__(state["_proto"])

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text)

    def encode_with_starts(self, text: str) -> tuple[list[int], list[int]]:
        ids, starts, start = [], [], 0
        for piece in self.processor.encode(text, return_type="proto").pieces:
            ids.append(piece.id)
            starts.append(start)
            start += len(piece.surface)
        return ids, starts

    def segmentation_log_weights(self, text: str) -> list[list[tuple[int, int, float]]]:
        """edges[j] = [(i, id, score)]: the pieces that cover `text[i:j]` (a character that is not a piece by
        itself gets the unknown token at sentencepiece's penalty), the lattice `sample_encode` samples from."""
        text = text.replace("\u2581", " ")  # sentencepiece reads a literal '▁' as the space it stands for
        edges: list[list[tuple[int, int, float]]] = [[] for _ in range(len(text) + 1)]
        for i in range(len(text)):
            found_single = False
            for j in range(i + 1, min(len(text), i + self._max_piece) + 1):
                hit = self._lattice.get(text[i:j])
                if hit is not None:
                    edges[j].append((i, *hit))
                    found_single |= j == i + 1
            if not found_single:
                edges[i + 1].append((i, self.unk_id, self._unk_score))
        return edges

    def sample_encode(self, text: str, *, alpha: float, rng) -> list[int]:
        """One segmentation drawn with probability ∝ exp(α · Σ piece log-probabilities) (subword regularisation,
        arXiv 1804.10959 §3.2, l = ∞): the forward pass sums over the lattice, the backward pass samples from the
        end. `rng` is a `numpy.random.Generator`."""
        if not alpha > 0:
            raise ValueError(f"sample_encode: alpha must be positive, got {alpha}")
        edges = self.segmentation_log_weights(text)
        forward = [0.0] * (len(text) + 1)
        for j in range(1, len(text) + 1):
            terms = [forward[i] + alpha * s for i, _, s in edges[j]]
            top = max(terms)
            forward[j] = top + math.log(sum(math.exp(t - top) for t in terms))
        ids, j = [], len(text)
        while j > 0:  # the edge into j is (i, token) with probability exp(forward[i] + α·score − forward[j])
            u, total = rng.random(), 0.0
            for i, token, score in edges[j]:
                total += math.exp(forward[i] + alpha * score - forward[j])
                if u < total:
                    break
            if not (token == self.unk_id and ids and ids[-1] == self.unk_id):
                ids.append(token)  # a run of unknown characters is one [UNK], as sentencepiece's encode has it
            j = i
        return ids[::-1]

    def token_bytes(self) -> list[bytes | None]:
        return [self._pieces[i].replace("\u2581", " ").encode("utf-8") if self._normal[i] else None
                for i in range(self.vocab_size)]

    def decode(self, ids: Iterable[int]) -> str:
        dropped = self._dropped_on_decode()
        return self.processor.decode([int(i) for i in ids if int(i) not in dropped])

    def token_to_id(self, token: str) -> int | None:
        return self._ids.get(token)

    def id_to_token(self, i: int) -> str:
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        return self._pieces[i]

    def save(self, directory: str) -> None:
        with open(os.path.join(directory, SENTENCEPIECE_FILE), "wb") as f:
            f.write(self._proto)
        _write_meta(directory, {"kind": self.kind, "fingerprint": self.fingerprint})


def train_sentencepiece(texts: Iterable[str], *, vocab_size: int, num_unused: int = 99) -> SentencePieceTokenizer:
    """A unigram SentencePiece model of `vocab_size` pieces (specials and [unused] included) learned from `texts`:
    every character of the texts is kept (character_coverage 1), the identity normaliser, one thread (the same
    texts give the same model)."""
    import io

    import sentencepiece

    texts = [t for t in texts if t]
    if not texts:
        raise ConfigError("config: tokenizer.kind 'sentencepiece' has no text to train on: the corpus' train split "
                          "is empty; check data.corpus and data.path, or set tokenizer.path to a .model")
    out = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=out, model_type="unigram", vocab_size=vocab_size,
            character_coverage=1.0, normalization_rule_name="identity", add_dummy_prefix=False,
            remove_extra_whitespaces=False, pad_id=0, unk_id=1, bos_id=2, eos_id=3, pad_piece="[PAD]",
            unk_piece="[UNK]", bos_piece="[CLS]", eos_piece="[SEP]",
            control_symbols=["[MASK]"] + [unused_token(i) for i in range(1, num_unused + 1)], num_threads=1,
            max_sentence_length=1 << 20, minloglevel=2)
    except RuntimeError as e:  # e.g. "Vocabulary size too high (16000). Please set it to a value <= 9000."
        raise ConfigError(f"config: 'tokenizer.vocab_size' {vocab_size}: sentencepiece says {str(e).strip()}") from None
    return SentencePieceTokenizer(out.getvalue(), source="trained on the corpus")


# --------------------------------------------------------------------------------------------------
# Training a WordPiece vocabulary.
# --------------------------------------------------------------------------------------------------

# Names the training rule below; a cached vocabulary (train_lib.text.task) is keyed by it: change it with the rule.
TRAINER_VERSION = "train_wordpiece/v1"

def _word_counts(texts: Iterable[str], lowercase: bool) -> Counter:
    """Counts of the words that `encode` would see (BERT's normaliser and pre-tokenizer applied to each distinct
    rough piece, which is exact since they never join two pieces, and fast: a regex instead of the normaliser's
    per-character alignment bookkeeping over the whole text)."""
    pieces: Counter = Counter()
    for text in texts:
        pieces.update(_ROUGH_WORD.findall(text))
    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                            lowercase=lowercase)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words: Counter = Counter()
    for piece, count in pieces.items():
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(piece)):
            words[word] += count
    return words


def _learn_merges(words: dict[str, int], budget: int, min_frequency: int) -> list[str]:
    """New tokens of up to `budget` merges: BPE over WordPiece symbols ('h', '##e', ...), each step merging the
    most frequent adjacent pair (ties: the smallest pair of strings), as in Sennrich et al., "Neural Machine
    Translation of Rare Words with Subword Units" (https://arxiv.org/abs/1508.07909)."""
    symbols = [[w[0]] + ["##" + c for c in w[1:]] for w in words]
    counts = list(words.values())
    pair_counts: Counter = Counter()
    where: dict[tuple[str, str], set[int]] = defaultdict(set)

    def count_pairs(i: int, sign: int) -> None:
        for pair in zip(symbols[i], symbols[i][1:]):
            pair_counts[pair] += sign * counts[i]
            if sign > 0:
                where[pair].add(i)

    for i in range(len(symbols)):
        count_pairs(i, +1)
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)
    new_tokens: list[str] = []
    seen: set[str] = set()
    while heap and len(new_tokens) < budget:
        neg_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg_count:
            continue  # stale: the pair's count changed since this entry was pushed
        if -neg_count < min_frequency:
            break
        merged = pair[0] + pair[1][2:]
        touched: set[tuple[str, str]] = set()  # pairs whose count changed: they get fresh heap entries
        for i in where.pop(pair):
            s = symbols[i]
            touched.update(zip(s, s[1:]))
            count_pairs(i, -1)
            out, j = [], 0
            while j < len(s):
                if j + 1 < len(s) and (s[j], s[j + 1]) == pair:
                    out.append(merged)
                    j += 2
                else:
                    out.append(s[j])
                    j += 1
            symbols[i] = out
            count_pairs(i, +1)
            touched.update(zip(out, out[1:]))
        del pair_counts[pair]
        for p in touched - {pair}:
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
        if merged not in seen:
            seen.add(merged)
            new_tokens.append(merged)
    return new_tokens


def train_wordpiece(texts: Iterable[str], *, vocab_size: int, num_unused: int = 99, lowercase: bool = True,
                    min_frequency: int = 1) -> WordPieceTokenizer:
    """A Chinese-BERT WordPiece vocabulary learnt from `texts`, the same for the same texts (in any order).

    Ids: [PAD] [UNK] [CLS] [SEP] [MASK] = 0..4, [unused1..num_unused] = 5.., then every character seen (each CJK
    character is a word of its own; a character inside a Latin word also as '##c') in code point order, then
    the merged pieces in merge order until `vocab_size` tokens (fewer when nothing is left to merge).
    """
    words = {w: c for w, c in sorted(_word_counts(texts, lowercase).items()) if len(w) <= MAX_WORD_CHARS}
    alphabet = sorted({w[0] for w in words} | {"##" + ch for w in words for ch in w[1:]})
    fixed = list(SPECIAL_TOKENS) + [unused_token(i) for i in range(1, num_unused + 1)]
    tokens = fixed + [t for t in alphabet if t not in fixed]
    if vocab_size < len(tokens):
        raise ConfigError(f"train_wordpiece: vocab_size {vocab_size} cannot hold the {len(fixed)} special tokens "
                          f"and the {len(tokens) - len(fixed)} characters of the texts; use at least {len(tokens)}")
    taken = set(tokens)
    merges = [t for t in _learn_merges(words, vocab_size - len(tokens), min_frequency) if t not in taken]
    return WordPieceTokenizer.from_vocab(tokens + merges, lowercase=lowercase, source="trained by train_wordpiece")


# --------------------------------------------------------------------------------------------------
# Loading.
# --------------------------------------------------------------------------------------------------

def _write_meta(directory: str, meta: dict) -> None:
    with open(os.path.join(directory, META_FILE), "w", encoding="utf-8") as f:
        json.dump({"format": 1, **meta}, f, indent=1)


def _load_vocab_txt(path: str) -> WordPieceTokenizer:
    lowercase = True
    config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            lowercase = bool(json.load(f).get("do_lower_case", True))
    with open(path, encoding="utf-8") as f:
        tokens = [line.rstrip("\r\n") for line in f]
    while tokens and tokens[-1] == "":
        tokens.pop()  # a trailing newline is no token
    return WordPieceTokenizer.from_vocab(tokens, lowercase=lowercase, source=repr(path))


def _load_tokenizer_json(path: str) -> WordPieceTokenizer:
    try:
        with open(path, encoding="utf-8") as f:
            model_type = json.load(f).get("model", {}).get("type")
        backend = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # json.JSONDecodeError, or the bare Exception the library raises on a bad file
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"tokenizer {path!r} is not a Hugging Face tokenizer.json: {first_line}") from None
    if model_type != "WordPiece":
        raise ConfigError(f"tokenizer {path!r} has a {model_type} model; the text family needs a WordPiece "
                          "tokenizer.json (BERT, RoFormer)")
    return WordPieceTokenizer(backend, source=repr(path))


def _load_sentencepiece(path: str) -> SentencePieceTokenizer:
    try:
        with open(path, "rb") as f:
            proto = f.read()
    except OSError as e:
        raise ConfigError(f"tokenizer {path!r}: cannot read it ({e.strerror})") from None
    return SentencePieceTokenizer(proto, source=repr(path))


def _load_directory(path: str) -> Tokenizer:
    meta_path = os.path.join(path, META_FILE)
    if os.path.isfile(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("kind") == "bytes":
            tokenizer: Tokenizer = ByteTokenizer(num_unused=int(meta.get("num_unused", 0)))
        elif meta.get("kind") == "wordpiece":
            tokenizer = _load_tokenizer_json(os.path.join(path, "tokenizer.json"))
        elif meta.get("kind") == "sentencepiece":
            tokenizer = _load_sentencepiece(os.path.join(path, SENTENCEPIECE_FILE))
        else:
            raise ConfigError(f"tokenizer {meta_path!r}: kind {meta.get('kind')!r}; expected 'wordpiece', 'bytes' "
                              "or 'sentencepiece'")
        if meta.get("fingerprint") not in (None, tokenizer.fingerprint):
            raise ConfigError(f"tokenizer {path!r}: its files do not give the fingerprint recorded in {META_FILE} "
                              "(edited or partly written?); save the tokenizer again")
        return tokenizer
    for name, load in (("tokenizer.json", _load_tokenizer_json), ("vocab.txt", _load_vocab_txt),
                       (SENTENCEPIECE_FILE, _load_sentencepiece)):
        if os.path.isfile(os.path.join(path, name)):
            return load(os.path.join(path, name))
    raise ConfigError(f"tokenizer directory {path!r} holds none of {META_FILE}, tokenizer.json, vocab.txt, "
                      f"{SENTENCEPIECE_FILE}")


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer at `path`: a directory written by `Tokenizer.save`, a Hugging Face checkpoint directory
    (tokenizer.json preferred to vocab.txt), a BERT `vocab.txt` (lowercased unless a sibling
    tokenizer_config.json says `"do_lower_case": false`), a WordPiece `tokenizer.json`, or a sentencepiece
    `.model` with the pieces [PAD] [UNK] [CLS] [SEP] [MASK]."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return _load_directory(path)
    if not os.path.exists(path):
        raise ConfigError(f"tokenizer path {path!r} does not exist; give a vocab.txt, a tokenizer.json, a "
                          "sentencepiece .model or a directory holding one")
    if path.endswith(".json"):
        return _load_tokenizer_json(path)
    if path.endswith(".txt"):
        return _load_vocab_txt(path)
    if path.endswith(".model"):
        return _load_sentencepiece(path)
    raise ConfigError(f"tokenizer path {path!r} is none of a vocab.txt (one token per line), a tokenizer.json or "
                      "a sentencepiece .model")


# --------------------------------------------------------------------------------------------------
# Model inputs and words.
# --------------------------------------------------------------------------------------------------

def encode_pair(tokenizer: Tokenizer, first: str, second: str | None = None, *, max_length: int,
                max_second: int | None = None) -> tuple[list[int], list[int]]:
    """(ids, segment_ids) of `[CLS] first [SEP]` (segment 0) and `second [SEP]` (segment 1), at most `max_length`.

    `second` is cut to `max_second` tokens (its [SEP] included), then `first` loses tokens from its end until the
    total fits; if `second` alone overflows, `first` is left empty and `second` is cut as well.
    """
    specials = 2 if second is None else 3
    if max_length < specials:
        raise ValueError(f"encode_pair: max_length {max_length} cannot hold the {specials} special tokens")
    if max_second is not None and max_second < 1:
        raise ValueError(f"encode_pair: max_second {max_second} cannot hold the second segment's [SEP]")
    b = [] if second is None else tokenizer.encode(second)
    if max_second is not None:
        b = b[:max_second - 1]
    b = b[:max_length - specials]
    a = tokenizer.encode(first)[:max_length - specials - len(b)]
    ids = [tokenizer.cls_id, *a, tokenizer.sep_id]
    segments = [0] * len(ids)
    if second is not None:
        ids += [*b, tokenizer.sep_id]
        segments += [1] * (len(b) + 1)
    return ids, segments


def whole_word_spans(text: str) -> list[tuple[int, int]]:
    """[start, end) character spans of the words jieba finds in `text` (dictionary only, HMM off, so the same text
    always gives the same words); they tile the text, whitespace runs included."""
    import jieba  # lazily: it loads a dictionary (about a second) the first time it segments

    jieba.setLogLevel(logging.WARNING)  # "Building prefix dict ..." otherwise goes to stderr
    spans, start = [], 0
    for word in jieba.lcut(text, HMM=False):
        spans.append((start, start + len(word)))
        start += len(word)
    return spans


def word_ids_for_tokens(tokenizer: Tokenizer, text: str) -> tuple[list[int], list[int]]:
    """(ids, word_index): `tokenizer.encode(text)` and, per token, an index into `whole_word_spans(text)`, for
    whole-word masking ("Pre-Training with Whole Word Masking for Chinese BERT", https://arxiv.org/abs/1906.08101).

    The rule: a '##' piece belongs to the word of the token before it (a Latin word is masked whole); any other
    token to the jieba word holding its first character (a CJK character, a byte's character, a Latin word).
    """
    word_of_char = []
    for w, (start, end) in enumerate(whole_word_spans(text)):
        word_of_char += [w] * (end - start)
    ids, starts = tokenizer.encode_with_starts(text)
    continuation = _continuation_ids(tokenizer)
    word_index: list[int] = []
    for token_id, start in zip(ids, starts):
        word_index.append(word_index[-1] if word_index and token_id in continuation else word_of_char[start])
    return ids, word_index


@functools.lru_cache(maxsize=8)
def _continuation_ids(tokenizer: Tokenizer) -> frozenset[int]:
    return frozenset(i for i in range(tokenizer.vocab_size) if tokenizer.id_to_token(i).startswith("##"))
