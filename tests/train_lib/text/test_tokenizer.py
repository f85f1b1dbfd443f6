"""Tokenizers: WordPiece training against a brute-force BPE, encoding against the Hugging Face pipeline, Chinese
BERT detokenisation, save/load, vocab.txt / tokenizer.json loading, encode_pair layouts, and jieba's words."""
import functools
import json
import os
import pickle
import random
import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import given, settings, strategies as st
from tokenizers import implementations, models, normalizers, pre_tokenizers
import tokenizers

from tests.train_lib.conftest import REPO
from train_lib.config_lib import ConfigError
from train_lib.text import tokenizer as tok_lib

TEXTS = [
    "今天天气很好，我们去公园散步。", "我来到北京清华大学。", "他来到了网易杭研大厦！", "我用Python写代码，版本是3.11。",
    "Return the number of items in a container.", "Hello world, this is a small test; nothing more.",
    "the quick brown fox jumps over the lazy dog", "读书使人进步，写作使人精确。", "Hello again, world!",
]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(scope="module")
def trained():
    return tok_lib.train_wordpiece(TEXTS, vocab_size=400, num_unused=3)


def tiny_vocab(tmp_path, tokens, config=None):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


# -- training ----------------------------------------------------------------------------------------

def test_trained_vocabulary_layout(trained):
    tokens = [trained.id_to_token(i) for i in range(trained.vocab_size)]
    assert tokens[:8] == SPECIALS + ["[unused1]", "[unused2]", "[unused3]"]
    assert (trained.pad_id, trained.unk_id, trained.cls_id, trained.sep_id, trained.mask_id) == (0, 1, 2, 3, 4)
    assert trained.unused_ids() == [5, 6, 7]
    assert trained.kind == "wordpiece" and trained.vocab_size <= 400 and len(set(tokens)) == len(tokens)
    for text in TEXTS:  # every character is a token: nothing is unknown, each CJK character is one token
        assert trained.unk_id not in trained.encode(text)
        assert all(trained.token_to_id(ch) is not None for ch in text if tok_lib.is_cjk_character(ch))
    assert int(trained.fingerprint, 16) and len(trained.fingerprint) == 64


def test_training_is_deterministic_across_orders_and_processes(trained):
    shuffled = list(TEXTS)
    random.Random(0).shuffle(shuffled)
    again = tok_lib.train_wordpiece(shuffled, vocab_size=400, num_unused=3)
    assert again.fingerprint == trained.fingerprint
    code = ("from train_lib.text import tokenizer as t; from tests.train_lib.text.test_tokenizer import TEXTS; "
            "print(t.train_wordpiece(TEXTS, vocab_size=400, num_unused=3).fingerprint)")
    for seed in ("1", "2"):  # Python's string hashing is salted per process; the vocabulary must not depend on it
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONHASHSEED": seed},
                             capture_output=True, text=True, check=True)
        assert out.stdout.strip() == trained.fingerprint


def brute_force_merges(words, budget, min_frequency):
    """BPE recounting every pair at every step: most frequent pair first, ties to the smallest pair."""
    symbols = {w: [w[0]] + ["##" + c for c in w[1:]] for w in words}
    new = []
    while len(new) < budget:
        counts = Counter()
        for w, s in symbols.items():
            for pair in zip(s, s[1:]):
                counts[pair] += words[w]
        if not counts:
            break
        pair = min(counts, key=lambda p: (-counts[p], p))
        if counts[pair] < min_frequency:
            break
        merged = pair[0] + pair[1][2:]
        for w, s in symbols.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == pair:
                    out.append(merged)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            symbols[w] = out
        if merged not in new:
            new.append(merged)
    return new


@settings(max_examples=30)
@given(st.dictionaries(st.text("abc", min_size=1, max_size=7), st.integers(1, 5), min_size=1, max_size=12),
       st.integers(0, 25), st.integers(1, 3))
def test_merges_match_brute_force_bpe(words, budget, min_frequency):
    words = dict(sorted(words.items()))
    assert tok_lib._learn_merges(words, budget, min_frequency) == brute_force_merges(words, budget, min_frequency)


TRICKY = ["a\x1cb c\u2028d\x85e\u00a0f\u3000g", "Ｆｕｌｌ　ｗｉｄｔｈ", "café naïve ÅNGSTRÖM", "\uf900\uf901豈",
          "a\u200bb\ufeffc", "x\x00y\ufffdz", "tab\tnew\nline\r", "𠀀𠀁 emoji😀ok", "don't stop-me 3.14 [MASK]x", "中[MASK]文 a\u0301b"]


@pytest.mark.parametrize("lowercase", [True, False])
def test_word_counts_are_those_of_the_bert_pipeline(lowercase):
    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                            lowercase=lowercase)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    texts = TRICKY + TEXTS
    expected = Counter(w for t in texts for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(t)))
    assert tok_lib._word_counts(texts, lowercase) == expected


def test_too_small_a_vocabulary_is_refused():
    with pytest.raises(ConfigError, match=r"vocab_size 20 cannot hold .* use at least \d+"):
        tok_lib.train_wordpiece(TEXTS, vocab_size=20)


# -- encoding and decoding -------------------------------------------------------------------------------

MIXED_ALPHABET = st.sampled_from(list("我们的中国天气好，。！？abcXYZé0123 .,'-\t\n\u3000\u00a0\x00\u0301😀豈[]") + ["[MASK]"])


@functools.cache
def cased_or_not(lowercase):
    return tok_lib.train_wordpiece(TEXTS + ["abc xyz éa 0123"], vocab_size=420, lowercase=lowercase)


@settings(max_examples=60)
@given(st.lists(MIXED_ALPHABET, max_size=30).map("".join), st.booleans())
def test_piecewise_encoding_equals_the_backend(text, lowercase):
    tokenizer = cased_or_not(lowercase)
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    assert tokenizer.encode(text) == encoding.ids
    assert tokenizer.encode_with_starts(text) == (encoding.ids, [start for start, _ in encoding.offsets])


@pytest.mark.parametrize("text", ["今天天气很好，我们去公园散步。", "hello, world. this is a small test; nothing more!",
                                  "我用python写代码，版本是3.11。读书使人进步"])
def test_decode_inverts_encode(trained, text):
    ids = trained.encode(text)
    assert trained.decode(ids) == text
    assert trained.decode([trained.cls_id, *ids, trained.sep_id, trained.mask_id, trained.pad_id]) == text


def test_decode_glues_pieces_and_spaces_latin_words_only():
    cases = {
        ("我", "用", "py", "##thon", "写", "代", "码"): "我用python写代码",
        ("hello", ",", "world", "."): "hello, world.",
        ("3", ".", "11", "版", "v", "##2"): "3.11版v2",
        ("(", "a", ")", "b", "-", "c", "'", "s"): "(a) b-c's",
        ("the", "end", ".", "next", "中", "文", "，", "ok"): "the end. next中文，ok",
    }
    for tokens, text in cases.items():
        assert tok_lib.join_tokens(tokens) == text


def test_decode_keeps_unknown_tokens(trained):
    assert trained.decode([trained.token_to_id("我"), trained.unk_id]) == "我[UNK]"


@settings(max_examples=50)
@given(st.text(max_size=40))
def test_bytes_round_trip_any_text(text):
    tokenizer = tok_lib.ByteTokenizer(num_unused=2)
    ids = tokenizer.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.decode([tokenizer.cls_id, *ids, tokenizer.sep_id, 261, tokenizer.pad_id]) == text


def test_byte_tokenizer_ids():
    tokenizer = tok_lib.ByteTokenizer(num_unused=3)
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id) == (
        256, 257, 258, 259, 260)
    assert tokenizer.unused_ids() == [261, 262, 263] and tokenizer.vocab_size == 264
    assert tokenizer.token_to_id("<0x41>") == 65 and tokenizer.id_to_token(259) == "[SEP]"
    assert tokenizer.token_to_id("[unused4]") is None
    assert tokenizer.decode([0xE4, 0xB8, 0xAD, 0xFF]) == "中\ufffd"  # invalid UTF-8 is replaced, not an error
    assert tok_lib.ByteTokenizer().unused_ids() == []
    assert tok_lib.ByteTokenizer(1).fingerprint != tok_lib.ByteTokenizer(2).fingerprint
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.id_to_token(264)


# -- saving and loading ---------------------------------------------------------------------------------

def test_pickling_keeps_the_tokenizer(trained):
    trained.encode(TEXTS[0])  # fills the piece cache, which is not pickled
    copy = pickle.loads(pickle.dumps(trained))
    assert copy._pieces == {} and copy.fingerprint == trained.fingerprint
    assert [copy.encode(t) for t in TEXTS] == [trained.encode(t) for t in TEXTS]


@pytest.mark.parametrize("make", [lambda: tok_lib.train_wordpiece(TEXTS, vocab_size=400, num_unused=3),
                                  lambda: tok_lib.ByteTokenizer(num_unused=5)], ids=["wordpiece", "bytes"])
def test_save_then_load_is_identical(tmp_path, make):
    tokenizer = make()
    tokenizer.save(str(tmp_path))
    loaded = tok_lib.load_tokenizer(str(tmp_path))
    assert type(loaded) is type(tokenizer) and loaded.fingerprint == tokenizer.fingerprint
    assert loaded.vocab_size == tokenizer.vocab_size and loaded.unused_ids() == tokenizer.unused_ids()
    for text in TEXTS + TRICKY:
        assert loaded.encode(text) == tokenizer.encode(text)


def test_an_edited_saved_tokenizer_is_refused(tmp_path, trained):
    trained.save(str(tmp_path))
    config = json.loads((tmp_path / "tokenizer.json").read_text())
    config["model"]["vocab"]["zzz"] = len(config["model"]["vocab"])
    (tmp_path / "tokenizer.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="fingerprint recorded"):
        tok_lib.load_tokenizer(str(tmp_path))


VOCAB = SPECIALS + ["[unused1]", "[unused2]", "我", "爱", "北", "京", "hello", "he", "##llo", "py", "##thon", ",", "!",
                    "Hello"]


def test_vocab_txt_encodes_as_bert_does(tmp_path):
    path = tiny_vocab(tmp_path, VOCAB)
    tokenizer = tok_lib.load_tokenizer(str(path))
    assert tokenizer.encode("我爱北京, Hello python!") == [7, 8, 9, 10, 16, 11, 14, 15, 17]
    assert tokenizer.encode("我爱上海") == [7, 8, 1, 1]
    assert tokenizer.unused_ids() == [5, 6] and tokenizer.vocab_size == len(VOCAB)
    reference = implementations.BertWordPieceTokenizer(str(path), lowercase=True)
    for text in ["我爱北京, Hello python!", "hello,hellopy 北京!", "Python我"]:
        assert tokenizer.encode(text) == reference.encode(text, add_special_tokens=False).ids
    assert tok_lib.load_tokenizer(str(tmp_path)).fingerprint == tokenizer.fingerprint  # the directory holding it


def test_vocab_txt_keeps_case_when_the_config_says_so(tmp_path):
    path = tiny_vocab(tmp_path, VOCAB, config={"do_lower_case": False})
    cased = tok_lib.load_tokenizer(str(path))
    assert cased.encode("Hello hello") == [18, 11]
    assert cased.fingerprint != tok_lib.WordPieceTokenizer.from_vocab(VOCAB).fingerprint


def test_tokenizer_json_file_and_hugging_face_directory(tmp_path, trained):
    trained.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "vocab.txt").write_text("not used: tokenizer.json wins\n")
    for path in (tmp_path / "tokenizer.json", tmp_path):
        loaded = tok_lib.load_tokenizer(str(path))
        assert loaded.fingerprint == trained.fingerprint
        assert loaded.encode(TEXTS[3]) == trained.encode(TEXTS[3])


@pytest.mark.parametrize("setup, message", [
    (lambda d: d / "missing.txt", "does not exist"),
    (lambda d: (d / "weights.bin").write_bytes(b"\0") and d / "weights.bin", "is none of a vocab.txt"),
    (lambda d: tiny_vocab(d, ["[PAD]", "[UNK]", "[CLS]", "a"]), r"lacks \[SEP\] \[MASK\]"),
    (lambda d: tiny_vocab(d, SPECIALS + ["a", "b", "a"]), "appears at lines 6 and 8"),
    (lambda d: (d / "tokenizer.json").write_text("{not json") and d / "tokenizer.json", "not a Hugging Face"),
    (lambda d: d, "holds none of"),
])
def test_bad_tokenizer_paths_are_one_line_errors(tmp_path, setup, message):
    path = setup(tmp_path)
    with pytest.raises(ConfigError, match=message) as info:
        tok_lib.load_tokenizer(str(path))
    assert "\n" not in str(info.value)


def test_a_bpe_tokenizer_json_is_refused(tmp_path):
    backend = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(SPECIALS)}, merges=[]))
    backend.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ConfigError, match="has a BPE model"):
        tok_lib.load_tokenizer(str(tmp_path / "tokenizer.json"))


# -- model inputs and words ---------------------------------------------------------------------------------

def test_encode_pair_layout_and_truncation():
    t = tok_lib.ByteTokenizer()
    cls, sep = 258, 259
    assert t.encode("ab") == [97, 98]
    assert tok_lib.encode_pair(t, "ab", "xyz", max_length=16) == (
        [cls, 97, 98, sep, 120, 121, 122, sep], [0, 0, 0, 0, 1, 1, 1, 1])
    # the second segment is cut to max_second tokens with its [SEP], then the first from its end
    assert tok_lib.encode_pair(t, "abcdef", "xyz", max_length=9, max_second=3) == (
        [cls, 97, 98, 99, 100, sep, 120, 121, sep], [0] * 6 + [1] * 3)
    assert tok_lib.encode_pair(t, "abcdef", None, max_length=5) == ([cls, 97, 98, 99, sep], [0] * 5)
    # a second segment that overflows alone leaves the first empty and is cut too
    assert tok_lib.encode_pair(t, "ab", "uvwxyz", max_length=6) == ([cls, sep, 117, 118, 119, sep], [0, 0, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="cannot hold the 3 special tokens"):
        tok_lib.encode_pair(t, "ab", "c", max_length=2)
    with pytest.raises(ValueError, match="max_second 0"):
        tok_lib.encode_pair(t, "ab", "c", max_length=8, max_second=0)


def test_whole_word_spans_are_jiebas_words():
    # checked by hand against jieba 0.42.1's dictionary (HMM off)
    assert tok_lib.whole_word_spans("我来到北京清华大学") == [(0, 1), (1, 3), (3, 5), (5, 9)]  # 我/来到/北京/清华大学
    text = "他来到了网易杭研大厦"
    assert [text[a:b] for a, b in tok_lib.whole_word_spans(text)] == ["他", "来到", "了", "网易", "杭", "研", "大厦"]


def test_word_ids_for_tokens(tmp_path):
    wordpiece = tok_lib.load_tokenizer(str(tiny_vocab(tmp_path, VOCAB + ["来", "到", "中", "国"])))
    # jieba: 我/来到/中国/python/, ; tokens 我 来 到 中 国 py ##thon ,
    ids, words = tok_lib.word_ids_for_tokens(wordpiece, "我来到中国python,")
    assert ids == wordpiece.encode("我来到中国python,") and words == [0, 1, 1, 2, 2, 3, 3, 4]
    # 'naïve' is one WordPiece word but three jieba pieces (na/ï/ve): its '##' pieces stay with its first token
    wordpiece = tok_lib.WordPieceTokenizer.from_vocab(SPECIALS + ["na", "##ive", "我"])
    assert tok_lib.word_ids_for_tokens(wordpiece, "我naïve") == ([7, 5, 6], [0, 1, 1])
    ids, words = tok_lib.word_ids_for_tokens(tok_lib.ByteTokenizer(), "我来到a")
    assert ids == list("我来到a".encode()) and words == [0, 0, 0, 1, 1, 1, 1, 1, 1, 2]
