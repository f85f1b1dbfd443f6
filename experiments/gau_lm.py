r"""Byte-level GAU language model on the embedded corpus (the Python standard library's source).

Question: does a stack of Gated Attention Units (single-head gated attention, relu² or softmax,
RoPE) learn to model Python source byte by byte, and how fast does it train on this hardware?

Run (the `tiny` variant is what `make demo` runs):

  python -m train_lib.main --config=experiments/gau_lm.py:tiny --workdir=runs/demo
  python -m train_lib.main --config=experiments/gau_lm.py:small --workdir=runs/gau_small
  python -m train_lib.main --config=experiments/gau_lm.py:base --workdir=gs://.../gau_base   # accelerators

Variants:
  tiny   d=128, 4 GAUs, s=64, length 128, batch 16. See README "The demo" for its time and curve.
  small  d=256, 8 GAUs (≈ 4 Transformer layers), s=128, length 256, batch 32: CPU research runs.
  base   GAU-α size: d=768, 24 GAUs, e=1536, s=128, length 512, batch 128, bf16, softmax: accelerators.

Results (2-core CPU; numbers from the runs named in README.md's "Results" section).
"""
import ml_collections

# Logical axis → mesh axis. Parameters: 'embed' is FSDP-sharded, GAU's 'expand' (e) and 'qk' (s) and
# the vocabulary are tensor-parallel over 'model'. Activations: batch over data and fsdp.
LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_expand", "model"),
    ("act_vocab", "model"),
    ("embed", "fsdp"),
    ("expand", "model"),
    ("qk", "model"),
    ("vocab", "model"),
    ("norm", None),
)

_VARIANTS = {
    #        layers  d    s   len batch steps  lr     warmup
    "tiny": (4, 128, 64, 128, 16, 1500, 3e-3, 100),
    "small": (8, 256, 128, 256, 32, 5000, 2e-3, 200),
    "base": (24, 768, 128, 512, 128, 100_000, 1e-3, 2000),
}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    """Config for variant `arg` ('tiny', 'small' or 'base')."""
    if arg not in _VARIANTS:
        raise ValueError(f"unknown variant {arg!r} of experiments/gau_lm.py; expected one of {sorted(_VARIANTS)}")
    layers, d, s, seq_len, batch, steps, lr, warmup = _VARIANTS[arg]
    config = ml_collections.ConfigDict()
    config.task = "lm"
    config.seed = 0
    config.total_steps = steps
    config.batch_size = batch  # global, over all devices and processes
    config.grad_accum_steps = 1
    config.log_every_steps = 50 if arg != "base" else 100
    config.eval_every_steps = 500 if arg != "base" else 5000
    config.eval_batches = 8
    config.checkpoint_every_steps = 500 if arg != "base" else 5000
    config.keep_checkpoints = 3
    config.ema_decay = 0.999
    config.final_sample_tokens = 200  # bytes of text sampled and printed at the end (0: none)
    config.skip_nonfinite_steps = False  # True: skip a step whose loss/gradient is NaN/Inf and go on
    config.start_fresh_if_checkpoints_unusable = False  # True: train from scratch if no checkpoint loads

    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1})
    config.logical_axis_rules = LOGICAL_AXIS_RULES

    config.data = ml_collections.ConfigDict()
    config.data.path = ""  # '' = the embedded corpus; else a text file or a directory of text files
    config.data.seq_len = seq_len

    config.model = ml_collections.ConfigDict()
    config.model.name = "gau_lm"
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

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = lr
    config.optimizer.warmup_steps = warmup
    config.optimizer.end_lr_factor = 0.1
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.98
    config.optimizer.eps = 1e-9
    config.optimizer.weight_decay = 0.01
    config.optimizer.grad_clip_norm = 1.0

    config.debug = ml_collections.ConfigDict()
    config.debug.nan_at_step = -1  # fault injection for tests: the loss at this step becomes NaN
    return config
