r"""SimSiam and BYOL on scikit-learn's 8×8 digits: one run of the self-supervised image family.

Question (post 7980, "从动力学角度看SimSiam"; SimSiam, arXiv 2011.10566; BYOL, arXiv 2006.07733): without
negative pairs, what keeps the two views' representations from collapsing to a constant? The ablations are
presets of this file; `experiments/siamese_collapse.py` trains the whole grid and writes the table.

Run:

  python -m train_lib.main --config=experiments/simsiam_digits.py --workdir=runs/simsiam_digits
  python -m train_lib.selfsup.probe --workdir=runs/simsiam_digits      # probe and k-NN of the checkpoint

The default is SimSiam: an MLP encoder 64 → 256 → 256 (the representation h the probe reads), projector
Dense–BN–ReLU–Dense to d = 64, bottleneck predictor 64 → 16 → 64, stop-gradient on the targets, SGD with
momentum 0.9, learning rate 0.1 with a cosine decay to 0, weight decay 1e-4 (SimSiam's recipe has 0.05 × B/256; not tuned here),
2,000 steps of batch 256 (~350 epochs of the 1,437 training images). Views: shifts of up to 1 pixel, erasing
of up to 4×4 pixels with probability 0.5, noise of std 0.1.

Presets (after the variant, e.g. `--config=experiments/simsiam_digits.py:digits,byol,adam`):
  byol                   an EMA target network, τ = 0.99 (`siamese.target_decay`)
  no_stop_gradient       gradients flow into the targets too (SimSiam's Fig. 2 ablation)
  no_predictor           p = z
  closed_form_predictor  the predictor is the ridge-regression map from z to the targets, solved on each batch
                         (the "too strong" predictor; ridge 1e-3)
  adam                   AdamW, learning rate 1e-3 with the same schedule and weight decay
  output_norm            batch normalisation on the projector's output (SimSiam's ResNet projector has it)
Variants: `digits` (default), `quick` (6 steps of batch 64 with a network 64 → 32 → 32, d = 16, for tests).

Result (2-core CPU, 2026-12-03, 79 s: the `simsiam` cell of experiments/siamese_collapse.py): final train loss
−0.763; on the test split a linear probe of h 96.9%, 10-NN 96.4% (10-NN on z 92.8%), std of the normalised z 0.106
against 1/√64 = 0.125, effective ranks 37.8 (z) and 51.0 (h).
"""
import ml_collections

from experiments import common

LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("pixels", None),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("projection", None),
)

_VARIANTS = {
    #         steps  batch  warmup log eval
    "digits": (2000, 256, 20, 100, 500),
    "quick": (6, 64, 1, 1, 6),
}


def _byol(config, variant):
    config.siamese.target_decay = 0.99


def _no_stop_gradient(config, variant):
    config.siamese.stop_gradient = False


def _no_predictor(config, variant):
    config.model.predictor = "none"


def _closed_form_predictor(config, variant):
    config.model.predictor = "closed_form"


def _adam(config, variant):
    opt = config.optimizer
    config.optimizer = common.optimizer_config("adamw", learning_rate=1e-3, warmup_steps=opt.warmup_steps,
                                               end_lr_factor=opt.end_lr_factor, weight_decay=opt.weight_decay,
                                               grad_clip_norm=opt.grad_clip_norm)


def _output_norm(config, variant):
    config.model.projector_output_norm = True


_PRESETS = {"byol": _byol, "no_stop_gradient": _no_stop_gradient, "no_predictor": _no_predictor,
            "closed_form_predictor": _closed_form_predictor, "adam": _adam, "output_norm": _output_norm}


def get_config(arg: str | None = "digits") -> ml_collections.ConfigDict:
    """Config for `arg` = a variant ('digits', 'quick'), then presets: 'digits,byol,adam'."""
    variant, presets = common.parse_arg(arg, default="digits", variants=_VARIANTS, presets=_PRESETS, file=__file__)
    steps, batch, warmup, log_every, eval_every = _VARIANTS[variant]
    config = common.trainer_config(task="siamese", total_steps=steps, batch_size=batch,
                                   logical_axis_rules=LOGICAL_AXIS_RULES, log_every_steps=log_every,
                                   eval_every_steps=eval_every, eval_batches=1, checkpoint_every_steps=eval_every,
                                   ema_decay=0.0)
    config.data = ml_collections.ConfigDict({"dataset": "digits"})
    config.model = ml_collections.ConfigDict({
        "hidden": 256, "encoder_layers": 2, "projector_hidden": 256, "projection_dim": 64, "predictor": "mlp",
        "predictor_hidden": 16, "projector_output_norm": False})
    config.siamese = ml_collections.ConfigDict({"stop_gradient": True, "target_decay": 0.0, "closed_form_ridge": 1e-3})
    config.augment = ml_collections.ConfigDict({"max_shift": 1, "erase_prob": 0.5, "erase_max": 4, "noise_std": 0.1})
    config.probe = ml_collections.ConfigDict({"knn_k": 10, "final_report": True})
    if variant == "quick":  # a smaller network too: tests compile it many times
        config.model.update({"hidden": 32, "projector_hidden": 32, "projection_dim": 16, "predictor_hidden": 8})
    config.optimizer = common.optimizer_config("sgd", learning_rate=0.1, warmup_steps=warmup, end_lr_factor=0.0,
                                               weight_decay=1e-4, grad_clip_norm=0.0)
    return common.apply_presets(config, variant, presets, _PRESETS)
