r"""NVAE on scikit-learn's 8×8 digits: one run of the hierarchical-VAE family, bits/dim beside DDPM's.

Question (post 7574, "强大的NVAE：以后再也不能说VAE生成的图像模糊了"; Vahdat & Kautz, arXiv 2007.03898): does a
deeper hierarchy (more latent groups) give a better likelihood, and do the residual normal posterior and
spectral regularisation keep training stable where the plain model diverges? The presets below are the
ablations; `experiments/nvae_study.py` trains the grid and writes the table.

Run:

  python -m train_lib.main --config=experiments/nvae_digits.py --workdir=runs/nvae_digits
  python -m train_lib.vae.evaluate --workdir=runs/nvae_digits        # IWAE-1000, active units, FCD at 1.0 and 0.6

The default follows NVAE's MNIST settings (NVlabs/NVAE's README: 2 latent scales, 20 latent channels per
group, spectral regularisation λ = 1e-2, residual posteriors, Adamax with a cosine decay, KL warm-up over the
first 30% of training, KL balancing), scaled to 8×8 images and a 2-core CPU: one preprocessing stage
(8×8 → 4×4), latent scales 4×4 and 2×2 with 2 groups each (the top group first: 4 groups of 80, 80, 320 and
320 dimensions), 16 channels doubling at each downsample, one residual cell per group, decoder cells of
expansion 3, SE and weight normalisation everywhere, BN momentum 0.95 (PyTorch's 0.05), a 3-component
discretised logistic mixture on the 17 grey levels; Adamax at lr 1e-2 (warm-up 100 steps, cosine to 1e-4),
weight decay 3e-4 on the trainer's decayed leaves (dense kernels: the weight-normalised convs' scale-free
directions are not decayed), batch 64, 2,000 steps (~90 epochs of the 1,437 training images), no gradient
clipping, no EMA (BatchNorm's statistics belong to the raw parameters).

Measured (experiments/nvae_study.py, 2-core CPU): the `groups1` preset trains in 3 min 30 s to −ELBO 1.881 and
IWAE-1000 1.793 bits/dim on the 360 test images (Analytic-DPM's bound: 2.954), FCD 10.77 at temperature 1.0;
the default (2 groups per scale) reaches 2.217 / 2.085 with two groups inactive, and `groups4`'s KL explodes
within 100 steps at this learning rate.

Variants (`get_config(arg)`: a variant, then presets after commas):
  digits  (default) the model above.
  quick   a tiny model and a few steps: for tests (seconds).

Presets: `groups1`, `groups4` (latent groups per scale; default 2), `no_residual` (the encoder gives q's mean
and scale directly), `no_spectral` (λ = 0), `plain` (both: the model NVAE's stabilisers are measured against),
`no_balance`, `no_warmup`, `lr3e1` (learning rate 0.3, 30× the default: the stability test's), `short` (600 steps with a 180-step
warm-up, the stability test's length), and the optimizers of experiments/common.py (`adamax` is the default here).
"""
import ml_collections

from experiments import common

# Logical axis → mesh axis: the batch over data and fsdp; parameters and statistics are replicated (the model
# is 0.3M parameters: data parallelism is the only parallelism worth having).
LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
)

_VARIANTS = {
    #         steps  batch  warmup log eval
    "digits": (2000, 64, 100, 100, 500),
    "quick": (4, 16, 1, 1, 4),
}


def _groups(n):
    def preset(config, variant):
        config.model.groups_per_scale = n
    return preset


def _no_residual(config, variant):
    config.model.residual_posterior = False


def _no_spectral(config, variant):
    config.vae.spectral_coeff = 0.0


def _plain(config, variant):
    _no_residual(config, variant)
    _no_spectral(config, variant)


def _no_balance(config, variant):
    config.vae.kl_balance = False


def _no_warmup(config, variant):
    config.vae.kl_warmup_steps = 0


def _lr3e1(config, variant):
    config.optimizer.learning_rate = 0.3


def _short(config, variant):
    config.total_steps = 600
    config.vae.kl_warmup_steps = 180
    config.eval_every_steps = config.checkpoint_every_steps = 300


_PRESETS = {"groups1": _groups(1), "groups4": _groups(4), "no_residual": _no_residual, "no_spectral": _no_spectral,
            "plain": _plain, "no_balance": _no_balance, "no_warmup": _no_warmup, "lr3e1": _lr3e1, "short": _short}


def get_config(arg: str | None = "digits") -> ml_collections.ConfigDict:
    """Config for `arg` = a variant ('digits', 'quick'), then presets: 'digits,groups4,plain'."""
    variant, presets = common.parse_arg(arg, default="digits", variants=_VARIANTS, presets=_PRESETS, file=__file__)
    steps, batch, warmup, log_every, eval_every = _VARIANTS[variant]
    config = common.trainer_config(task="vae", total_steps=steps, batch_size=batch,
                                   logical_axis_rules=LOGICAL_AXIS_RULES, log_every_steps=log_every,
                                   eval_every_steps=eval_every, eval_batches=2, checkpoint_every_steps=eval_every,
                                   ema_decay=0.0)
    config.data = ml_collections.ConfigDict({"dataset": "digits", "path": ""})
    config.model = ml_collections.ConfigDict({
        "channels": 16, "num_preprocess": 1, "num_scales": 2, "groups_per_scale": 2, "latent_channels": 20,
        "cells_per_group": 1, "residual_posterior": True, "decoder_expansion": 3, "squeeze_excitation": True,
        "weight_norm": True, "bn_momentum": 0.95, "num_mixtures": 3})
    config.vae = ml_collections.ConfigDict({
        "kl_warmup_steps": int(0.3 * steps), "kl_const_steps": 0, "kl_min_coeff": 1e-4, "kl_balance": True,
        "spectral_coeff": 1e-2, "spectral_iterations": 1})
    config.sample = ml_collections.ConfigDict({
        "temperatures": (1.0, 0.6), "bn_readjust_steps": 100, "bn_readjust_batch": 128, "report_samples": 10,
        "report_temperature": 0.6})
    if variant == "quick":
        config.model.update({"channels": 8, "groups_per_scale": 1, "latent_channels": 4, "decoder_expansion": 2,
                             "num_mixtures": 2})
        config.sample.update({"bn_readjust_steps": 2, "bn_readjust_batch": 8, "report_samples": 2})
        config.eval_batches = 1
    config.optimizer = common.optimizer_config("adamax", learning_rate=1e-2, warmup_steps=warmup, end_lr_factor=0.01,
                                               weight_decay=3e-4, grad_clip_norm=0.0)
    return common.apply_presets(config, variant, presets, _PRESETS)
