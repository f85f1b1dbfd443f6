"""Tasks: what the generic trainer trains. A task is chosen by `config.task` from `TASKS`.

The contract between `train_lib.trainer` and a task (everything the loop needs, nothing more):

  task = TASKS[config.task](config)
  task.model                                   # a linen module
  task.batch_spec(batch_size)                  # {name: jax.ShapeDtypeStruct} of one global batch
  task.init_params(rng, batch)                 # boxed (logically annotated) params
  task.loss(params, batch, rng, train=True)    # (scalar loss, {name: scalar}) — mean over the batch
  task.eval_sums(params, batch)                # {name: scalar sum}, incl. 'count'; summed over batches
  task.summarize_eval(sums)                    # {metric: value} from the summed batches
  task.datasets(rows)                          # (train IterDataset, eval MapDataset, info dict)
  task.throughput_unit, task.units_per_batch   # e.g. ('tokens', batch × length)
  task.final_report(params)                    # text printed at the end of a run (e.g. a sample)

Losses are means over the examples of the batch, so gradient accumulation over equal microbatches
averages to the large-batch gradient.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from models.attention import NORMALIZERS
from models.gau import GAUConfig, GAULanguageModel
from models.layers import NORMS
from train_lib import data as data_lib
from train_lib.config_lib import ConfigError


def _check_choice(key: str, value: str, choices) -> None:
    if value not in choices:
        raise ConfigError(f"config: '{key}' is {value!r}; expected one of {sorted(choices)}")


class LanguageModelTask:
    """Byte-level causal language modelling with the GAU LM."""

    throughput_unit = "tokens"

    def __init__(self, config):
        self.config = config
        model_cfg = dict(config.model)
        _check_choice("model.normalizer", model_cfg["normalizer"], NORMALIZERS)
        _check_choice("model.norm", model_cfg["norm"], NORMS)
        _check_choice("model.dtype", model_cfg["dtype"], ("float32", "bfloat16", "float16"))
        model_cfg.setdefault("train_length", config.data.seq_len)
        self.model_config = GAUConfig.from_dict(model_cfg)
        self.model = GAULanguageModel(self.model_config)
        self.seq_len = config.data.seq_len
        self.units_per_batch = config.batch_size * self.seq_len

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        return {"tokens": jax.ShapeDtypeStruct((batch_size, self.seq_len + 1), jnp.int32)}

    def init_params(self, rng: jax.Array, batch: dict[str, jax.Array]) -> Any:
        return self.model.init({"params": rng}, batch["tokens"][:, :-1])["params"]

    def _logits(self, params, batch, rng=None, *, train=False):
        rngs = {"dropout": rng} if train and rng is not None else {}
        return self.model.apply({"params": params}, batch["tokens"][:, :-1], train=train, rngs=rngs)

    def loss(self, params, batch, rng, *, train: bool = True):
        logits = self._logits(params, batch, rng, train=train)
        targets = batch["tokens"][:, 1:]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == targets)
        return jnp.mean(nll), {"accuracy": accuracy}

    def eval_sums(self, params, batch):
        logits = self._logits(params, batch)
        targets = batch["tokens"][:, 1:]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return {"nll": jnp.sum(nll), "correct": jnp.sum(jnp.argmax(logits, -1) == targets).astype(jnp.float32),
                "count": jnp.asarray(targets.size, jnp.float32)}

    @staticmethod
    def summarize_eval(sums: dict[str, float]) -> dict[str, float]:
        loss = sums["nll"] / sums["count"]
        return {"loss": loss, "accuracy": sums["correct"] / sums["count"], "bits_per_byte": loss / math.log(2)}

    def datasets(self, rows: tuple[int, int]):
        train, evaluation, text = data_lib.language_model_datasets(self.config, rows=rows)
        return train, evaluation, {"data": text.description, "data_fingerprint": text.fingerprint,
                                   "train_bytes": int(text.train.size), "validation_bytes": int(text.validation.size)}

    def final_report(self, params) -> str:
        num_tokens = self.config.final_sample_tokens
        if num_tokens <= 0:
            return ""
        from train_lib import generate  # local import: generation is only needed at the end of a run
        sample = generate.sample_text(self.model, params, prompt="def ", max_new_tokens=num_tokens,
                                      rng=jax.random.PRNGKey(self.config.seed), temperature=0.8, top_k=40)
        return "Sample (prompt 'def ', temperature 0.8, top-k 40):\n" + sample


TASKS = {"lm": LanguageModelTask}


def get_task(config):
    _check_choice("task", config.task, TASKS)
    return TASKS[config.task](config)

