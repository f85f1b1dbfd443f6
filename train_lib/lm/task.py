"""The byte-level language-model family: 'lm' (causal LM) and 'mlm' (masked LM on a bidirectional encoder).

Both train any layer of `models.gau.ATTENTION_LAYERS` chosen by `model.attention` (GAU, FLASH, the
Performer) on byte windows of the embedded corpus or a local text (`train_lib.lm.data`), and implement
`train_lib.task.Task`: the loss is the mean next-byte (or masked-byte) cross-entropy per example.

Workdirs of 'lm' are read by `python -m train_lib.lm.generate` and `python -m train_lib.lm.evaluate`;
those of 'mlm' by the evaluation CLI.
"""
from __future__ import annotations

import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import optax

from models.attention import NORMALIZERS
from models.gated_unit import ATTENTION_IMPLS, NORM_POSITIONS
from models.gau import ATTENTION_LAYERS, GAUConfig, GAULanguageModel, attention_implementation
from models.layers import KERNEL_INITS, NORMS, SCALE_INITS
from models.positions import MAX_LENGTH, POSITIONS
from train_lib import config_lib
from train_lib.config_lib import ConfigError
from train_lib.lm import data as data_lib
from train_lib.lm import flops as lm_flops
from train_lib.task import TaskBase


def _check_choice(key: str, value: str, choices) -> None:
    if value not in choices:
        raise ConfigError(f"config: '{key}' is {value!r}; expected one of {sorted(choices)}")


def model_config(config) -> GAUConfig:
    """The `GAUConfig` of `config.model`, validated; keys an older config lacks take GAUConfig's defaults.

    Only GAUConfig's fields are read, so a `model.*` key that is not one of them is left unread (and the
    trainer refuses it). `train_length` defaults to `data.seq_len`.
    """
    values = config_lib.dataclass_values(GAUConfig, config.model)
    values.setdefault("train_length", config.data.seq_len)
    cfg = GAUConfig(**values)
    for key, choices in (("normalizer", NORMALIZERS), ("norm", NORMS), ("dtype", ("float32", "bfloat16", "float16")),
                         ("attention", ATTENTION_LAYERS), ("position", POSITIONS), ("norm_position", NORM_POSITIONS),
                         ("kernel_init", KERNEL_INITS), ("qk_scale_init", SCALE_INITS),
                         ("attention_impl", ATTENTION_IMPLS)):
        _check_choice(f"model.{key}", getattr(cfg, key), choices)
    if cfg.attention_impl == "pallas" and cfg.attention == "gau":
        try:
            attention_implementation(cfg)
        except ValueError as error:
            raise ConfigError(f"config: {error}") from None
    if cfg.chunk_size <= 0 or cfg.max_positions <= 0 or cfg.performer_features <= 0:
        raise ConfigError("config: 'model.chunk_size', 'model.max_positions' and 'model.performer_features' must be "
                          f"positive, got {cfg.chunk_size}, {cfg.max_positions}, {cfg.performer_features}")
    if cfg.residual_scores and cfg.attention != "gau":
        raise ConfigError(f"config: 'model.residual_scores' (RealFormer) needs model.attention='gau', got "
                          f"{cfg.attention!r}; FLASH and Performer have no full score matrix to pass on")
    if cfg.scan_layers and (cfg.residual_scores or cfg.attention == "performer"):
        raise ConfigError("config: 'model.scan_layers' needs model.residual_scores=False and model.attention "
                          f"'gau' or 'flash', got residual_scores={cfg.residual_scores}, attention="
                          f"{cfg.attention!r}: the scanned layers share one body whose only carry is the "
                          "activations (no scores pass between layers) and one name (the Performer draws its "
                          "fixed random features per layer name)")
    if cfg.position == "rope" and cfg.key_dim % 2:
        raise ConfigError(f"config: 'model.key_dim' must be even for rotary positions, got {cfg.key_dim}")
    longest = MAX_LENGTH[cfg.position](cfg.max_positions)
    if longest is not None and config.data.seq_len > longest:
        raise ConfigError(f"config: 'data.seq_len' {config.data.seq_len} exceeds the {longest} positions that "
                          f"model.position={cfg.position!r} covers with model.max_positions={cfg.max_positions}")
    return cfg


class LanguageModelTask(TaskBase):
    """Byte-level causal language modelling with the GAU LM."""

    description = "a byte-level causal language model"
    commands = ("train_lib.lm.generate", "train_lib.lm.evaluate")
    throughput_unit = "tokens"

    def __init__(self, config):
        super().__init__(config)
        self.model_config = model_config(config)
        self.model = GAULanguageModel(self.model_config)
        self.compute_dtype = self.model_config.dtype
        self.seq_len = config.data.seq_len
        self.data_path = config.data.path
        self.final_sample_tokens = config.final_sample_tokens
        if self.final_sample_tokens < 0:
            raise ConfigError(f"config: 'final_sample_tokens' must be non-negative (0: no sample), got "
                              f"{self.final_sample_tokens}")
        if self.data_path and not os.path.exists(self.data_path):
            raise ConfigError(f"config: 'data.path' {self.data_path!r} does not exist; give a text file, a "
                              "directory of text files, or '' for the embedded corpus")

    @property
    def units_per_batch(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def has_final_report(self) -> bool:
        return self.final_sample_tokens > 0

    @property
    def longest_sequence(self) -> int | None:
        """The most positions the model's position encoding covers (None: any number)."""
        return MAX_LENGTH[self.model_config.position](self.model_config.max_positions)

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        return {"tokens": jax.ShapeDtypeStruct((batch_size, self.seq_len + 1), jnp.int32)}

    def model_flops_per_step(self) -> float:
        """Model FLOPs of one training step on a global batch (`lm_forward_flops_per_token`, ×3): the closed
        form, which the tests check against TaskBase's count from the loss's jaxpr."""
        return 3.0 * lm_flops.lm_forward_flops_per_token(self.model_config, self.seq_len) * self.units_per_batch

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
        train, evaluation, text = data_lib.language_model_datasets(
            self.data_path, seq_len=self.seq_len, batch_size=self.batch_size, eval_batches=self.eval_batches,
            seed=self.seed, rows=rows)
        return train, evaluation, {"data": text.description, "data_fingerprint": text.fingerprint,
                                   "train_bytes": int(text.train.size), "validation_bytes": int(text.validation.size)}

    def benchmark_extras(self, params, *, peak_flops, repeats, sample_steps, sample_batch):
        del params, peak_flops, repeats, sample_steps, sample_batch
        return {"seq_len": self.seq_len}

    def final_report(self, params) -> str:
        num_tokens = self.final_sample_tokens
        if num_tokens <= 0:
            return ""
        if not getattr(ATTENTION_LAYERS[self.model_config.attention], "supports_decoding", True):
            return f"(no sample: model.attention={self.model_config.attention!r} has no decoding state)"
        from train_lib.lm import decoding  # local import: generation is only needed at the end of a run
        sample = decoding.sample_text(self.model, params, prompt="def ", max_new_tokens=num_tokens,
                                      rng=jax.random.PRNGKey(self.seed), temperature=0.8, top_k=40)
        return "Sample (prompt 'def ', temperature 0.8, top-k 40):\n" + sample


class MaskedLanguageModelTask(LanguageModelTask):
    """Byte-level masked language modelling with a bidirectional encoder (BERT's objective, GAU-α's task).

    On the same byte windows as 'lm' (the first `seq_len` bytes of each), exactly
    `max(1, round(0.15 · n))` positions per example are replaced by the token `MASK_TOKEN` = 256 (so
    `model.vocab_size` must be at least 257) and predicted. The loss is the cross-entropy on masked
    positions, averaged per example, then over the batch; eval reports loss, accuracy and bits per byte
    on masked positions. Training draws the masks from the step's key; evaluation from a key fixed by
    each batch's contents, so every evaluation of a checkpoint sees the same masks.
    """

    description = "a byte-level masked language model (a bidirectional encoder, which cannot continue text)"
    commands = ("train_lib.lm.evaluate",)
    MASK_TOKEN = 256
    MASK_RATE = 0.15

    def __init__(self, config):
        super().__init__(config)
        if self.model_config.causal:
            raise ConfigError("config: task 'mlm' needs a bidirectional encoder; set model.causal=False")
        if self.model_config.vocab_size <= self.MASK_TOKEN:
            raise ConfigError(f"config: task 'mlm' needs model.vocab_size ≥ {self.MASK_TOKEN + 1} (256 bytes and "
                              f"the mask token), got {self.model_config.vocab_size}")

    def num_masked(self, length: int) -> int:
        return max(1, round(self.MASK_RATE * length))

    def mask_tokens(self, tokens: jax.Array, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(inputs with masked bytes replaced by MASK_TOKEN, the boolean mask), both `[batch, n]`.

        The masked positions of each row are the `num_masked(n)` smallest of n uniform draws.
        """
        k = self.num_masked(tokens.shape[1])
        noise = jax.random.uniform(rng, tokens.shape)
        threshold = jnp.sort(noise, axis=-1)[:, k - 1:k]
        masked = noise <= threshold
        return jnp.where(masked, self.MASK_TOKEN, tokens), masked

    def _masked_nll(self, params, tokens, rng, dropout_rng=None, *, train=False):
        inputs, masked = self.mask_tokens(tokens, rng)
        rngs = {"dropout": dropout_rng} if train and dropout_rng is not None else {}
        logits = self.model.apply({"params": params}, inputs, train=train, rngs=rngs)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)
        correct = (jnp.argmax(logits, -1) == tokens) & masked
        return jnp.where(masked, nll, 0.0), correct, masked

    def loss(self, params, batch, rng, *, train: bool = True):
        mask_rng, dropout_rng = jax.random.split(rng)
        nll, correct, masked = self._masked_nll(params, batch["tokens"][:, :-1], mask_rng, dropout_rng, train=train)
        per_example = jnp.sum(nll, axis=-1) / jnp.sum(masked, axis=-1)
        return jnp.mean(per_example), {"accuracy": jnp.sum(correct) / jnp.sum(masked)}

    def eval_mask_key(self, tokens: jax.Array) -> jax.Array:
        """A key that depends only on the batch's contents (and the seed): evaluation is repeatable."""
        weights = jnp.arange(1, tokens.shape[1] + 1, dtype=jnp.uint32)
        digest = jnp.sum(tokens.astype(jnp.uint32) * weights, dtype=jnp.uint32)
        return jax.random.fold_in(jax.random.PRNGKey(self.seed), digest)

    def eval_sums(self, params, batch):
        tokens = batch["tokens"][:, :-1]
        nll, correct, masked = self._masked_nll(params, tokens, self.eval_mask_key(tokens))
        return {"nll": jnp.sum(nll), "correct": jnp.sum(correct).astype(jnp.float32),
                "count": jnp.sum(masked).astype(jnp.float32)}

    def final_report(self, params) -> str:
        if self.final_sample_tokens <= 0:
            return ""
        text = b"    def __init__(self, name, value=None):\n        self.name = name\n"
        tokens = jnp.asarray([list(text)], jnp.int32)
        inputs, masked = self.mask_tokens(tokens, jax.random.PRNGKey(self.seed))
        predicted = jnp.argmax(self.model.apply({"params": params}, inputs), -1)
        filled = jnp.where(masked, predicted, tokens)[0]
        shown = lambda t: bytes(int(b) if b < 256 else ord("_") for b in t).decode("utf-8", "replace")  # noqa: E731
        return f"Masked bytes (shown as _) and the model's fill-in:\n{shown(inputs[0])}{shown(filled)}"
