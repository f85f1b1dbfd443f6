r"""UniLM seq2seq on one encoder: definition → word (Chinese) and docstring → function name (English/code).

Question (posts https://kexue.fm/archives/6933 and https://kexue.fm/archives/5861): does the UniLM mask turn a
(pretrained) bidirectional encoder into a working seq2seq model, and does starting from the pretrained
character model (`experiments/char_mlm.py`) beat random initialisation? Measured by character ROUGE-L and exact
match of greedy and beam-search (3, 5) decoding on the held-out test pairs; on docstring → name also with the
2018 post's copy prior (output logits averaged with a learned scale-shift of the bag of source tokens).

Run (pretrain first; `init_from` reads that workdir's encoder and tokenizer):

  python -m train_lib.main --config=experiments/char_mlm.py --workdir=runs/char_mlm
  python -m train_lib.main --config=experiments/title_generation.py:definitions --workdir=runs/def_pre
  python -m train_lib.main --config=experiments/title_generation.py:definitions,scratch --workdir=runs/def_scratch
  python -m train_lib.main --config=experiments/title_generation.py:docstrings --workdir=runs/doc_pre
  python -m train_lib.main --config=experiments/title_generation.py:docstrings,scratch --workdir=runs/doc_scratch
  python -m train_lib.main --config=experiments/title_generation.py:docstrings,copy_prior --workdir=runs/doc_copy
  python -m train_lib.text.evaluate --workdir=runs/def_pre --split=test --beam_size=1,3,5
  python -m train_lib.generate --workdir=runs/def_pre --beam_size=3 --input="比喻数量少"

Variants: definitions (default), docstrings, quick (tiny, from scratch: the tests' size).
Presets: scratch (random init, the same tokenizer), copy_prior, gau_alpha (needs a GAU-α char_mlm workdir in
`init_from`, e.g. --config.init_from=runs/char_mlm_gau), and the optimizers of experiments/common.py.
`--config.init_from=DIR` starts from any workdir of the text family or a Hugging Face BERT/RoFormer directory.

Result (2-core CPU, 2026-12-02; test split; README "Text: pretraining and UniLM seq2seq" has the commands):

  | task              | init                | ROUGE-L greedy / beam 3 / beam 5 | exact match greedy |
  |-------------------|---------------------|----------------------------------|--------------------|
  | definition → word | pretrained char_mlm | 0.170 / 0.161 / 0.161            | 2.4%               |
  | definition → word | random              | 0.016 / 0.016 / 0.016            | 0%                 |
  | docstring → name  | pretrained char_mlm | 0.288 / 0.294 / 0.292            | 0%                 |
  | docstring → name  | random              | 0.288 / 0.283 / 0.283            | 0%                 |
  | docstring → name  | pretrained + copy   | 0.269 / 0.279 / 0.283            | 0%                 |

The UniLM mask turns the pretrained encoder into a seq2seq model that produces plausible words (from scratch
the decoder collapses to one frequent word); exact matches are rare at this size; beam search does not beat
greedy; the Chinese pretraining does not help docstring → name, nor does the copy prior. The `definitions`
run from the pretrained model trains in 3 min 10 s alone.
"""
import ml_collections

from experiments import common, text_common

PRETRAINED = "runs/char_mlm"  # the default `init_from`: experiments/char_mlm.py's workdir

_VARIANTS = {
    #               corpus        size     len tgt batch steps  lr     warmup
    "definitions": ("definitions", "small", 48, 8, 32, 800, 5e-4, 80),
    "docstrings": ("docstrings", "small", 64, 16, 32, 500, 5e-4, 50),
    "quick": ("definitions", "quick", 32, 8, 8, 20, 1e-3, 4),
}


def _scratch(config, variant):
    del variant
    config.init_from = ""


def _copy_prior(config, variant):
    del variant
    config.copy_prior = True


def _gau_alpha(config, variant):
    text_common.use_gau_alpha(config, _VARIANTS[variant][1])


_PRESETS = {"scratch": _scratch, "copy_prior": _copy_prior, "gau_alpha": _gau_alpha}


def get_config(arg: str | None = "definitions") -> ml_collections.ConfigDict:
    """Config for `arg` = a variant ('definitions', 'docstrings', 'quick'), then presets: 'docstrings,scratch'."""
    variant, presets = common.parse_arg(arg, default="definitions", variants=_VARIANTS, presets=_PRESETS,
                                        file=__file__)
    corpus, size, seq_len, max_target, batch, steps, lr, warmup = _VARIANTS[variant]
    every = {"quick": 10, "definitions": 200}.get(variant, 100)
    config = common.trainer_config(task="seq2seq", total_steps=steps, batch_size=batch,
                                   logical_axis_rules=text_common.LOGICAL_AXIS_RULES,
                                   log_every_steps=5 if variant == "quick" else 50, eval_every_steps=every,
                                   checkpoint_every_steps=every, ema_decay=0.0, eval_batches=4)
    config.init_from = "" if variant == "quick" else PRETRAINED
    config.copy_prior = False
    config.final_examples = 5  # greedy decodings of validation sources printed at the end (0: none)
    config.tokenizer = text_common.tokenizer_config()
    config.data = ml_collections.ConfigDict({
        "corpus": corpus, "path": "", "source_field": "source", "target_field": "target", "text_field": "text",
        "seq_len": seq_len, "max_target_len": max_target, "whole_word_mask": False})
    config.model = text_common.model_config(size)
    config.optimizer = common.optimizer_config("adamw", learning_rate=lr, warmup_steps=warmup, end_lr_factor=0.1,
                                               weight_decay=0.01, grad_clip_norm=1.0, b1=0.9, b2=0.98, eps=1e-6)
    return common.apply_presets(config, variant, presets, _PRESETS)
