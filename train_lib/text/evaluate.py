"""Evaluate a text-family checkpoint on a held-out split.

  python -m train_lib.text.evaluate --workdir DIR --split test --beam_size 1,3,5   # seq2seq: ROUGE-L, exact match
  python -m train_lib.text.evaluate --workdir DIR --split test                     # text_mlm: masked-token metrics
  python -m train_lib.text.evaluate --workdir DIR --split test       # classify, conditional_lm: every record

Seq2seq: decodes every source of the split (or the first `--limit`) greedily (beam 1) and with each beam size,
and scores the outputs against the targets by character ROUGE-L and exact match (`train_lib.text.metrics`).
MLM: the task's eval statistics (loss, accuracy, perplexity on the masked tokens) over the split's windows, with
masks fixed by each window's contents. classify (accuracy, macro-F1, each class's recall) and conditional_lm
(perplexity, overall and per class): the task's `split_metrics` over every record of the split. Prints a Markdown table; `--output` also writes it as JSON.
"""
from __future__ import annotations

import json
import pathlib
import sys
import time

from absl import flags

from train_lib import cli
from train_lib.config_lib import ConfigError

COMMAND = "train_lib.text.evaluate"
SPLITS = ("train", "validation", "test")


def _define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Training workdir of a 'seq2seq' or 'text_mlm' run.")
    flags.DEFINE_string("split", "test", f"One of {', '.join(SPLITS)}.")
    flags.DEFINE_string("beam_size", "1", "Comma-separated beam sizes to decode with (1 = greedy); seq2seq only.")
    flags.DEFINE_integer("limit", 0, "Evaluate the first N examples only (0 = all).")
    flags.DEFINE_integer("batch_size", 64, "Sources decoded together.")
    flags.DEFINE_string("output", None, "Also write the rows as JSON to this file.")
    flags.DEFINE_integer("show", 5, "Print this many (source, prediction, target) examples per decoding.")
    flags.DEFINE_bool("use_ema", True, "Use the EMA parameters when the run kept them.")


def parse_beams(text: str) -> list[int]:
    try:
        beams = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--beam_size must be comma-separated integers, got {text!r}") from None
    if not beams or min(beams) < 1:
        raise ConfigError(f"--beam_size: every beam size must be at least 1, got {text!r}")
    return beams


def evaluate_seq2seq(task, params, records, beams: list[int], *, batch_size: int, show: int = 0):
    """One row per beam size: {'decoding', 'rouge_l', 'exact_match', 'examples', 'seconds', 'sequences_per_s'}."""
    from train_lib.text import metrics

    sources, targets = [r["source"] for r in records], [r["target"] for r in records]
    rows = []
    for beam in beams:
        task.decode(params, sources[:batch_size], beam_size=beam, batch_size=batch_size)  # compile outside the timing
        start = time.perf_counter()
        predictions = task.decode(params, sources, beam_size=beam, batch_size=batch_size)
        seconds = time.perf_counter() - start
        scores = metrics.generation_scores(predictions, targets)
        rows.append({"decoding": "greedy" if beam == 1 else f"beam {beam}", **scores, "examples": len(records),
                     "seconds": seconds, "sequences_per_s": len(records) / seconds})
        for source, prediction, target in list(zip(sources, predictions, targets))[:show]:
            print(f"  [{rows[-1]['decoding']}] {source[:50]!r} → {prediction!r} (target {target!r})")
    return rows


def evaluate_mlm(task, params, split: str, *, limit: int):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from train_lib.text import data as data_lib

    ids, offsets = data_lib.mlm_stream(task.data_settings, task.tokenizer, split)
    windows = data_lib.MLMWindows(ids, offsets, task.seq_len, task.tokenizer)
    count = len(windows) if limit <= 0 else min(limit, len(windows))
    if count == 0:
        raise ConfigError(f"--split {split}: no windows of {task.seq_len} tokens")
    step = jax.jit(task.eval_sums)
    sums, batch = None, 64
    for start in range(0, count, batch):
        examples = [windows[i] for i in range(start, min(count, start + batch))]
        arrays = {k: jnp.asarray(np.stack([e[k] for e in examples])) for k in examples[0]}
        out = jax.device_get(step(params, arrays))
        sums = out if sums is None else {k: sums[k] + out[k] for k in out}
    return [{"split": split, "windows": count, **task.summarize_eval({k: float(v) for k, v in sums.items()})}]


def format_table(rows) -> str:
    keys = list(rows[0])
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    _define_flags()
    cli.parse_flags(argv)
    f = flags.FLAGS
    if not f.workdir:
        cli.fail("--workdir is required")
    if f.split not in SPLITS:
        cli.fail(f"--split must be one of {', '.join(SPLITS)}, got {f.split!r}")
    if f.batch_size < 1:
        cli.fail(f"--batch_size must be at least 1, got {f.batch_size}")

    def body():
        from train_lib import checkpointing

        beams = parse_beams(f.beam_size)
        run = checkpointing.restore_params(f.workdir, use_ema=f.use_ema, command=COMMAND)
        print(f"# checkpoint step {run.step} ({'EMA' if run.ema else 'raw'} parameters), split {f.split}")
        if run.config.task == "seq2seq":
            records = run.task.records(f.split)
            records = records[:f.limit] if f.limit > 0 else records
            rows = evaluate_seq2seq(run.task, run.params, records, beams, batch_size=f.batch_size, show=f.show)
        elif hasattr(run.task, "split_metrics"):
            start = time.perf_counter()
            metrics = run.task.split_metrics(run.params, f.split, batch_size=f.batch_size)
            rows = [{"split": f.split, **metrics, "seconds": time.perf_counter() - start}]
        else:
            rows = evaluate_mlm(run.task, run.params, f.split, limit=f.limit)
        print(format_table(rows))
        if f.output:
            pathlib.Path(f.output).write_text(json.dumps(rows, indent=2) + "\n")

    cli.run_guarded(body)


if __name__ == "__main__":
    main(sys.argv)
