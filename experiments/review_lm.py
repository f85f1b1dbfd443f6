r"""A sentiment-conditional review generator from the pretrained character RoFormer (task 'conditional_lm',
`train_lib.text.conditional`): one run; `experiments/conditional_generation.py` compares the conditions.

  python -m train_lib.main --config=experiments/char_mlm.py --workdir=runs/char_mlm         # the backbone, once
  python -m train_lib.main --config=experiments/review_lm.py:small,cln --workdir=runs/review_lm_cln
  python -m train_lib.text.evaluate --workdir=runs/review_lm_cln --split=test

Variants: small (the char_mlm.py:small backbone from runs/char_mlm, length 64, batch 32, 1,500 steps), quick (a
2-layer width-32 encoder from scratch, 8 steps: the tests' size).
Presets: cln (Conditional LayerNorm, post 7124; the default), prefix (a label token after [CLS]), none (no label);
gau_alpha (a GAU-α stack, CLN on its RMS norms; from runs/char_mlm_gau, `char_mlm.py:small,gau_alpha`).
"""
import ml_collections

from experiments import common, text_common

PRETRAINED = "runs/char_mlm"

_VARIANTS = {
    #          size     len batch steps  lr    warmup
    "small": ("small", 64, 32, 1500, 5e-4, 100),
    "quick": ("quick", 32, 8, 8, 1e-3, 2),
}


def _condition(name):
    def preset(config, variant):
        del variant
        config.conditional.condition = name
    return preset


def _gau_alpha(config, variant):
    text_common.use_gau_alpha(config, _VARIANTS[variant][0])
    if variant != "quick":  # the backbone must be GAU-α too
        config.init_from = PRETRAINED + "_gau"


_PRESETS = {**{name: _condition(name) for name in ("cln", "prefix", "none")}, "gau_alpha": _gau_alpha}


def get_config(arg: str | None = "small") -> ml_collections.ConfigDict:
    """Config for `arg` = a variant ('small', 'quick'), then a preset: 'small,prefix'."""
    variant, presets = common.parse_arg(arg, default="small", variants=_VARIANTS, presets=_PRESETS, file=__file__)
    size, seq_len, batch, steps, lr, warmup = _VARIANTS[variant]
    config = common.trainer_config(task="conditional_lm", total_steps=steps, batch_size=batch,
                                   logical_axis_rules=text_common.LOGICAL_AXIS_RULES,
                                   log_every_steps=max(1, steps // 30), eval_every_steps=max(1, steps // 3),
                                   checkpoint_every_steps=max(1, steps // 3), ema_decay=0.0, eval_batches=8)
    config.init_from = "" if variant == "quick" else PRETRAINED
    config.final_examples = 0
    config.tokenizer = text_common.tokenizer_config()
    config.data = text_common.reviews_data_config(seq_len)
    config.model = text_common.model_config(size)
    config.conditional = ml_collections.ConfigDict({"condition": "cln", "labels": ("negative", "positive"),
                                                    "condition_size": 128 if variant == "small" else 16})
    config.optimizer = common.optimizer_config("adamw", learning_rate=lr, warmup_steps=warmup, end_lr_factor=0.1,
                                               weight_decay=0.01, grad_clip_norm=1.0, b1=0.9, b2=0.98, eps=1e-6)
    return common.apply_presets(config, variant, presets, _PRESETS)
