r"""DDPM on scikit-learn's 8×8 digits, and how DDPM, DDIM and Analytic-DPM compare at K steps.

Question: on a small U-Net trained in minutes, does Analytic-DPM's variance (Bao et al., arXiv 2201.06503;
https://kexue.fm/archives/9245) give a better NLL than DDPM's σ² = β and σ² = β̃ at every step count K,
with the largest gains at small K, and how do the five samplers compare in sample quality (FCD)?

Run:

  python -m train_lib.main --config=experiments/ddpm_digits.py --workdir=runs/ddpm_digits
  python -m train_lib.diffusion.sample --workdir=runs/ddpm_digits --sampler=ddim --steps=50 --num=64
  python -m train_lib.diffusion.sample --workdir=runs/ddpm_digits --table

Variants (`get_config(arg)`: a variant, then presets after commas):
  digits   (default) the U-Net below, trained on 2 CPU cores in under 30 minutes.
  cifar10  the DDPM paper's CIFAR-10 model (Ho et al., arXiv 2006.11239, App. B): 128 channels, mults
           (1, 2, 2, 2), 2 res blocks, attention at 16×16, dropout 0.1, Adam 2e-4, batch 128, grad clip 1,
           EMA 0.9999, random flips, 800k steps; accelerators. `data.path` must name the extracted
           cifar-10-batches-py directory (nothing is downloaded):
             python -m train_lib.main --config=experiments/ddpm_digits.py:cifar10 --workdir=DIR \
               --config.data.path=/path/to/cifar-10-batches-py
  tiny     a U-Net of a few thousand parameters and a 100-step schedule: for tests (seconds).
  unet_peer  the `digits` model, named for the speed benchmark against diffusers. The matching
           diffusers model is `UNet2DModel(sample_size=8, in_channels=1, out_channels=1,
           block_out_channels=(32, 64), layers_per_block=1, down_block_types=("DownBlock2D",
           "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
           attention_head_dim=64, dropout=0.1)`, trained the same way (ε-MSE, Adam, batch 64):
             python -m train_lib.benchmark --config=experiments/ddpm_digits.py:unet_peer
             python tests/peers/compare.py unet     # against diffusers (needs a PyTorch venv; see there)
           Result (2-core CPU, 2026-11-21, medians of 10 alternating rounds on a quiet machine): 816
           images/s (~78 ms per step of 64), MFU 48%, 1.15× diffusers' 700 images/s (diffusers at 41% MFU;
           its own throughput moved from 580 to 721 images/s between rounds, so single rounds ranged
           0.95–1.44×; earlier runs gave 1.11–1.24×) (README "Performance").

Presets: `v` / `x0` (what the network predicts), `elbo` (the variational-bound weighting instead of
DDPM's "simple" one), `cosine` (the cosine schedule), `conditional` (class-conditional U-Net through
conditional GroupNorm, labels from the data, 10% label dropout so it also samples unconditionally),
`official_sampling` (the official Analytic-DPM code's sampling conventions as the `sample` defaults: DDIM
keeps the network's ε̂ when x̂₀ is clipped, and the last noisy step's σ² is capped at 1 grey level, the
official setting for Analytic-DDIM and DDPM σ²=β; its Analytic-DDPM uses 2), and
the optimizers of experiments/common.py (`adamw`, the default, `adafactor`, `sgd`, `lion`), e.g.
`--config=experiments/ddpm_digits.py:digits,v,conditional`.

Results (2-core CPU shared with other jobs, 2026-11-21, with models.layers.Dropout;
experiments/figures/ddpm_digits_table.md is the full output).

  Training (the first command): 4,000 steps of batch 64 in 10 min 28 s wall, train loss 0.585 (step 100)
  → 0.075 (step 4,000), eval NLL bound at K=20 (σ²=β) 4.80 bits/dim with the EMA weights.
  The table (the third command; 19 min wall, most of it K=1000, which runs 1,000 U-Net steps per
  sampler and per NLL), EMA weights of step 4,000, Γ from 1,024 training images:

  NLL bound, bits/dim on the 360 test images (a uniform model is log₂ 17 = 4.09; — : undefined, DDIM's
  q is deterministic at η = 0):

  | sampler | K=10 | K=25 | K=50 | K=100 | K=1000 |
  |---|---|---|---|---|---|
  | DDPM σ²=β | 5.309 | 4.638 | 4.167 | 3.762 | 3.025 |
  | DDPM σ²=β̃ | 216.909 | 58.649 | 21.765 | 9.702 | 3.233 |
  | Analytic-DDPM | 4.602 | 4.049 | 3.702 | 3.418 | 2.954 |
  | DDIM η=0 | — | — | — | — | — |
  | Analytic-DDIM η=0 | — | — | — | — | — |

  FCD of 360 samples against the test split (real train vs test: 2.02):

  | sampler | K=10 | K=25 | K=50 | K=100 | K=1000 |
  |---|---|---|---|---|---|
  | DDPM σ²=β | 28.451 | 9.300 | 6.457 | 5.524 | 4.217 |
  | DDPM σ²=β̃ | 8.742 | 4.764 | 5.977 | 5.249 | 4.214 |
  | Analytic-DDPM | 11.410 | 5.525 | 5.917 | 5.319 | 4.217 |
  | DDIM η=0 | 6.151 | 4.169 | 3.924 | 3.864 | 3.850 |
  | Analytic-DDIM η=0 | 9.615 | 4.857 | 4.104 | 4.090 | 3.863 |

Reading: Analytic-DPM's likelihood claim held — its NLL is below both fixed variances at every K,
and the gain over the better of them (σ²=β) shrinks with K: 0.71, 0.59, 0.47, 0.34, 0.07 bits/dim
at K = 10, 25, 50, 100, 1000; σ²=β̃ is far worse at small K (its first steps are overconfident). The
prior and reconstruction terms are below 0.001 bits/dim here (17 grey levels are coarse bins), so
the bound is the diffusion term. At K = 10 every bound, and at K = 25 all but Analytic-DPM's (4.05), is
above a uniform model's 4.09 bits: few-step bounds are loose on 64-pixel images. Sample quality is
another matter: at K = 10 the analytic variance (between β̃ and β) gives worse FCD than β̃ and than
DDIM (11.4 / 9.6 vs 8.7 / 6.2), the same direction as the paper's CIFAR-10 K=10 numbers (Analytic-DDIM
14.00 vs DDIM 13.36 FID); from K = 100 on the samplers are within ~1.7 FCD of each other (0.4 at
K = 1000), and DDIM η=0 is best or tied throughout. One model, one seed, 360 samples per cell: FCD differences below ~1 are noise (the
previous run, with nn.Dropout's masks, had the same NLLs to ±0.004 bits/dim for σ²=β and Analytic-DPM, and
FCDs within 0.5 at K ≥ 50, 0.62 at K = 25 and 1.23 at K = 10).

The official Analytic-DPM code's sampling conventions (preset `official_sampling`, or the sampling CLI's
`--eps_from_clipped_x0=False --second_last_sigma_pixels=P`; README "Results" has the commands): FCD of 360
samples of a retrained model (7 min 56 s, same FCDs as above to ±0.004), today's defaults vs official:

  | sampler (official setting) | K=10 today | K=10 official | K=50 today | K=50 official |
  |---|---|---|---|---|
  | DDIM η=0 (network's ε̂, no cap) | 6.150 | 6.084 | 3.923 | 4.465 |
  | Analytic-DDIM η=0 (network's ε̂, cap 1 level) | 9.619 | 9.292 | 4.101 | 4.789 |
  | Analytic-DDPM (cap 2 levels) | 11.412 | 11.412 | 5.917 | 5.917 |
  | DDPM σ²=β (cap 1 level) | 28.454 | 14.953 | 6.456 | 6.456 |

  The network's ε̂ in DDIM's direction term is mixed at K=10 and worse at K=50, so the default stays; the
  cap on the last noisy step's σ² only matters where that σ² is large (DDPM σ²=β at K=10: 28.5 → 15.0).

Samples (16 per row; for each K, the five samplers in the order above; rows of DDIM repeat across K
because its x_T and path are deterministic): experiments/figures/ddpm_digits_samples.png.
"""
import ml_collections

from experiments import common

# Logical axis → mesh axis. Batch over data and fsdp; FSDP shards every conv kernel's input channels and
# every dense kernel's input; 'model' splits conv output channels and dense outputs (tensor parallel).
# The image's own 1 or 3 channels, norms and the class table stay replicated.
LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("height", None),
    ("width", None),
    ("channels", None),
    ("conv_h", None),
    ("conv_w", None),
    ("conv_in", "fsdp"),
    ("conv_out", "model"),
    ("image_channels", None),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("norm", None),
    ("classes", None),
)

_VARIANTS = {
    #          channels mults   blocks attn   groups dropout batch steps    lr    warmup ema     T
    "digits": (32, (1, 2), 1, (4,), 8, 0.1, 64, 4000, 1e-3, 200, 0.999, 1000),
    "cifar10": (128, (1, 2, 2, 2), 2, (16,), 32, 0.1, 128, 800_000, 2e-4, 5000, 0.9999, 1000),
    "tiny": (8, (1, 2), 1, (4,), 4, 0.0, 16, 30, 3e-3, 5, 0.99, 100),
}
# The speed benchmark against diffusers is the digits model itself; tests/peers/ builds the
# matching diffusers UNet2DModel (see the docstring).
_VARIANTS["unet_peer"] = _VARIANTS["digits"]


def _v(config, variant):
    config.diffusion.prediction = "v"


def _x0(config, variant):
    config.diffusion.prediction = "x0"


def _elbo(config, variant):
    config.diffusion.weighting = "elbo"


def _cosine(config, variant):
    config.diffusion.schedule = "cosine"


def _conditional(config, variant):
    config.model.num_classes = 10
    config.diffusion.label_dropout = 0.1


def _official_sampling(config, variant):
    config.sample.eps_from_clipped_x0 = False
    config.sample.second_last_sigma_pixels = 1.0


_PRESETS = {"v": _v, "x0": _x0, "elbo": _elbo, "cosine": _cosine, "conditional": _conditional,
            "official_sampling": _official_sampling}


def get_config(arg: str | None = "digits") -> ml_collections.ConfigDict:
    """Config for `arg` = a variant ('digits', 'cifar10', 'tiny', 'unet_peer'), then presets: 'digits,v,conditional'."""
    variant, presets = common.parse_arg(arg, default="digits", variants=_VARIANTS, presets=_PRESETS, file=__file__)
    config = _base_config("digits" if variant == "unet_peer" else variant)
    return common.apply_presets(config, variant, presets, _PRESETS)


def _base_config(variant: str) -> ml_collections.ConfigDict:
    channels, mults, blocks, attn, groups, dropout, batch, steps, lr, warmup, ema, timesteps = _VARIANTS[variant]
    cifar = variant == "cifar10"
    config = common.trainer_config(
        task="diffusion", total_steps=steps, batch_size=batch, logical_axis_rules=LOGICAL_AXIS_RULES,
        grad_accum_steps=1,  # on CPU keep 1: XLA:CPU runs a scanned conv step ~20× slower
        log_every_steps={"tiny": 1, "digits": 100}.get(variant, 1000),
        eval_every_steps={"tiny": 1000, "digits": 1000}.get(variant, 50_000),
        eval_batches=5 if not cifar else 40,  # digits: 5 × 64 = 320 of the 360 test images
        checkpoint_every_steps={"tiny": 10, "digits": 1000}.get(variant, 10_000), ema_decay=ema)

    config.data = ml_collections.ConfigDict()
    config.data.dataset = "cifar10" if cifar else "digits"  # digits: bundled with scikit-learn
    config.data.path = ""  # cifar10: the directory of its Python pickle batches (cifar-10-batches-py)
    config.data.random_flip = cifar  # horizontal flips (DDPM on CIFAR-10); digits are not mirror-symmetric

    config.model = ml_collections.ConfigDict()
    config.model.base_channels = channels
    config.model.channel_mults = mults
    config.model.num_res_blocks = blocks
    config.model.attention_resolutions = attn
    config.model.dropout = dropout
    config.model.num_classes = 0  # > 0: class-conditional (labels from the data)
    config.model.num_groups = groups
    config.model.num_heads = 1
    config.model.dtype = "float32"
    config.model.param_dtype = "float32"

    config.diffusion = ml_collections.ConfigDict()
    config.diffusion.schedule = "linear"  # see models.diffusion.schedules.BETA_SCHEDULES
    config.diffusion.num_timesteps = timesteps
    config.diffusion.prediction = "eps"  # 'eps', 'x0' or 'v'
    config.diffusion.weighting = "simple"  # 'simple' or 'elbo'
    config.diffusion.label_dropout = 0.0  # conditional models: P(label → "no class") in training
    config.diffusion.eval_nll_steps = 20 if variant != "tiny" else 4  # K of the NLL bound at each eval (0: off)
    config.diffusion.eval_nll_method = "ddpm_beta"  # 'ddpm_beta' or 'ddpm_beta_tilde'

    # Defaults of `python -m train_lib.diffusion.sample` and what the end-of-training report draws.
    config.sample = ml_collections.ConfigDict()
    config.sample.sampler = "ddim"
    config.sample.steps = 50 if variant != "tiny" else 5
    config.sample.eta = 0.0
    config.sample.spacing = "even"
    config.sample.clip_x0 = True
    config.sample.report_samples = 10  # drawn at the end of training (as text for digits; 0: none)
    config.sample.gamma_images = 1024 if not cifar else 10_000  # training images for Analytic-DPM's Γ
    # Conventions on which implementations differ (models.diffusion.samplers.sample; preset
    # `official_sampling`): recompute ε̂ from the clipped x̂₀, and no cap on the last noisy step's σ².
    config.sample.eps_from_clipped_x0 = True
    config.sample.second_last_sigma_pixels = 0.0

    # With weight_decay 0, AdamW is DDPM's Adam; the paper keeps CIFAR-10's 2e-4 constant.
    config.optimizer = common.optimizer_config("adamw", learning_rate=lr, warmup_steps=warmup,
                                               end_lr_factor=0.1 if not cifar else 1.0, weight_decay=0.0,
                                               grad_clip_norm=1.0, b1=0.9, b2=0.999, eps=1e-8)
    return config
