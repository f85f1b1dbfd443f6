"""Task 'conditional_lm': class-conditional text generation from a pretrained encoder (post 7124).

The encoder (RoFormer/BERT or GAU-α, `model.architecture`; from `init_from`, e.g. the masked-LM char model)
becomes a left-to-right language model under the causal mask, `[CLS] text [SEP]` with a cross-entropy on the text
tokens and the final [SEP]. The class label (`conditional.labels`, the corpus' 'label' field) enters one of three ways (`conditional.condition`):

- 'cln': Conditional Layer Normalization (Su, "基于Conditional Layer Normalization的条件文本生成",
  https://kexue.fm/archives/7124): a learned label embedding `[C, condition_size]` shifts every norm's γ and β
  (the Transformer's LayerNorms, GAU-α's RMS norms) through zero-initialised projections
  (`models.layers.ConditionalShift`), so at initialisation the model is exactly the pretrained one.
- 'prefix': the label as a token after [CLS] ([unused1] for class 0, [unused2] for class 1, ...), the usual way.
- 'none': no label (an unconditional LM: the baseline that any label-awareness must beat).

Eval metrics: per-token loss and perplexity over the text tokens, also per class (`perplexity_<label>`).
`sample(params, label, n)` draws n texts of class `label` (top-p sampling with the KV cache).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from models import gau as gau_lib
from models import masks as masks_lib
from models import transformer as transformer_lib
from train_lib import config_lib
from train_lib.config_lib import ConfigError
from train_lib.text import data as data_lib
from train_lib.text import modeling
from train_lib.text.task import TextTask

CONDITIONS = ("cln", "prefix", "none")


@dataclasses.dataclass(frozen=True)
class ConditionalSettings:
    """The `conditional.*` block."""

    condition: str = "cln"
    labels: tuple[str, ...] = ("negative", "positive")
    condition_size: int = 128  # 'cln': width of the label embedding


class ConditionalLMTask(TextTask):
    """A causal LM over (text, label) records, conditioned on the label by CLN, a prefix token or not at all."""

    description = "a class-conditional language model"
    commands = ("train_lib.text.evaluate", "train_lib.text.continuation")
    data_fields = ("text", "label")
    samples_segmentations = True

    def __init__(self, config):
        super().__init__(config)
        values = config_lib.dataclass_values(ConditionalSettings, config.conditional)
        values["labels"] = tuple(values.get("labels", ConditionalSettings.labels))
        self.settings = s = ConditionalSettings(**values)
        if s.condition not in CONDITIONS:
            raise ConfigError(f"config: 'conditional.condition' is {s.condition!r}; expected one of {list(CONDITIONS)}")
        if len(s.labels) < 2 or len(set(s.labels)) != len(s.labels):
            raise ConfigError(f"config: 'conditional.labels' must name at least two distinct classes, got {s.labels!r}")
        if s.condition == "cln" and s.condition_size <= 0:
            raise ConfigError(f"config: 'conditional.condition_size' must be positive for 'cln', got {s.condition_size}")
        if self.data_settings.corpus == "pretraining":
            raise ConfigError("config: task 'conditional_lm' needs (text, label) records: set data.corpus to "
                              "'reviews' or 'jsonl'")
        if self.model.architecture == "transformer" and self.model.config.condition_size:
            raise ConfigError("config: model.condition_size is set by conditional.condition_size; remove it")
        self.num_classes = len(s.labels)
        self.label_tokens = ()
        if s.condition == "prefix":
            unused = self.tokenizer.unused_ids()
            if len(unused) < self.num_classes:
                raise ConfigError(f"config: conditional.condition 'prefix' needs one [unused] token per class "
                                  f"({self.num_classes}); the vocabulary has {len(unused)}")
            self.label_tokens = tuple(unused[:self.num_classes])
        if s.condition == "cln":
            cfg = dataclasses.replace(self.model.config, condition_size=s.condition_size)
            module = (transformer_lib.TransformerEncoder(cfg) if self.model.architecture == "transformer"
                      else gau_lib.GAULanguageModel(cfg))
            self.model = modeling.TextModel(self.model.architecture, cfg, module)
        self.start = 2 if s.condition == "prefix" else 1  # the first predicted token's position
        self._lms = {}

    # -- data ---------------------------------------------------------------------------------------------

    def encode(self, text: str, label: int, segmentation_rng=None) -> dict[str, np.ndarray]:
        """One example; with `segmentation_rng` (a NumPy generator) the text's segmentation is drawn with
        `tokenizer.sampling_alpha` instead of the most likely one."""
        tok = self.tokenizer
        head = [tok.cls_id] + ([self.label_tokens[label]] if self.label_tokens else [])
        body = (tok.encode(text) if segmentation_rng is None else
                tok.sample_encode(text, alpha=self.tokenizer_settings.sampling_alpha, rng=segmentation_rng))
        ids = (head + body)[:self.seq_len - 1] + [tok.sep_id]
        tokens = np.full(self.seq_len, tok.pad_id, np.int32)
        tokens[:len(ids)] = ids
        return {"tokens": tokens, "padding_mask": (np.arange(self.seq_len) < len(ids)).astype(np.int32),
                "label": np.int32(label)}

    def records(self, split):
        records = data_lib.load_records(self.data_settings, split, ("text", "label"))
        unknown = sorted({r["label"] for r in records} - set(self.settings.labels))
        if unknown:
            raise ConfigError(f"config: 'conditional.labels' {list(self.settings.labels)} lacks the corpus' labels "
                              f"{unknown[:5]}")
        return records

    def batch_spec(self, batch_size):
        shape = (batch_size, self.seq_len)
        return {"tokens": jax.ShapeDtypeStruct(shape, jnp.int32), "padding_mask": jax.ShapeDtypeStruct(shape, jnp.int32),
                "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}

    def datasets(self, rows):
        index = {label: i for i, label in enumerate(self.settings.labels)}
        splits = {}
        for split in ("train", "validation"):
            records = self.records(split)
            if split == "validation":  # in a fixed random order: the first eval batches hold every class
                records = [records[i] for i in np.random.default_rng(0).permutation(len(records))]
            splits[split] = _Encoded(records, self, index)
        train_map = None
        if self.tokenizer_settings.sampling_alpha > 0:  # a fresh segmentation per example and epoch
            train_map = functools.partial(_sampled, splits["train"], self.seed)
            splits["train"] = range(len(splits["train"]))
        train, evaluation = data_lib.pipelines(splits["train"], splits["validation"], batch_size=self.batch_size,
                                               eval_batches=self.eval_batches, seed=self.seed, rows=rows,
                                               what=f"data.corpus={self.data_settings.corpus!r}", train_map=train_map)
        info = data_lib.corpus_info(self.data_settings)
        info.update({"condition": self.settings.condition, "train_records": len(splits["train"])})
        if train_map is not None:
            info["sampling_alpha"] = self.tokenizer_settings.sampling_alpha
        return train, evaluation, info

    # -- parameters and losses ----------------------------------------------------------------------------

    def init_params(self, rng, batch):
        model_rng, label_rng = jax.random.split(rng)
        b = batch["tokens"].shape[0]
        tokens = jnp.zeros((b, self.seq_len), jnp.int32)
        params = {}
        condition = None
        if self.settings.condition == "cln":
            init = nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), (None, None))
            params["condition_embedding"] = init(label_rng, (self.num_classes, self.settings.condition_size))
            condition = jnp.zeros((b, self.settings.condition_size))
        params["encoder"] = self.model.init(model_rng, tokens, jnp.zeros_like(tokens), condition)
        return params

    def condition(self, params, labels):
        return params["condition_embedding"][labels] if self.settings.condition == "cln" else None

    def _token_nll(self, params, batch, rng=None, *, train=False):
        """(nll `[b, n-1]`, weights): position t predicts token t + 1, for the text tokens and the final [SEP]."""
        tokens, valid = batch["tokens"], batch["padding_mask"] > 0
        mask = masks_lib.mask_from_tokens("causal", padding_mask=valid)
        logits = self.model.logits(params["encoder"], tokens, attention_mask=mask, train=train, rng=rng,
                                   condition=self.condition(params, batch["label"]))
        targets = tokens[:, 1:]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], targets)
        weights = valid[:, 1:] & (jnp.arange(1, tokens.shape[1]) >= self.start)[None]
        return jnp.where(weights, nll, 0.0), weights

    def loss(self, params, batch, rng, *, train=True):
        nll, weights = self._token_nll(params, batch, rng, train=train)
        per_example = jnp.sum(nll, -1) / jnp.maximum(jnp.sum(weights, -1), 1)
        return jnp.mean(per_example), {"tokens_per_example": jnp.mean(jnp.sum(weights, -1).astype(jnp.float32))}

    def eval_sums(self, params, batch):
        nll, weights = self._token_nll(params, batch)
        sums = {"nll": jnp.sum(nll), "count": jnp.sum(weights).astype(jnp.float32)}
        for c in range(self.num_classes):
            of_class = (batch["label"] == c)[:, None]
            sums[f"nll_{c}"] = jnp.sum(jnp.where(of_class, nll, 0.0))
            sums[f"count_{c}"] = jnp.sum(weights & of_class).astype(jnp.float32)
        return sums

    def summarize_eval(self, sums):
        """Per-token loss (nats) and perplexity of the text tokens, overall and per class."""
        loss = sums["nll"] / sums["count"]
        out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
        for c, label in enumerate(self.settings.labels):
            if sums[f"count_{c}"]:
                out[f"perplexity_{label}"] = math.exp(min(sums[f"nll_{c}"] / sums[f"count_{c}"], 50.0))
        return out

    def split_metrics(self, params, split: str, *, batch_size: int = 64) -> dict[str, float]:
        """`summarize_eval` over every record of `split` (whole batches; the remainder is left out)."""
        index = {label: i for i, label in enumerate(self.settings.labels)}
        examples = _Encoded(self.records(split), self, index)
        fn = jax.jit(self.eval_sums)
        sums = None
        for start in range(0, len(examples) - batch_size + 1, batch_size):
            rows = [examples[i] for i in range(start, start + batch_size)]
            got = jax.device_get(fn(params, {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}))
            sums = got if sums is None else {k: sums[k] + got[k] for k in sums}
        return self.summarize_eval({k: float(v) for k, v in sums.items()})

    # -- sampling -----------------------------------------------------------------------------------------

    def cached_lm(self, label: int):
        """The decoding adaptor for class `label` (one per class: the label is part of the compiled program)."""
        if label not in self._lms:
            from train_lib.text import decoding

            inner = self.model.cached_lm()

            def apply(params, cache, tokens, *, segment_ids, position_ids, attention_mask):
                condition = None
                if self.settings.condition == "cln":
                    condition = jnp.broadcast_to(params["condition_embedding"][label],
                                                 (tokens.shape[0], self.settings.condition_size))
                return inner.apply(params["encoder"], cache, tokens, segment_ids=segment_ids,
                                   position_ids=position_ids, attention_mask=attention_mask, condition=condition)

            self._lms[label] = decoding.CachedLM(init_cache=inner.init_cache, apply=apply)
        return self._lms[label]

    def sample(self, params, label: int, num: int, *, rng, max_new_tokens: int | None = None, top_p: float = 0.9,
               temperature: float = 1.0, batch_size: int = 100) -> list[str]:
        """`num` texts of class `label`: top-p samples after `[CLS]` (and the label token for 'prefix')."""
        from train_lib.text import decoding

        tok = self.tokenizer
        head = [tok.cls_id] + ([self.label_tokens[label]] if self.label_tokens else [])
        max_new = max_new_tokens or self.seq_len - len(head)
        texts = []
        for start in range(0, num, batch_size):
            rows = min(batch_size, num - start)
            prefix = jnp.asarray(np.tile(head, (rows, 1)), jnp.int32)
            result = decoding.sample(self.cached_lm(label), params, prefix, jnp.ones_like(prefix, bool),
                                     jnp.zeros_like(prefix), rng=jax.random.fold_in(rng, start), mask_kind="causal",
                                     target_segment=0, max_new_tokens=max_new, end_id=tok.sep_id, top_p=top_p,
                                     temperature=temperature)
            for row, length in zip(np.asarray(result.tokens), np.asarray(result.lengths)):
                texts.append(tok.decode([int(t) for t in row[:length] if t != tok.sep_id]))
        return texts


class _Encoded:
    def __init__(self, records, task: ConditionalLMTask, index: dict[str, int]):
        self._records, self._task, self._index = records, task, index

    def __len__(self):
        return len(self._records)

    def __getitem__(self, i):
        return self.example(i)

    def example(self, i, segmentation_rng=None):
        record = self._records[i]
        return self._task.encode(record["text"], self._index[record["label"]], segmentation_rng)


def _sampled(examples: _Encoded, seed: int, index: int, record: int):
    """Training example `index` of the endless stream (record `record`), its segmentation drawn from (seed, index):
    every epoch differs, and a resumed run draws the same."""
    return examples.example(int(record), np.random.default_rng([seed, int(index)]))
