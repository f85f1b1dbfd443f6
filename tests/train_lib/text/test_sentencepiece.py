"""The sentencepiece tokenizer: exact round trips, saving, and random segmentations against brute force.

`sample_encode` must draw each segmentation with probability ∝ exp(α Σ log p(piece)) (subword regularisation,
arXiv 1804.10959): checked against every segmentation enumerated in float64 from the model's pieces and
scores, against sentencepiece's own `enable_sampling` sampler, and at large α against its Viterbi `encode`.
"""
from __future__ import annotations

import functools
import math
import pickle
from collections import Counter

import numpy as np
import pytest

from train_lib.config_lib import ConfigError
from train_lib.text import tokenizer as tokenizer_lib

WORDS = ["我们", "喜欢", "这本书", "的", "朋友", "有兴趣", "可以", "访问", "网站", "很好", "不错", "质量", "价格",
         "便宜", "。", "，", "书店", "好书", " ok"]


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(WORDS, size=rng.integers(3, 9))) for _ in range(n)]


@functools.lru_cache(maxsize=1)
def small_tokenizer() -> tokenizer_lib.SentencePieceTokenizer:
    return tokenizer_lib.train_sentencepiece(corpus(), vocab_size=70, num_unused=3)


def test_round_trip_offsets_specials_and_save(tmp_path):
    tok = small_tokenizer()
    assert tok.vocab_size == 70 and [tok.id_to_token(i) for i in range(5)] == list(tokenizer_lib.SPECIAL_TOKENS)
    assert tok.unused_ids() == [tok.token_to_id(f"[unused{i}]") for i in (1, 2, 3)]
    for text in corpus(50, seed=1) + ["我们 ok 喜欢", "Xyz未知的字"]:
        ids, starts = tok.encode_with_starts(text)
        assert ids == tok.encode(text) and starts[0] == 0 and starts == sorted(starts)
        if tok.unk_id not in ids:
            assert tok.decode(ids) == text  # identity normaliser, no dummy prefix
            pieces = tok.token_bytes()
            assert b"".join(pieces[i] for i in ids) == text.encode("utf-8")
            assert [len(text[:s].encode()) for s in starts] == list(np.cumsum([0] + [len(pieces[i]) for i in ids])[:-1])
    assert tok.decode([tok.cls_id, *tok.encode("很好"), tok.sep_id, tok.pad_id]) == "很好"
    tok.save(str(tmp_path))
    for loaded in (tokenizer_lib.load_tokenizer(str(tmp_path)),
                   tokenizer_lib.load_tokenizer(str(tmp_path / tokenizer_lib.SENTENCEPIECE_FILE)),
                   pickle.loads(pickle.dumps(tok))):
        assert loaded.kind == "sentencepiece" and loaded.fingerprint == tok.fingerprint
        assert loaded.encode("这本书的朋友") == tok.encode("这本书的朋友")
    # the same texts give the same model (one trainer thread)
    assert tokenizer_lib.train_sentencepiece(corpus(), vocab_size=70, num_unused=3).fingerprint == tok.fingerprint
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="not a sentencepiece model"):
        tokenizer_lib.load_tokenizer(str(tmp_path / "bad.model"))


def exact_segmentations(tok, text: str, alpha: float) -> dict[tuple[int, ...], float]:
    """Every segmentation of `text` into the model's normal pieces, with its probability ∝ exp(α Σ score), by
    recursion over the pieces read straight from the sentencepiece processor (float64)."""
    sp = tok.processor
    pieces = {sp.id_to_piece(i).replace("\u2581", " "): (i, sp.get_score(i)) for i in range(sp.get_piece_size())
              if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) or sp.is_byte(i))}

    def walk(rest):
        if not rest:
            yield (), 0.0
        for piece, (i, score) in pieces.items():
            if rest.startswith(piece):
                for tail, total in walk(rest[len(piece):]):
                    yield (i, *tail), score + total
    weights = {seg: math.exp(alpha * total) for seg, total in walk(text)}
    z = sum(weights.values())
    return {seg: w / z for seg, w in weights.items()}


def total_variation(counts: Counter, exact: dict) -> float:
    n = sum(counts.values())
    return 0.5 * sum(abs(counts.get(s, 0) / n - p) for s, p in exact.items()) + 0.5 * sum(
        c / n for s, c in counts.items() if s not in exact)


@pytest.mark.parametrize("text,alpha", [("这本书的朋友", 0.5), ("有兴趣访问网站", 0.2), ("好书店", 1.0)])
def test_sampled_segmentations_follow_the_unigram_distribution(text, alpha):
    tok = small_tokenizer()
    exact = exact_segmentations(tok, text, alpha)
    assert len(exact) >= 3, exact  # a lattice with real choices
    rng = np.random.default_rng(0)
    n = 20000
    ours = Counter(tuple(tok.sample_encode(text, alpha=alpha, rng=rng)) for _ in range(n))
    theirs = Counter(tuple(tok.processor.encode(text, enable_sampling=True, alpha=alpha, nbest_size=-1))
                     for _ in range(n))
    # sampling error of a TV distance over ≤ 30 outcomes at n = 20000 is about 0.01
    assert total_variation(ours, exact) < 0.03, (ours.most_common(5), sorted(exact.items(), key=lambda x: -x[1])[:5])
    assert total_variation(theirs, exact) < 0.03  # it is the distribution of sentencepiece's enable_sampling
    # at large α the draw is the most likely segmentation: sentencepiece's Viterbi score
    best = max(exact, key=exact.get)
    assert tuple(tok.encode(text)) == best
    assert tuple(tok.sample_encode(text, alpha=200.0, rng=rng)) == best


def test_sampling_covers_unknown_characters_and_is_reproducible():
    tok = small_tokenizer()
    text = "我们X喜欢"
    a = tok.sample_encode(text, alpha=0.1, rng=np.random.default_rng([3, 7]))
    assert tok.unk_id in a and a == tok.sample_encode(text, alpha=0.1, rng=np.random.default_rng([3, 7]))
    # a run of unknown characters is one [UNK], and a literal '▁' is a space, as in sentencepiece's encode
    for text in ("XYZ我们", "我们\u2581ok", "好书\u2581\u2581 XY"):
        assert tok.sample_encode(text, alpha=500.0, rng=np.random.default_rng(0)) == tok.encode(text)
    with pytest.raises(ValueError, match="alpha must be positive"):
        tok.sample_encode(text, alpha=0.0, rng=np.random.default_rng(0))


def test_models_it_cannot_reproduce_are_refused(tmp_path):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(small_tokenizer().model_proto)
    proto.normalizer_spec.add_dummy_prefix = True
    proto.trainer_spec.byte_fallback = True
    path = tmp_path / "dummy_prefix.model"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(ConfigError, match=r"dummy_prefix.model.*needs no dummy prefix, no byte fallback\. Train one"):
        tokenizer_lib.load_tokenizer(str(path))


def test_vocabulary_smaller_than_the_alphabet_is_a_config_error():
    with pytest.raises(ConfigError, match="tokenizer.vocab_size.*120"):
        tokenizer_lib.train_sentencepiece([chr(0x4e00 + i) * 3 for i in range(300)], vocab_size=120)
    with pytest.raises(ConfigError, match="no text to train on.*data.corpus"):
        tokenizer_lib.train_sentencepiece(["", ""], vocab_size=120)
