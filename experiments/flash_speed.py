r"""Training speed and memory of quadratic GAU vs FLASH as the sequence grows (arXiv 2202.10447).

Question: FLASH's mixed chunk attention is linear in n: does its time per token stay flat from 512 to
8192 while quadratic GAU's grows, and how much less memory does it need at 8192?

Each point is `train_lib.benchmark` on `experiments/gau_lm.py:flash_peer` (4 layers, d=256, e=512,
s=128, float32; FLASH with chunks of C=128, GAU with softmax attention over all n keys), the real
jitted train step (forward, backward, AdamW) on a constant 8192 tokens per batch: 16 sequences of
512, …, 1 of 8192. Reported: tokens/s (median step), time per token relative to n=512, MFU against
the matmul peak measured in the same run, and the step's peak memory from XLA's buffer assignment
(parameters, optimizer state, batch, activations kept for the backward pass, temporaries).

Run:

  python -m experiments.flash_speed
  python -m experiments.flash_speed --config.lengths="(512, 1024)" --config.steps=3
  python -m experiments.flash_speed --config=experiments/flash_speed.py:quick      # seconds (tests)

Result of the first command (286 s on an idle 2-core AMD EPYC, AVX2, 2026-11-21; matmul peak in the
run 140 GFLOP/s; also in the README's "Performance" section):

  | model | n | batch | tokens/s | time/token vs n=512 | MFU | peak memory |
  |---|---|---|---|---|---|---|
  | gau | 512 | 16 | 4,463 | 1.00× | 59% | 905 MiB |
  | gau | 1024 | 8 | 3,495 | 1.28× | 66% | 1,113 MiB |
  | gau | 2048 | 4 | 2,533 | 1.76× | 76% | 1,529 MiB |
  | gau | 4096 | 2 | 1,446 | 3.09× | 76% | 2,361 MiB |
  | gau | 8192 | 1 | 696 | 6.41× | 68% | 4,049 MiB |
  | flash | 512 | 16 | 4,841 | 1.00× | 54% | 921 MiB |
  | flash | 1024 | 8 | 4,835 | 1.00× | 54% | 921 MiB |
  | flash | 2048 | 4 | 5,026 | 0.96× | 56% | 921 MiB |
  | flash | 4096 | 2 | 4,817 | 1.00× | 54% | 922 MiB |
  | flash | 8192 | 1 | 4,203 | 1.15× | 47% | 946 MiB |

Reading: FLASH's time per token stays within 1.15× of its n=512 value up to 8192 and its memory is flat
(0.23× GAU's at 8192); quadratic GAU is already 1.28× slower per token at 1024 and 6.4× at 8192. FLASH is
slightly faster than GAU even at 512 here, where its chunk (128) is a quarter of the sequence.
"""
from __future__ import annotations

import time

import jax
import ml_collections

MODELS = {
    "gau": {"model.attention": "gau", "model.normalizer": "softmax"},
    "flash": {},  # flash_peer is FLASH already
    "performer": {"model.attention": "performer", "model.normalizer": "softmax"},
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.lengths = (512, 1024, 2048, 4096, 8192)
    config.tokens_per_batch = 8192
    config.steps = 5
    config.models = ("gau", "flash")  # add "performer" for the FAVOR+ baseline
    config.experiment = "experiments/gau_lm.py:flash_peer"
    config.overrides = ml_collections.ConfigDict()  # extra `model.*` values, e.g. {"num_layers": 2}
    if arg == "quick":
        config.lengths, config.tokens_per_batch, config.steps = (64, 128), 1024, 1
        config.overrides = ml_collections.ConfigDict({"num_layers": 1, "embed_dim": 32, "key_dim": 16,
                                                      "chunk_size": 32})
    elif arg is not None:
        raise ValueError(f"unknown variant {arg!r} of experiments/flash_speed.py; expected None or 'quick'")
    return config


def experiment_config(config, model: str, length: int) -> ml_collections.ConfigDict:
    from experiments import gau_lm
    from train_lib import config_lib

    exp = gau_lm.get_config(config.experiment.split(":", 1)[1])
    values = {"data.seq_len": length, "batch_size": max(1, config.tokens_per_batch // length),
              **MODELS[model], **{f"model.{k}": v for k, v in config.overrides.items()}}
    return config_lib.apply_overrides(exp, values)


def run(config: ml_collections.ConfigDict) -> tuple[str, list[dict]]:
    """Benchmarks every model at every length; returns (markdown table, results)."""
    from train_lib import benchmark, config_lib

    config_lib.check_study(config, choices={"models": MODELS}, positive=("lengths", "tokens_per_batch", "steps"))
    start = time.time()
    results = []
    for model in config.models:
        for length in config.lengths:
            result = benchmark.benchmark_train_step(experiment_config(config, model, length), steps=config.steps,
                                                    warmup=1, name=f"{config.experiment} {model} n={length}")
            result.update(model=model, seq_len=length)
            results.append(result)
            print(f"{model} n={length}: {result['tokens_per_sec']:,.0f} tokens/s, "
                  f"{result['peak_memory_bytes'] / 2**20:,.0f} MiB, MFU {100 * result['mfu']:.0f}%", flush=True)
    lines = ["| model | n | batch | tokens/s | time/token vs n=" + str(config.lengths[0]) + " | MFU | peak memory |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        first = next(x for x in results if x["model"] == r["model"])
        lines.append(f"| {r['model']} | {r['seq_len']} | {r['batch_size']} | {r['tokens_per_sec']:,.0f} | "
                     f"{first['tokens_per_sec'] / r['tokens_per_sec']:.2f}× | {100 * r['mfu']:.0f}% | "
                     f"{r['peak_memory_bytes'] / 2**20:,.0f} MiB |")
    device = jax.devices()[0]
    lines += ["", f"{config.tokens_per_batch} tokens per step, median of {config.steps} steps; {jax.device_count()} "
              f"{device.platform} device(s) ({device.device_kind}); matmul peak "
              f"{results[0]['peak_flops'] / 1e9:.0f} GFLOP/s; total {time.time() - start:.0f} s."]
    return "\n".join(lines), results


if __name__ == "__main__":
    from train_lib import cli

    cli.run_study(__file__, lambda config: run(config)[0])
