"""Speed peer: one masked-LM train step of Hugging Face's `RoFormerForMaskedLM` or `BertForMaskedLM` (PyTorch).

Runs under the peers' own PyTorch venv, not the project's (it imports torch and transformers, never jax):

    make peers-venv
    .venv-peers/bin/python tests/peers/hf_mlm_peer.py --steps 10                 # RoFormer
    .venv-peers/bin/python tests/peers/hf_mlm_peer.py --steps 10 --model bert    # BERT
    .venv/bin/python tests/peers/compare.py roformer   # alternates this and our char_mlm `peer` benchmark
    .venv/bin/python tests/peers/compare.py bert       # ... and ours with model.position=learned

Not part of `make test` (pytest.ini ignores tests/peers). Prints one JSON line:

    {"peer": "transformers RoFormerForMaskedLM" | "transformers BertForMaskedLM", "version", "torch",
     "threads", "step_ms" (median), "step_ms_min", "step_ms_max", "tokens_per_sec" (batch × length /
     median seconds), "params" (trainable), "attention" (the attention implementation transformers chose)}

The model matches experiments/char_mlm.py:peer (RoFormer: BERT with rotary positions, Su et al., "RoFormer:
Enhanced Transformer with Rotary Position Embedding", https://arxiv.org/abs/2104.09864), built from a config
(nothing is downloaded):

    RoFormerConfig(vocab_size=8000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                   intermediate_size=1024, hidden_act="gelu", hidden_dropout_prob=0.1,
                   attention_probs_dropout_prob=0.1, max_position_embeddings=512, type_vocab_size=2,
                   layer_norm_eps=1e-12, tie_word_embeddings=True)

(`--model bert`: the same numbers in a `BertConfig`, learned absolute positions, as ours with
`--config.model.position=learned`). Both are post-norm with erf GELU and the MLM decoder tied to the token
embeddings, as ours. RoFormer's sinusoidal table is a frozen parameter (not counted in `params`, not
updated); transformers 5.24 runs RoFormer's attention eagerly (matmul, softmax, dropout, matmul) and BERT's
through `torch.nn.functional.scaled_dot_product_attention` ('sdpa', its default).

Train step, as users run these models: random token ids of shape (batch, length) (ours reads real text),
token_type_ids zeros, attention_mask ones, `labels` set at round(0.15 × (length − 2)) random positions per
row (never the first or last, where [CLS] and [SEP] sit; the rest −100, as `DataCollatorForLanguageModeling`
leaves them), in train mode (dropout on). Step = zero_grad, forward with `labels` (the model's own
cross-entropy), backward, `clip_grad_norm_(1.0)`, AdamW (lr 1e-3, betas (0.9, 0.98), eps 1e-6, weight decay
0.01). The masking itself is done once, outside the step (a data collator's job); ours masks inside its step.

One difference in work, not in setup: `*ForMaskedLM` computes the prediction scores (transform, LayerNorm,
[hidden × vocab] decoder) at every position and ignores the unlabelled ones in the loss; ours computes them
only at the ~15% predicted positions (`mlm_positions`). At these sizes the full-length head costs about 60% of
the encoder's FLOPs, so the peer does about 1.5× our FLOPs per token; that is the peer as users run it.
Float32 on CPU, `torch.set_num_threads(os.cpu_count())` (`--threads` overrides it). After `--warmup` untimed
steps, each of `--steps` steps is timed to completion (CPU ops are synchronous; on CUDA the step ends with a
synchronize).
"""
from __future__ import annotations

import argparse
import json
import os
from importlib import metadata

from peer_timing import time_steps, train_step  # this script's folder is on sys.path

import torch
import transformers

MODELS = {  # --model: (config class, model class)
    "roformer": ("RoFormerConfig", "RoFormerForMaskedLM"),
    "bert": ("BertConfig", "BertForMaskedLM"),
}
MASK_RATE = 0.15  # BERT's (and train_lib.text.task.MaskedLanguageModelTask's)


def masked_labels(tokens: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`tokens` `[batch, length]` with all but round(0.15 × (length − 2)) random interior positions per row
    set to −100 (the ignore index of the models' cross-entropy)."""
    batch, length = tokens.shape
    num_masked = max(1, round(MASK_RATE * (length - 2)))
    scores = torch.rand(batch, length - 2, generator=generator)
    chosen = 1 + torch.argsort(scores, dim=-1)[:, :num_masked]  # interior positions 1 … length − 2
    labels = torch.full_like(tokens, -100)
    labels.scatter_(1, chosen, tokens.gather(1, chosen))
    return labels


def build_model(name: str, args) -> torch.nn.Module:
    config_cls, model_cls = (getattr(transformers, n) for n in MODELS[name])
    config = config_cls(vocab_size=args.vocab, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=1024, hidden_act="gelu", hidden_dropout_prob=args.dropout,
                        attention_probs_dropout_prob=args.dropout, max_position_embeddings=512, type_vocab_size=2,
                        layer_norm_eps=1e-12, tie_word_embeddings=True)
    return model_cls(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="roformer")
    parser.add_argument("--steps", type=int, default=10, help="timed train steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128, help="tokens per sequence ([CLS] … [SEP])")
    parser.add_argument("--vocab", type=int, default=8000, help="vocabulary size (our tokenizer's)")
    parser.add_argument("--dropout", type=float, default=0.1, help="hidden and attention dropout")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: os.cpu_count())")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.batch < 1 or args.length < 3 or args.vocab < 2 or args.threads < 0:
        parser.error("--steps, --batch must be ≥ 1, --length ≥ 3, --vocab ≥ 2, --warmup and --threads ≥ 0")
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    model = build_model(args.model, args).to(device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    params = sum(p.numel() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.batch, args.length), generator=generator)
    labels = masked_labels(tokens, generator).to(device)
    tokens = tokens.to(device)
    token_type_ids = torch.zeros_like(tokens)
    attention_mask = torch.ones_like(tokens)

    def loss_fn():
        return model(input_ids=tokens, attention_mask=attention_mask, token_type_ids=token_type_ids,
                     labels=labels).loss

    # peer_timing.train_step runs zero_grad, loss_fn, backward, optimizer.step: the clip goes inside step().
    step = train_step(_ClippingOptimizer(optimizer, trainable, max_norm=1.0), loss_fn, device)
    timing = time_steps(step, warmup=args.warmup, steps=args.steps)
    median, loss = timing.pop("median_s"), timing.pop("loss")
    print(json.dumps({
        "peer": f"transformers {MODELS[args.model][1]}", "version": metadata.version("transformers"),
        "torch": torch.__version__, "device": device.type, "threads": threads, "batch": args.batch,
        "length": args.length, "vocab": args.vocab, "dropout": args.dropout,
        "attention": model.config._attn_implementation, **timing,
        "tokens_per_sec": args.batch * args.length / median, "params": params, "loss": loss,
    }), flush=True)


class _ClippingOptimizer:
    """`optimizer` whose `step()` first clips the global gradient norm to `max_norm` (`clip_grad_norm_`),
    so `peer_timing.train_step` (zero_grad, forward, backward, step) times a clipped step."""

    def __init__(self, optimizer, params, *, max_norm: float):
        self.optimizer, self.params, self.max_norm = optimizer, params, max_norm

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        self.optimizer.step()


if __name__ == "__main__":
    main()
