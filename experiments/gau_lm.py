r"""Byte-level GAU language model on the embedded corpus (the Python standard library's source).

Question: does a stack of Gated Attention Units (single-head gated attention, relu² or softmax,
RoPE) learn to model Python source byte by byte, and how fast does it train on this hardware?

Run (the `tiny` variant is what `make demo` runs):

  python -m train_lib.main --config=experiments/gau_lm.py:tiny --workdir=runs/demo
  python -m train_lib.main --config=experiments/gau_lm.py:small --workdir=runs/gau_small
  python -m train_lib.main --config=experiments/gau_lm.py:base --workdir=/shared/gau_base  # accelerators

Variants:
  tiny   d=128, 4 GAUs, s=64, length 128, batch 16, 1,000 steps. See README "The demo" for its time and curve.
  small  d=256, 8 GAUs (≈ 4 Transformer layers), s=128, length 256, batch 16, 3,000 steps: CPU research runs.
  base   GAU-α size: d=768, 24 GAUs, e=1536, s=128, length 512, batch 128, bf16, softmax: accelerators.
  flash_peer  the speed benchmark against FLASH-pytorch: 4 FLASH layers (the `flash` preset), d=256,
         expansion 2, s=128, chunk (group) 128, vocabulary 256, batch 8 × length 512, float32:
           python -m train_lib.benchmark --config=experiments/gau_lm.py:flash_peer
           python tests/peers/compare.py flash     # against FLASH-pytorch (needs a PyTorch venv; see there)
         Result (2-core CPU, 2026-11-21, medians of 5 alternating rounds on a quiet machine): 5,764 tokens/s,
         MFU 56%, 0.84× FLASH-pytorch's 6,994 (per round 0.82–0.84×); the peer runs at 66% MFU, so the 1.5×
         target would need 100% (README "Performance").

Presets, added after a variant with commas (`--config=experiments/gau_lm.py:small,flash`):
  flash         FLASH layers (mixed chunk attention, arXiv 2202.10447): pre-norm ScaleNorm, local relu²(·/C)
                (`relu2_paper`), γ = 1 at init (relu² cannot start from the paper's γ ~ N(0, 0.02²) without
                its relative-position bias; see models/layers.ScaleOffset). The chunk C (`model.chunk_size`) is
                32 / 64 / 256 for tiny / small / base.
  gau_alpha     GAU-α (https://kexue.fm/archives/9052): a bidirectional encoder trained by masked LM, Post-Norm
                RMSNorm without scale or offset, no biases, truncated-normal init 1.13684723/√fan_in · L^{-1/3},
                softmax_plus. `base,gau_alpha` is GAU-α's size (24 layers, d=768, length 512).
  mlm           the masked-LM task on a bidirectional encoder, leaving the architecture as it is.
  performer     FAVOR+ linear attention (https://kexue.fm/archives/7921) as a baseline.
  seq_parallel  shard activations over the sequence on the 'model' mesh axis instead of splitting e and s.
  adamw, adafactor, sgd, lion   the optimizer (experiments/common.py; AdamW by default), same schedule.

  python -m train_lib.main --config=experiments/gau_lm.py:tiny,flash --workdir=runs/flash
  python -m train_lib.main --config=experiments/gau_lm.py:tiny,gau_alpha --workdir=runs/gau_alpha
  python -m train_lib.main --config=experiments/gau_lm.py:tiny --workdir=runs/t --config.model.attention=flash

Single switches, without a preset: `model.attention` ('gau' | 'flash' | 'performer'), `model.normalizer`
(see models/attention.py), `model.position` ('rope' | 'learned' | 'learned_hierarchical' | 'none'),
`model.residual_scores` (RealFormer, post 8027), `model.norm_position` ('pre' | 'post'), `model.kernel_init`,
`model.qk_scale_init` ('normal' | 'ones': use 'ones' with any relu² normaliser), `model.attention_impl`
('xla' | 'pallas' | 'auto': how 'gau' computes softmax / softmax_plus attention; models/pallas_attention.py),
`model.scan_layers` (one `nn.scan` over the layers: half the compile time of `base`; with `model.remat=True` it is
also what cuts activation memory, 82 → 10.3 GiB for `base` on one device; README "Performance").

Results (2-core CPU; numbers from the runs named in README.md's "Results" section).
"""
import ml_collections

from experiments import common

# Logical axis → mesh axis. Parameters: 'embed' is FSDP-sharded, GAU's 'expand' (e) and 'qk' (s) and
# the vocabulary are tensor-parallel over 'model'. Activations: batch over data and fsdp.
LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_expand", "model"),
    ("act_qk", None),  # Z is gathered after its projection: Q·Kᵀ contracts over s, sharding it would all-reduce n×n
    ("act_vocab", "model"),
    ("embed", "fsdp"),
    ("expand", "model"),
    ("qk", "model"),
    ("vocab", "model"),
    ("norm", None),
    ("layers", None),  # the stacked layer axis of model.scan_layers
)

# The `seq_parallel` preset: single-head attention has no heads to split, so activations are split
# over the sequence instead (batch over data and fsdp, length over model); parameters are replicated over
# 'model'. XLA gathers K and V where attention needs them.
SEQUENCE_PARALLEL_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", "model"),
    ("act_embed", None),
    ("act_expand", None),
    ("act_qk", None),
    ("act_vocab", None),
    ("embed", "fsdp"),
    ("expand", None),
    ("qk", None),
    ("vocab", None),
    ("norm", None),
    ("layers", None),  # the stacked layer axis of model.scan_layers
)

_VARIANTS = {
    #        layers  d    s   len batch steps  lr     warmup
    "tiny": (4, 128, 64, 128, 16, 1000, 3e-3, 100),
    "small": (8, 256, 128, 256, 16, 3000, 2e-3, 200),
    "base": (24, 768, 128, 512, 128, 100_000, 1e-3, 2000),
    # FLASH-pytorch's benchmark model: FLASH attention, expansion 2, group (chunk) 128.
    "flash_peer": (4, 256, 128, 512, 8, 1000, 2e-3, 100),
}


_FLASH_CHUNK = {"tiny": 32, "small": 64, "base": 256, "flash_peer": 128}


def _flash(config, variant):
    del variant
    config.model.attention = "flash"
    config.model.norm = "scalenorm"
    config.model.norm_position = "pre"
    config.model.normalizer = "relu2_paper"
    config.model.qk_scale_init = "ones"  # relu² gets no gradient from γ ~ N(0, 0.02²): see models/layers.ScaleOffset


def _mlm(config, variant):
    del variant
    config.task = "mlm"
    config.model.causal = False
    config.model.vocab_size = 257  # 256 bytes and the mask token


def _gau_alpha(config, variant):
    _mlm(config, variant)
    config.model.norm = "rmsnorm_noscale"
    config.model.norm_position = "post"
    config.model.use_bias = False
    config.model.kernel_init = "gau_alpha"
    config.model.normalizer = "softmax_plus"
    config.model.qk_scale_init = "ones"  # bert4keras' ScaleOffset


def _performer(config, variant):
    del variant
    config.model.attention = "performer"


def _seq_parallel(config, variant):
    del variant
    config.logical_axis_rules = SEQUENCE_PARALLEL_RULES


_PRESETS = {"flash": _flash, "gau_alpha": _gau_alpha, "mlm": _mlm, "performer": _performer,
            "seq_parallel": _seq_parallel}


def get_config(arg: str | None = "tiny") -> ml_collections.ConfigDict:
    """Config for `arg` = a variant ('tiny', 'small', 'base', 'flash_peer'), then presets: 'small,flash'."""
    variant, presets = common.parse_arg(arg, default="tiny", variants=_VARIANTS, presets=_PRESETS, file=__file__)
    config = _base_config(variant)
    if variant == "flash_peer":
        presets = ["flash"] + presets
    return common.apply_presets(config, variant, presets, _PRESETS)


def _base_config(arg: str) -> ml_collections.ConfigDict:
    layers, d, s, seq_len, batch, steps, lr, warmup = _VARIANTS[arg]
    every = {"tiny": 250, "base": 5000}.get(arg, 500)
    config = common.trainer_config(task="lm", total_steps=steps, batch_size=batch,
                                   logical_axis_rules=LOGICAL_AXIS_RULES, log_every_steps=50 if arg != "base" else 100,
                                   eval_every_steps=every, checkpoint_every_steps=every, ema_decay=0.999)
    config.final_sample_tokens = 200  # bytes of text sampled and printed at the end (0: none)

    config.data = ml_collections.ConfigDict()
    config.data.path = ""  # '' = the embedded corpus; else a text file or a directory of text files
    config.data.seq_len = seq_len

    config.model = ml_collections.ConfigDict()
    config.model.vocab_size = 256
    config.model.num_layers = layers
    config.model.embed_dim = d
    config.model.expansion_factor = 2
    config.model.key_dim = s
    config.model.normalizer = "softmax"
    config.model.norm = "rmsnorm"
    config.model.causal = True
    config.model.use_bias = arg != "base"  # GAU-α has no biases
    config.model.dropout_rate = 0.0
    config.model.rope_base = 10000.0
    config.model.dtype = "bfloat16" if arg == "base" else "float32"
    config.model.remat = False
    config.model.scan_layers = False  # True: one nn.scan over the layers (faster compiles; params under "layers")
    config.model.attention = "gau"  # 'gau' (quadratic), 'flash' (mixed chunk attention) or 'performer'
    # How 'gau' computes attention: 'xla' (score matrix + normaliser), 'pallas' (blockwise kernel,
    # models/pallas_attention.py; softmax/softmax_plus only) or 'auto' (pallas on GPU/TPU where supported).
    # 'xla' by default: the kernel is tested in Pallas' interpret mode on CPU, but its GPU (Triton) and
    # TPU (Mosaic) compilations have not been run yet; opt in with --config.model.attention_impl=auto.
    config.model.attention_impl = "xla"
    config.model.chunk_size = _FLASH_CHUNK[arg]  # FLASH's chunk size C (and the Performer's causal chunk)
    config.model.position = "rope"  # 'rope', 'learned', 'learned_hierarchical' or 'none'
    config.model.max_positions = 512  # learned position table rows (hierarchical: max_positions² positions)
    config.model.hierarchical_alpha = 0.4
    config.model.norm_position = "pre"  # 'pre' or 'post' (GAU-α)
    config.model.kernel_init = "normal"  # 'normal' (N(0, 0.02²)) or 'gau_alpha'
    config.model.residual_scores = False  # RealFormer residual attention scores (GAU only)
    config.model.performer_features = 128  # random features m of the Performer baseline
    config.model.qk_scale_init = "normal"  # γ of Q/K: 'normal' (N(0, 0.02²), paper) or 'ones' (needed by relu²)

    config.optimizer = common.optimizer_config("adamw", learning_rate=lr, warmup_steps=warmup, end_lr_factor=0.1,
                                               weight_decay=0.01, grad_clip_norm=1.0, b1=0.9, b2=0.98, eps=1e-9)
    return config
