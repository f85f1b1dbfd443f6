"""The tokenized-text family: 'text_mlm' (masked-LM pretraining) and 'seq2seq' (UniLM), on one encoder.

Both tasks hold a tokenizer (`train_lib.text.tokenizer`: WordPiece trained on the embedded corpus, a user's
`vocab.txt`/`tokenizer.json`, or bytes), a `train_lib.text.modeling.TextModel` (RoFormer/BERT or GAU) whose
parameters live under 'encoder', and may start from pretrained weights (`init_from`: a workdir of this family,
or a Hugging Face BERT/RoFormer directory). The tokenizer is written into the workdir (`tokenizer/`), so a
checkpoint is self-describing.

- text_mlm: BERT's objective (Devlin et al., arXiv 1810.04805): 15% of the tokens (or of jieba's whole words,
  `data.whole_word_mask`) are predicted; of those, 80% are replaced by [MASK], 10% by a random token, 10% kept.
  The loss is the mean cross-entropy over predicted positions per example, then over the batch.
- seq2seq: UniLM (Dong et al., arXiv 1905.03197; https://kexue.fm/archives/6933): `[CLS] source [SEP] target
  [SEP]` under the UniLM mask, cross-entropy on the target tokens only (per-example mean, then the batch's).
  `copy_prior` adds the 2018 title-generation post's prior (https://kexue.fm/archives/5861): the output logits
  are averaged with a learned scale-shift `exp(s) ⊙ bag + b` of the bag of source tokens.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from models import masks as masks_lib
from train_lib import config_lib
from train_lib.config_lib import ConfigError
from train_lib.task import TaskBase
from train_lib.text import data as data_lib
from train_lib.text import modeling
from train_lib.text import tokenizer as tokenizer_lib

log = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer"  # inside a workdir
TOKENIZER_KINDS = ("wordpiece", "bytes", "sentencepiece")


@dataclasses.dataclass(frozen=True)
class TokenizerSettings:
    """The `tokenizer.*` block: which vocabulary; `path` wins, then `init_from`'s, then one trained here."""

    # 'wordpiece' (trained on the pretraining mix unless path is set), 'bytes', or 'sentencepiece' (a unigram model
    # trained on data.corpus's train split unless path is set)
    kind: str = "wordpiece"
    path: str = ""  # a vocab.txt, tokenizer.json, sentencepiece .model, or a directory holding one
    vocab_size: int = 8000  # training: the vocabulary's size (specials and [unused] included)
    num_unused: int = 99  # reserved [unused1..N] tokens (P-tuning's prompt tokens)
    lowercase: bool = True  # WordPiece
    # sentencepiece: each training example's segmentation drawn with probability ∝ P(segmentation)^α, anew in
    # every epoch (subword regularisation, Kudo, arXiv 1804.10959; https://kexue.fm/archives/9768); 0: always
    # the most likely one. Evaluation and decoding always use the most likely one.
    sampling_alpha: float = 0.0



@functools.lru_cache(maxsize=4)
def _trained_wordpiece(vocab_size: int, num_unused: int, lowercase: bool) -> tokenizer_lib.Tokenizer:
    """WordPiece built from the train splits of the embedded corpora: deterministic, so it is cached per process
    and on disk (`corpora.cache_dir()`, keyed by the texts' fingerprint and the settings)."""
    import hashlib

    from train_lib.text import corpora

    key = hashlib.sha256(f"{corpora.vocabulary_fingerprint()} {vocab_size} {num_unused} {lowercase} "
                         f"{tokenizer_lib.TRAINER_VERSION}".encode()).hexdigest()
    cached = corpora.read_cache("vocabulary", key)
    if cached is not None:
        tokenizer = tokenizer_lib.WordPieceTokenizer.from_vocab(cached["tokens"], lowercase=lowercase)
        if tokenizer.fingerprint == cached["fingerprint"]:
            return tokenizer
    tokenizer = tokenizer_lib.train_wordpiece(corpora.vocabulary_texts(), vocab_size=vocab_size,
                                              num_unused=num_unused, lowercase=lowercase)
    tokens = [tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size)]
    corpora.write_cache("vocabulary", key, {"tokens": tokens, "fingerprint": tokenizer.fingerprint})
    return tokenizer


def _trained_sentencepiece(vocab_size: int, num_unused: int, corpus_texts) -> tokenizer_lib.Tokenizer:
    """A unigram SentencePiece model of the task's training texts, cached on disk like `_trained_wordpiece`
    (training takes ~20 s for 1M characters)."""
    import base64
    import hashlib

    from train_lib.text import corpora

    texts, fingerprint = corpus_texts()
    key = hashlib.sha256(f"{fingerprint} {vocab_size} {num_unused} "
                         f"{tokenizer_lib.SENTENCEPIECE_TRAINER_VERSION}".encode()).hexdigest()
    cached = corpora.read_cache("sentencepiece", key)
    if cached is not None:
        try:
            tokenizer = tokenizer_lib.SentencePieceTokenizer(base64.b64decode(cached["model"]))
        except (ConfigError, KeyError, TypeError, ValueError):
            tokenizer = None  # a damaged cache entry: train again and overwrite it
        if tokenizer is not None and tokenizer.fingerprint == cached.get("fingerprint"):
            return tokenizer
    tokenizer = tokenizer_lib.train_sentencepiece(texts, vocab_size=vocab_size, num_unused=num_unused)
    corpora.write_cache("sentencepiece", key, {"model": base64.b64encode(tokenizer.model_proto).decode("ascii"),
                                               "fingerprint": tokenizer.fingerprint})
    return tokenizer


def _is_workdir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "checkpoints"))


def _is_huggingface_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and not _is_workdir(path)


def resolve_tokenizer(settings: TokenizerSettings, init_from: str,
                      corpus_texts=None) -> tuple[tokenizer_lib.Tokenizer, str]:
    """(tokenizer, where it came from): `tokenizer.path`, else `init_from`'s (a workdir's `tokenizer/`, a Hugging
    Face directory's vocab.txt or tokenizer.json), else trained: WordPiece on the embedded pretraining mix,
    sentencepiece on `corpus_texts()` → (texts, fingerprint); or bytes."""
    if settings.kind not in TOKENIZER_KINDS:
        raise ConfigError(f"config: 'tokenizer.kind' is {settings.kind!r}; expected one of {list(TOKENIZER_KINDS)}")
    if not settings.sampling_alpha >= 0:
        raise ConfigError(f"config: 'tokenizer.sampling_alpha' must be >= 0 (0: no sampling), got "
                          f"{settings.sampling_alpha}")
    pretrained = None
    if init_from:
        candidate = os.path.join(init_from, TOKENIZER_DIR) if _is_workdir(init_from) else init_from
        has_files = any(os.path.exists(os.path.join(candidate, f))
                        for f in ("tokenizer.json", "vocab.txt", tokenizer_lib.SENTENCEPIECE_FILE))
        if has_files:
            pretrained = tokenizer_lib.load_tokenizer(candidate)
    if settings.path:
        if not os.path.exists(settings.path):
            raise ConfigError(f"config: 'tokenizer.path' {settings.path!r} does not exist; give a vocab.txt, a "
                              "tokenizer.json, a sentencepiece .model or a directory holding one, or '' to train "
                              "one (WordPiece on the embedded corpus, sentencepiece on data.corpus)")
        tokenizer = tokenizer_lib.load_tokenizer(settings.path)
        if pretrained is not None and pretrained.fingerprint != tokenizer.fingerprint:
            raise ConfigError(f"config: 'tokenizer.path' {settings.path!r} is not the vocabulary of init_from "
                              f"{init_from!r} ({tokenizer.vocab_size} vs {pretrained.vocab_size} tokens); its "
                              "embeddings would be read with the wrong ids. Set tokenizer.path='' to use init_from's")
        return tokenizer, settings.path
    if pretrained is not None:
        return pretrained, init_from
    if init_from and _is_huggingface_dir(init_from):
        raise ConfigError(f"config: 'init_from' {init_from!r} has no vocab.txt or tokenizer.json; set tokenizer.path "
                          "to the checkpoint's vocabulary")
    if settings.kind == "bytes":
        return tokenizer_lib.ByteTokenizer(num_unused=settings.num_unused), "bytes"
    if settings.kind == "sentencepiece":
        if corpus_texts is None:
            raise ConfigError("config: tokenizer.kind 'sentencepiece' with no tokenizer.path needs this task's "
                              "corpus to train on; set tokenizer.path to a sentencepiece .model")
        return (_trained_sentencepiece(settings.vocab_size, settings.num_unused, corpus_texts),
                "sentencepiece trained on the corpus")
    return _trained_wordpiece(settings.vocab_size, settings.num_unused, settings.lowercase), "trained on the corpus"


class TextTask(TaskBase):
    """What 'text_mlm' and 'seq2seq' share: tokenizer, encoder, `init_from`, and the workdir's tokenizer."""

    throughput_unit = "tokens"
    data_fields: tuple[str, ...] = ()
    samples_segmentations = False  # whether the task's training data honours tokenizer.sampling_alpha

    def __init__(self, config):
        super().__init__(config)
        self.tokenizer_settings = config_lib.read_dataclass(TokenizerSettings, config.tokenizer, "tokenizer")
        self.data_settings = config_lib.read_dataclass(data_lib.DataSettings, config.data, "data")
        self.init_from = config_lib.typed(config, "init_from", str)
        self.final_examples = config_lib.typed(config, "final_examples", int)
        if self.init_from and not os.path.isdir(self.init_from):
            raise ConfigError(f"config: 'init_from' {self.init_from!r} is not a directory; give a workdir of this "
                              "family, a Hugging Face checkpoint directory (config.json + model.safetensors), or ''")
        text_fields = tuple(f for f in self.data_fields if f != "label")
        self.tokenizer, self.tokenizer_source = resolve_tokenizer(
            self.tokenizer_settings, self.init_from, lambda: data_lib.training_texts(self.data_settings, text_fields))
        if self.tokenizer_settings.sampling_alpha > 0:
            if self.tokenizer.kind != "sentencepiece":
                raise ConfigError(f"config: 'tokenizer.sampling_alpha' > 0 samples sentencepiece segmentations; this "
                                  f"tokenizer is {self.tokenizer.kind!r} ({self.tokenizer_source}). Set it to 0")
            if not self.samples_segmentations:
                raise ConfigError(f"config: 'tokenizer.sampling_alpha' > 0 is read by task 'conditional_lm' only; "
                                  f"set it to 0 for task {config.task!r}")
        self.seq_len = self.data_settings.seq_len
        if self.seq_len < 8:
            raise ConfigError(f"config: 'data.seq_len' must be at least 8, got {self.seq_len}")
        self.model = modeling.text_model(config.model, vocab_size=self.tokenizer.vocab_size, seq_len=self.seq_len)
        self.compute_dtype = self.model.compute_dtype
        if self.init_from and _is_huggingface_dir(self.init_from) and self.model.architecture != "transformer":
            raise ConfigError(f"config: 'init_from' {self.init_from!r} is a Hugging Face checkpoint, which needs "
                              "model.architecture='transformer'")

    @property
    def units_per_batch(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def has_final_report(self) -> bool:
        return self.final_examples > 0

    @staticmethod
    def summarize_eval(sums):
        """Per predicted token: loss (nats), accuracy and perplexity (both tasks' eval_sums count tokens)."""
        loss = sums["nll"] / sums["count"]
        return {"loss": loss, "accuracy": sums["correct"] / sums["count"], "perplexity": math.exp(min(loss, 50.0))}

    # -- the workdir's tokenizer ------------------------------------------------------------------------

    def write_assets(self, workdir) -> None:
        target = pathlib.Path(workdir) / TOKENIZER_DIR
        if target.exists():
            self.read_assets(workdir)
            return
        tmp = pathlib.Path(workdir) / (TOKENIZER_DIR + ".tmp")
        tmp.mkdir(exist_ok=True)
        self.tokenizer.save(str(tmp))
        os.replace(tmp, target)  # a crash never leaves a half-written tokenizer under the final name

    def read_assets(self, workdir) -> None:
        target = pathlib.Path(workdir) / TOKENIZER_DIR
        if not target.exists():
            return  # written by the trainer at the start of the run: absent only before it started
        saved = tokenizer_lib.load_tokenizer(str(target))
        if saved.fingerprint != self.tokenizer.fingerprint:
            raise ConfigError(f"--workdir: {str(target)!r} is not the tokenizer this config builds "
                              f"({saved.vocab_size} vs {self.tokenizer.vocab_size} tokens; {self.tokenizer_source}); "
                              "the checkpoint's embeddings belong to the saved one")

    # -- parameters ---------------------------------------------------------------------------------------

    def encoder_inputs(self, batch_size: int):
        tokens = jnp.zeros((batch_size, self.seq_len), jnp.int32)
        return tokens, jnp.zeros_like(tokens)

    def init_params(self, rng, batch):
        tokens, segments = self.encoder_inputs(batch["tokens"].shape[0])
        return {"encoder": self.model.init(rng, tokens, segments)}

    def pretrained_params(self) -> dict[str, Any] | None:
        """The encoder's arrays from `init_from`; logs which parameters were restored and which initialised."""
        if not self.init_from:
            return None
        if _is_workdir(self.init_from):
            from train_lib import checkpointing

            run = checkpointing.restore_params(self.init_from)
            if "encoder" not in run.params:
                raise ConfigError(f"config: 'init_from' {self.init_from!r} holds {run.task.description}, not an "
                                  "encoder of the text family")
            source = {f"encoder/{k}": v for k, v in _flat(run.params["encoder"]).items()}
            what = f"workdir {self.init_from} step {run.step} ({'EMA' if run.ema else 'raw'} parameters)"
        else:
            from models import pretrained

            try:
                hf_model, params, report = pretrained.load_huggingface_with_report(self.init_from)
            except ValueError as error:
                raise ConfigError(f"config: 'init_from': {error}") from None
            _check_same_architecture(hf_model.config, self.model.config, self.init_from)
            fresh = set(report.initialised)  # the report's restored/unused lists name the checkpoint's keys
            source = {f"encoder/{k}": v for k, v in _flat(params).items() if k not in fresh}
            what = f"Hugging Face checkpoint {self.init_from}"
        from train_lib import state as state_lib

        abstract = jax.eval_shape(self.init_params, jax.random.PRNGKey(0), self.batch_spec(1))
        names = set(_flat(state_lib.unbox(abstract)))
        restored = sorted(name for name in source if name in names)
        initialised = sorted(names - set(restored))
        unused = sorted(set(source) - names)
        log.info("init_from %s: restored %d arrays, initialised %d (%s)%s", what, len(restored), len(initialised),
                 ", ".join(initialised) or "none",
                 f"; unused: {', '.join(unused)}" if unused else "")
        return {name: np.asarray(source[name]) for name in restored}


def _flat(tree) -> dict[str, Any]:
    from train_lib.state import path_name

    return {path_name(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


_ARCHITECTURE_FIELDS = ("hidden_size", "num_layers", "num_heads", "intermediate_size", "embedding_size",
                        "type_vocab_size", "max_positions", "position", "norm_position", "hidden_act", "use_bias",
                        "tie_embeddings", "layer_norm_eps", "vocab_size")


def _check_same_architecture(theirs, ours, path: str) -> None:
    differ = [f"model.{f}={getattr(theirs, f)!r} (config: {getattr(ours, f)!r})" for f in _ARCHITECTURE_FIELDS
              if getattr(theirs, f) != getattr(ours, f) and not (f == "max_positions" and ours.position == "rope")]
    if differ:
        raise ConfigError(f"config: 'init_from' {path!r} has a different architecture; set {', '.join(differ)}")


class MaskedLanguageModelTask(TextTask):
    """Masked-LM pretraining of the text encoder (BERT's 15% with 80/10/10; whole-word masking as an option)."""

    description = "a tokenized masked language model (an encoder, which cannot continue text)"
    commands = ("train_lib.text.evaluate",)
    MASK_RATE = 0.15

    def __init__(self, config):
        super().__init__(config)
        body = self.seq_len - 2
        self.num_masked = max(1, round(self.MASK_RATE * body))
        # Positions whose logits are computed: every masked token at the exact rate; whole words may mask a few
        # more than num_masked (all tokens of the last word drawn), of which up to 2× are predicted.
        self.num_predicted = min(body, 2 * self.num_masked if self.data_settings.whole_word_mask else self.num_masked)

    def batch_spec(self, batch_size):
        shape = (batch_size, self.seq_len)
        return {"tokens": jax.ShapeDtypeStruct(shape, jnp.int32), "word_starts": jax.ShapeDtypeStruct(shape, jnp.int32)}

    def mask_tokens(self, tokens, word_starts, rng):
        """(inputs, predicted positions `[b, m]`, whether each is a masked token `[b, m]`).

        One uniform draw per word (read at its first token); the words with the `num_masked` smallest draws
        are masked (exactly num_masked tokens when every word is one token); [CLS], [SEP], [PAD] never are.
        """
        tok = self.tokenizer
        noise_rng, choice_rng, random_rng = jax.random.split(rng, 3)
        special = (tokens == tok.cls_id) | (tokens == tok.sep_id) | (tokens == tok.pad_id)
        noise = jnp.take_along_axis(jax.random.uniform(noise_rng, tokens.shape), word_starts, axis=1)
        noise = jnp.where(special, 2.0, noise)
        threshold = jnp.sort(noise, axis=-1)[:, self.num_masked - 1:self.num_masked]
        masked = noise <= threshold
        choice = jax.random.uniform(choice_rng, tokens.shape)
        random_tokens = jax.random.randint(random_rng, tokens.shape, 0, tok.vocab_size)
        inputs = jnp.where(masked & (choice < 0.8), tok.mask_id,
                           jnp.where(masked & (choice < 0.9), random_tokens, tokens))
        order = jnp.argsort(jnp.where(masked, noise, 3.0), axis=-1)[:, :self.num_predicted]
        return inputs, order, jnp.take_along_axis(masked, order, axis=1)

    def _nll(self, params, batch, mask_rng, dropout_rng=None, *, train=False):
        tokens = batch["tokens"]
        inputs, positions, valid = self.mask_tokens(tokens, batch["word_starts"], mask_rng)
        logits = self.model.logits(params["encoder"], inputs, padding_mask=tokens != self.tokenizer.pad_id,
                                   train=train, rng=dropout_rng, positions=positions)
        targets = jnp.take_along_axis(tokens, positions, axis=1)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        correct = (jnp.argmax(logits, -1) == targets) & valid
        return jnp.where(valid, nll, 0.0), correct, valid

    def loss(self, params, batch, rng, *, train=True):
        mask_rng, dropout_rng = jax.random.split(rng)
        nll, correct, valid = self._nll(params, batch, mask_rng, dropout_rng, train=train)
        per_example = jnp.sum(nll, -1) / jnp.maximum(jnp.sum(valid, -1), 1)
        return jnp.mean(per_example), {"accuracy": jnp.sum(correct) / jnp.maximum(jnp.sum(valid), 1)}

    def eval_mask_key(self, tokens):
        """A key fixed by the batch's contents and the seed: every evaluation of a checkpoint masks the same way."""
        weights = jnp.arange(1, tokens.shape[1] + 1, dtype=jnp.uint32)
        digest = jnp.sum(tokens.astype(jnp.uint32) * weights, dtype=jnp.uint32)
        return jax.random.fold_in(jax.random.PRNGKey(self.seed), digest)

    def eval_sums(self, params, batch):
        nll, correct, valid = self._nll(params, batch, self.eval_mask_key(batch["tokens"]))
        return {"nll": jnp.sum(nll), "correct": jnp.sum(correct).astype(jnp.float32),
                "count": jnp.sum(valid).astype(jnp.float32)}

    def datasets(self, rows):
        windows = {}
        for split in ("train", "validation"):
            ids, offsets = data_lib.mlm_stream(self.data_settings, self.tokenizer, split)
            windows[split] = data_lib.MLMWindows(ids, offsets, self.seq_len, self.tokenizer)
        train, evaluation = data_lib.pipelines(windows["train"], windows["validation"], batch_size=self.batch_size,
                                               eval_batches=self.eval_batches, seed=self.seed, rows=rows,
                                               what=f"data.corpus={self.data_settings.corpus!r}")
        info = data_lib.corpus_info(self.data_settings)
        info.update({"tokenizer": f"{self.tokenizer.kind}, {self.tokenizer.vocab_size} tokens "
                                  f"({self.tokenizer_source})", "train_windows": len(windows["train"]),
                     "validation_windows": len(windows["validation"])})
        return train, evaluation, info

    def final_report(self, params) -> str:
        ids, offsets = data_lib.mlm_stream(self.data_settings, self.tokenizer, "validation")
        window = data_lib.MLMWindows(ids, offsets, self.seq_len, self.tokenizer)[0]
        tokens = jnp.asarray(window["tokens"][None])
        inputs, positions, valid = self.mask_tokens(tokens, jnp.asarray(window["word_starts"][None]),
                                                    jax.random.PRNGKey(self.seed))
        logits = self.model.logits(params["encoder"], inputs)
        filled = np.asarray(jnp.where(inputs == self.tokenizer.mask_id, jnp.argmax(logits, -1), inputs))[0]
        shown = np.where(np.asarray(inputs)[0] == self.tokenizer.mask_id, self.tokenizer.unk_id, np.asarray(inputs)[0])
        return (f"Masked input (masks shown as the unknown token):\n{self.tokenizer.decode(shown.tolist())}\n"
                f"The model's fill-in:\n{self.tokenizer.decode(filled.tolist())}")


def copy_prior_logits(logits, bag, log_scale, shift):
    """`(logits + exp(log_scale) ⊙ bag + shift) / 2`: the copy prior of https://kexue.fm/archives/5861.

    logits `[b, n, V]`; bag `[b, V]` (1 for tokens in the source); log_scale, shift `[V]`.
    """
    prior = bag * jnp.exp(log_scale) + shift
    return (logits + prior[:, None, :]) / 2


class Seq2SeqTask(TextTask):
    """UniLM seq2seq: one encoder, the UniLM mask, cross-entropy on the target tokens only."""

    description = "a UniLM seq2seq model"
    commands = ("train_lib.text.generate", "train_lib.text.evaluate")
    data_fields = ("source", "target")

    def __init__(self, config):
        super().__init__(config)
        self.copy_prior = config_lib.typed(config, "copy_prior", bool)
        if self.data_settings.corpus == "pretraining":
            raise ConfigError("config: task 'seq2seq' needs a corpus of (source, target) pairs: set data.corpus to "
                              "'definitions', 'docstrings' or 'jsonl'")
        max_target = self.data_settings.max_target_len
        if not 2 <= max_target <= self.seq_len - 4:
            raise ConfigError(f"config: 'data.max_target_len' must be in [2, data.seq_len − 4 = {self.seq_len - 4}], "
                              f"got {max_target}")

    def batch_spec(self, batch_size):
        shape = (batch_size, self.seq_len)
        return {name: jax.ShapeDtypeStruct(shape, jnp.int32) for name in ("tokens", "segment_ids", "padding_mask")}

    def init_params(self, rng, batch):
        params = super().init_params(rng, batch)
        if self.copy_prior:
            import flax.linen as nn

            vocab = self.tokenizer.vocab_size
            params["copy_prior"] = {name: nn.Partitioned(jnp.zeros((vocab,), jnp.float32), ("vocab",))
                                    for name in ("log_scale", "shift")}
        return params

    def source_bag(self, tokens, segment_ids):
        """`[b, V]`: 1 for every token id of the source (segment 0), special tokens excluded."""
        tok = self.tokenizer
        in_source = (segment_ids == 0) & (tokens != tok.pad_id) & (tokens != tok.cls_id) & (tokens != tok.sep_id)
        one_hot = jax.nn.one_hot(tokens, tok.vocab_size, dtype=jnp.float32) * in_source[..., None]
        return jnp.max(one_hot, axis=1)

    def target_positions(self, batch):
        """`[b, max_target_len]` positions whose logits predict the target tokens (position t predicts token t + 1:
        from the source's [SEP] on), and whether each predicts a real target token."""
        segments, valid = batch["segment_ids"], batch["padding_mask"] > 0
        n = segments.shape[1]
        first = jnp.argmax(segments == 1, axis=1)  # the target's first token
        positions = jnp.minimum(first[:, None] - 1 + jnp.arange(self.data_settings.max_target_len), n - 2)
        following = positions + 1
        weights = (jnp.take_along_axis(segments, following, 1) == 1) & jnp.take_along_axis(valid, following, 1)
        distinct = jnp.arange(positions.shape[1]) <= (n - 2 - first[:, None] + 1)  # positions clipped at n − 2 repeat
        return positions, weights & distinct

    def _logits(self, params, batch, rng=None, *, train=False, positions=None):
        """Logits `[b, n, V]`, or `[b, m, V]` at `positions` `[b, m]` (the Transformer computes only those)."""
        tokens, segments = batch["tokens"], batch["segment_ids"]
        mask = masks_lib.mask_from_tokens("unilm", segment_ids=segments, padding_mask=batch["padding_mask"] > 0)
        logits = self.model.logits(params["encoder"], tokens, segment_ids=segments, attention_mask=mask, train=train,
                                   rng=rng, positions=positions)
        if self.copy_prior:
            prior = params["copy_prior"]
            logits = copy_prior_logits(logits, self.source_bag(tokens, segments), prior["log_scale"], prior["shift"])
        return logits

    def _target_nll(self, params, batch, rng=None, *, train=False):
        positions, weights = self.target_positions(batch)
        logits = self._logits(params, batch, rng, train=train, positions=positions)
        targets = jnp.take_along_axis(batch["tokens"], positions + 1, axis=1)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        correct = (jnp.argmax(logits, -1) == targets) & weights
        return jnp.where(weights, nll, 0.0), correct, weights

    def loss(self, params, batch, rng, *, train=True):
        nll, correct, weights = self._target_nll(params, batch, rng, train=train)
        per_example = jnp.sum(nll, -1) / jnp.maximum(jnp.sum(weights, -1), 1)
        return jnp.mean(per_example), {"accuracy": jnp.sum(correct) / jnp.maximum(jnp.sum(weights), 1)}

    def eval_sums(self, params, batch):
        nll, correct, weights = self._target_nll(params, batch)
        return {"nll": jnp.sum(nll), "correct": jnp.sum(correct).astype(jnp.float32),
                "count": jnp.sum(weights).astype(jnp.float32)}

    def records(self, split: str) -> list[dict[str, str]]:
        return data_lib.load_records(self.data_settings, split, self.data_fields)

    def datasets(self, rows):
        encode = lambda split: data_lib.Seq2SeqExamples(  # noqa: E731
            self.records(split), self.tokenizer, seq_len=self.seq_len, max_target_len=self.data_settings.max_target_len)
        train_examples, eval_examples = encode("train"), encode("validation")
        train, evaluation = data_lib.pipelines(train_examples, eval_examples, batch_size=self.batch_size,
                                               eval_batches=self.eval_batches, seed=self.seed, rows=rows,
                                               what=f"data.corpus={self.data_settings.corpus!r}")
        info = data_lib.corpus_info(self.data_settings)
        info.update({"tokenizer": f"{self.tokenizer.kind}, {self.tokenizer.vocab_size} tokens "
                                  f"({self.tokenizer_source})", "train_pairs": len(train_examples),
                     "validation_pairs": len(eval_examples)})
        return train, evaluation, info

    # -- decoding -----------------------------------------------------------------------------------------

    def cached_lm(self):
        """The decoding adaptor: the encoder's KV cache, and (with the copy prior) the source bag kept beside it."""
        inner = self.model.cached_lm()
        if not self.copy_prior:
            return inner
        from train_lib.text import decoding

        vocab = self.tokenizer.vocab_size

        def init_cache(batch, max_length):
            return {"model": inner.init_cache(batch, max_length), "bag": jnp.zeros((batch, vocab), jnp.float32)}

        def apply(params, cache, tokens, *, segment_ids, position_ids, attention_mask):
            logits, model_cache = inner.apply(params["encoder"] if "encoder" in params else params, cache["model"],
                                              tokens, segment_ids=segment_ids, position_ids=position_ids,
                                              attention_mask=attention_mask)
            bag = jnp.maximum(cache["bag"], self.source_bag(tokens, segment_ids))  # segment-0 tokens: the prefix
            prior = params["copy_prior"]
            return copy_prior_logits(logits, bag, prior["log_scale"], prior["shift"]), {"model": model_cache,
                                                                                          "bag": bag}

        return decoding.CachedLM(init_cache=init_cache, apply=apply)

    def decode(self, params, sources: list[str], *, beam_size: int = 1, batch_size: int = 64,
               max_new_tokens: int | None = None, **sampling) -> list[str]:
        """The decoded target of each source: greedy (beam_size 1), beam search, or sampling (`temperature=`...)."""
        from train_lib.text import decoding

        if beam_size < 1:
            raise ConfigError(f"--beam_size must be at least 1, got {beam_size}")
        tok = self.tokenizer
        max_new = max_new_tokens or self.data_settings.max_target_len
        if getattr(self, "_decoding_lm", None) is None:  # one adaptor per task: jit caches on its identity
            self._decoding_lm = self.cached_lm()
        lm = self._decoding_lm
        model_params = params if self.copy_prior else params["encoder"]
        outputs = []
        for start in range(0, len(sources), batch_size):
            chunk = sources[start:start + batch_size]
            prefixes = []
            for source in chunk:
                tokens, segments, valid = data_lib.encode_seq2seq(tok, source, None, seq_len=self.seq_len,
                                                                  max_target_len=max_new)
                prefixes.append(tokens[valid].tolist())
            prefix, prefix_valid = decoding.left_pad(prefixes, tok.pad_id)
            args = (lm, model_params, prefix, prefix_valid, jnp.zeros_like(prefix))
            common = dict(mask_kind="unilm", target_segment=1, max_new_tokens=max_new, end_id=tok.sep_id)
            if sampling:
                result = decoding.sample(*args, **common, **sampling)
            elif beam_size == 1:
                result = decoding.greedy(*args, **common)
            else:
                result = decoding.beam_search(*args, **common, beam_size=beam_size)
            tokens, lengths = np.asarray(result.tokens), np.asarray(result.lengths)
            for row, length in zip(tokens, lengths):
                ids = [int(t) for t in row[:length] if t != tok.sep_id]
                outputs.append(tok.decode(ids))
        return outputs

    def final_report(self, params) -> str:
        records = self.records("validation")[:self.final_examples]
        predictions = self.decode(params, [r["source"] for r in records])
        lines = [f"{r['source'][:60]} → {p!r} (target {r['target']!r})" for r, p in zip(records, predictions)]
        return "Greedy decoding of validation sources:\n" + "\n".join(lines)

    def benchmark_extras(self, params, *, peak_flops, repeats, sample_steps, sample_batch):
        """Decoding speed (`train_lib.text.decoding.benchmark_decoding`): one cached step of 16 new tokens after
        a prefix of 16 (cache 32) and of 240 (cache 256) tokens, and beam-4 sequences/s (none if sample_steps is 0)."""
        del peak_flops
        if sample_steps <= 0:
            return {}
        from train_lib.text import decoding

        model_params = params if self.copy_prior else params["encoder"]
        longest = self.model.max_positions
        lengths = tuple(n for n in (32, 256) if longest is None or n <= longest)
        return decoding.benchmark_decoding(self.cached_lm(), model_params, vocab_size=self.tokenizer.vocab_size,
                                           cache_lengths=lengths, batch_size=min(sample_batch, 8), steps=16,
                                           repeats=max(3, min(repeats, 5)))

    def benchmark_rows(self, result):
        rows = [(f"decode step, cache {key.rsplit('_', 1)[1]}", f"{value:.3f} ms")
                for key, value in result.items() if key.startswith("decode_step_ms_cache_")]
        rows += [(key.replace("_sequences_per_s", " search"), f"{value:,.0f} sequences/s")
                 for key, value in result.items() if key.endswith("_sequences_per_s")]
        return rows
