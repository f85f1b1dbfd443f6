"""Decode with a trained UniLM seq2seq model:
`python -m train_lib.text.generate --workdir DIR --beam_size 4 --input "..."` (or `--input_file LINES.txt`).

Prints the decoded target of each input: greedy (`--beam_size=1`), beam search (bert4keras semantics:
cumulative log-probabilities, stop when the best beam has ended), or sampling (`--temperature > 0`, with
`--top_k`/`--top_p`). Uses the run's EMA parameters when it kept them (`--use_ema=False` for the raw ones).
"""
from __future__ import annotations

import pathlib
import sys

from absl import flags

from train_lib import cli
from train_lib.config_lib import ConfigError

COMMAND = "train_lib.text.generate"


def _define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Training workdir of a 'seq2seq' run.")
    flags.DEFINE_string("input", None, "One source text to decode.")
    flags.DEFINE_string("input_file", None, "A UTF-8 file with one source text per line.")
    flags.DEFINE_integer("beam_size", 1, "Beam size; 1 = greedy.")
    flags.DEFINE_integer("max_new_tokens", 0, "Most tokens to generate; 0 = the run's data.max_target_len.")
    flags.DEFINE_float("temperature", 0.0, "Sample at this temperature instead of searching (0 = search).")
    flags.DEFINE_integer("top_k", 0, "Sampling: keep the k most likely tokens (0 = all).")
    flags.DEFINE_float("top_p", 1.0, "Sampling: keep the smallest set of tokens with this total probability.")
    flags.DEFINE_integer("num_samples", 1, "Sampling: samples per input.")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_bool("use_ema", True, "Use the EMA parameters when the run kept them.")


def read_inputs(text: str | None, path: str | None) -> list[str]:
    """The sources: `--input`, or the lines of `--input_file` (blank lines kept as empty sources)."""
    if (text is None) == (path is None):
        raise ConfigError("give exactly one of --input and --input_file")
    if text is not None:
        return [text]
    file = pathlib.Path(path)
    if not file.is_file():
        raise ConfigError(f"--input_file {path!r} is not a file")
    try:
        return file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ConfigError(f"--input_file {path!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def check_inputs(task, sources: list[str], max_new_tokens: int) -> None:
    """Refuses an input longer than the model's positions can hold with the generated target."""
    longest = task.model.max_positions
    if longest is None:
        return
    for i, source in enumerate(sources):
        need = len(task.tokenizer.encode(source)) + 2 + max_new_tokens
        if need > longest:
            raise ConfigError(f"input {i + 1}: {need} positions (source, [CLS]/[SEP] and {max_new_tokens} new tokens) "
                              f"exceed the model's {longest} (model.max_positions); shorten it")


def main(argv: list[str]) -> None:
    _define_flags()
    cli.parse_flags(argv)
    f = flags.FLAGS
    if not f.workdir:
        cli.fail("--workdir is required")
    if f.beam_size < 1:
        cli.fail(f"--beam_size must be at least 1, got {f.beam_size}")
    if f.max_new_tokens < 0 or f.temperature < 0 or f.top_k < 0 or not 0 < f.top_p <= 1 or f.num_samples < 1:
        cli.fail("--max_new_tokens, --temperature and --top_k must be non-negative, --top_p in (0, 1], "
                 "--num_samples ≥ 1")

    def body():
        import jax

        from train_lib import checkpointing

        sources = read_inputs(f.input, f.input_file)
        run = checkpointing.restore_params(f.workdir, use_ema=f.use_ema, command=COMMAND)
        task = run.task
        max_new = f.max_new_tokens or task.data_settings.max_target_len
        check_inputs(task, sources, max_new)
        if f.top_k > task.tokenizer.vocab_size:
            raise ConfigError(f"--top_k {f.top_k} exceeds the vocabulary of {task.tokenizer.vocab_size}")
        sampling = {}
        if f.temperature > 0:
            sampling = dict(rng=jax.random.PRNGKey(f.seed), temperature=f.temperature, top_k=f.top_k, top_p=f.top_p,
                            num_samples=f.num_samples)
        outputs = task.decode(run.params, sources, beam_size=f.beam_size, max_new_tokens=max_new, **sampling)
        print(f"# checkpoint step {run.step} ({'EMA' if run.ema else 'raw'} parameters)")
        for output in outputs:
            print(output)

    cli.run_guarded(body)


if __name__ == "__main__":
    main(sys.argv)
