"""Sample text from a trained byte-level LM with a KV cache:
`python -m train_lib.lm.generate --workdir DIR --prompt "def " --max_new_tokens 200`.

Uses the run's EMA parameters when it kept them (`--use_ema=False` for the raw ones) and says which.
"""
from __future__ import annotations

import sys

import jax
from absl import flags

from train_lib import cli
from train_lib.config_lib import ConfigError

COMMAND = "train_lib.lm.generate"


def _define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Training workdir (of an 'lm' run) whose newest checkpoint to sample from.")
    flags.DEFINE_string("prompt", "def ", "Text to continue.")
    flags.DEFINE_integer("max_new_tokens", 200, "Number of bytes to generate.")
    flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 = greedy.")
    flags.DEFINE_integer("top_k", 40, "Sample among the k most likely bytes; 0 = all.")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_bool("use_ema", True, "Use the EMA parameters when the run kept them.")


def check_request(task, *, prompt_length: int, max_new_tokens: int, top_k: int) -> None:
    """Refuses what the model cannot do: more positions than it covers, a top-k beyond its vocabulary."""
    vocab = task.model_config.vocab_size
    if top_k > vocab:
        raise ConfigError(f"--top_k {top_k} exceeds the model's vocabulary of {vocab}; give 0 (all) .. {vocab}")
    longest, total = task.longest_sequence, prompt_length + max_new_tokens
    if longest is not None and total > longest:
        raise ConfigError(f"--max_new_tokens: the prompt ({prompt_length} bytes) and {max_new_tokens} new bytes "
                          f"need {total} positions, but model.position={task.model_config.position!r} covers "
                          f"{longest}; ask for at most {max(0, longest - prompt_length)} new bytes")


def main(argv: list[str]) -> None:
    _define_flags()
    cli.parse_flags(argv)
    f = flags.FLAGS
    if not f.workdir:
        cli.fail("--workdir is required")
    if f.max_new_tokens <= 0 or f.temperature < 0 or f.top_k < 0:
        cli.fail("--max_new_tokens must be positive, --temperature and --top_k non-negative")

    def body():
        from train_lib import checkpointing
        from train_lib.lm import decoding

        run = checkpointing.restore_params(f.workdir, use_ema=f.use_ema, command=COMMAND)
        check_request(run.task, prompt_length=len(f.prompt.encode("utf-8")) or 1, max_new_tokens=f.max_new_tokens,
                      top_k=f.top_k)
        text = decoding.sample_text(run.task.model, run.params, prompt=f.prompt, max_new_tokens=f.max_new_tokens,
                                    rng=jax.random.PRNGKey(f.seed), temperature=f.temperature, top_k=f.top_k)
        print(f"# checkpoint step {run.step} ({'EMA' if run.ema else 'raw'} parameters)\n{text}")

    cli.run_guarded(body)


if __name__ == "__main__":
    main(sys.argv)
