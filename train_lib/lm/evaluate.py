"""Evaluate a language-model checkpoint at many sequence lengths, and draw its attention maps.

  python -m train_lib.lm.evaluate --workdir DIR --lengths 64,128,256,512,1024,2048
  python -m train_lib.lm.evaluate --workdir DIR --lengths 128 --attention_png DIR/attention.png

For each length L the validation stream is cut into non-overlapping windows of L bytes (plus the
shifted target), the first `--max_tokens` bytes' worth of them, and the task's own eval statistics are
summed over them: for 'lm' bits per byte and next-byte accuracy, for 'mlm' the same on masked bytes.
Every length sees (nearly) the same bytes, so the rows differ only in the context the model has. The
table goes to stdout, and with `--output` to a JSON file. It uses the run's EMA parameters when it kept
them (`--use_ema=False` for the raw ones) and says which.
"""
from __future__ import annotations

import json
import pathlib
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from train_lib import cli, memory
from train_lib.config_lib import ConfigError

COMMAND = "train_lib.lm.evaluate"


def check_lengths(task, lengths: list[int]) -> None:
    """Raises ConfigError if a length is not positive or the model's position encoding cannot cover it."""
    if not lengths or any(n <= 0 for n in lengths):
        raise ConfigError(f"--lengths must be positive integers, got {lengths}")
    longest = task.longest_sequence
    too_long = [n for n in lengths if longest is not None and n > longest]
    if too_long:
        raise ConfigError(f"--lengths: {too_long} cannot be evaluated: model.position="
                          f"{task.model_config.position!r} covers at most {longest} positions")


def evaluate_lengths(task, params, lengths: list[int], *, stream: np.ndarray, max_tokens: int = 65536,
                     batch_tokens: int = 8192) -> list[dict[str, float]]:
    """One row per length: {'length', 'windows', 'tokens', and the task's eval metrics}.

    Args:
      task: a `train_lib.lm` task (its `eval_sums` and `summarize_eval` define the metrics).
      params: the model parameters.
      lengths: sequence lengths to evaluate at.
      stream: uint8 `[num_bytes]` validation bytes.
      max_tokens: bytes per length (rounded down to whole batches, at least one window).
      batch_tokens: bytes per batch (at least one window per batch).
    """
    from train_lib.lm import data as data_lib
    check_lengths(task, lengths)
    rows = []
    for length in lengths:
        windows = data_lib.TokenWindows(stream, length)
        if len(windows) == 0:
            raise ConfigError(f"--lengths: the validation text ({stream.size} bytes) is shorter than {length}")
        batch = max(1, min(len(windows), batch_tokens // length))
        num_batches = max(1, min(len(windows), max_tokens // length) // batch)
        spec = {"tokens": jax.ShapeDtypeStruct((batch, length + 1), jnp.int32)}
        eval_step = jax.jit(task.eval_sums).lower(params, spec).compile()
        memory.check_fits(eval_step, what=f"--lengths: evaluating at length {length} ({batch} windows per batch)",
                          hint="give shorter --lengths or a smaller --batch_tokens")
        sums = None
        for j in range(num_batches):
            tokens = np.stack([windows[j * batch + i] for i in range(batch)])
            batch_sums = eval_step(params, {"tokens": jnp.asarray(tokens)})
            sums = batch_sums if sums is None else jax.tree.map(jnp.add, sums, batch_sums)
        metrics = task.summarize_eval({k: float(v) for k, v in jax.device_get(sums).items()})
        rows.append({"length": length, "windows": batch * num_batches, "tokens": batch * num_batches * length,
                     **{k: float(v) for k, v in metrics.items()}})
    return rows


def format_table(rows: list[dict[str, float]]) -> str:
    """A Markdown table of `evaluate_lengths` rows."""
    keys = [k for k in ("length", "bits_per_byte", "accuracy", "loss", "tokens") if k in rows[0]]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(f"{row[k]:.4f}" if isinstance(row[k], float) else str(row[k])
                                       for k in keys) + " |")
    return "\n".join(lines)


def block_diagonal(chunks: np.ndarray) -> np.ndarray:
    """FLASH's local weights `[G, C, C]` as the `[G·C, G·C]` matrix they are blocks of (zeros elsewhere)."""
    g, c, _ = chunks.shape
    full = np.zeros((g * c, g * c), chunks.dtype)
    for i in range(g):
        full[i * c:(i + 1) * c, i * c:(i + 1) * c] = chunks[i]
    return full


def capture_attention(model: nn.Module, params: Any, tokens: jax.Array) -> dict[str, np.ndarray]:
    """Attention maps `[n, n]` of the first example, per layer, from the layers' `self.sow` calls.

    GAU layers sow their full weights; FLASH layers their local (in-chunk) weights, shown as a block
    diagonal. The Performer sows nothing (it never forms the weights).
    """
    _, state = model.apply({"params": params}, tokens, mutable=["intermediates"])
    maps = {}
    for name, values in state.get("intermediates", {}).items():
        if "attention_weights" not in values:
            continue
        weights = np.asarray(values["attention_weights"][0], np.float32)
        if name == "layers":  # model.scan_layers: one array with a leading layer axis
            per_layer = {f"layer_{i}": w[0] for i, w in enumerate(weights)}
        else:
            per_layer = {name: weights[0]}
        for layer, w in per_layer.items():
            w = block_diagonal(w) if w.ndim == 3 else w
            maps[layer] = w[:tokens.shape[1], :tokens.shape[1]]
    return dict(sorted(maps.items(), key=lambda item: int(item[0].rsplit("_", 1)[-1])))


def plot_attention_maps(maps: dict[str, np.ndarray], path: str | pathlib.Path, *, title: str = "") -> pathlib.Path:
    """Writes one heat map per layer (query rows, key columns) to the PNG `path`, with matplotlib's Agg."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not maps:
        raise ValueError("no attention maps to plot (a Performer model forms no attention weights)")
    cols = min(4, len(maps))
    rows = -(-len(maps) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (name, weights) in zip(axes.flat, maps.items()):
        image = ax.imshow(weights, cmap="viridis", interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        fig.colorbar(image, ax=ax, fraction=0.046)
    for ax in list(axes.flat)[len(maps):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str]) -> None:
    flags.DEFINE_string("workdir", None, "Training workdir whose newest checkpoint to evaluate.")
    flags.DEFINE_list("lengths", None, "Comma-separated sequence lengths, e.g. 64,128,256.")
    flags.DEFINE_integer("max_tokens", 65536, "Validation bytes evaluated per length.")
    flags.DEFINE_integer("batch_tokens", 8192, "Bytes per evaluation batch.")
    flags.DEFINE_bool("use_ema", True, "Evaluate the EMA parameters when the run kept them (False: the raw ones).")
    flags.DEFINE_string("output", None, "Optional JSON file for the results.")
    flags.DEFINE_string("attention_png", None, "Optional PNG of the attention maps on the first validation window.")
    cli.parse_flags(argv)
    f = flags.FLAGS
    if not f.workdir or not f.lengths:
        cli.fail("--workdir and --lengths are required, e.g. --workdir=runs/x --lengths=64,128,256")
    try:
        lengths = [int(n) for n in f.lengths]
    except ValueError:
        cli.fail(f"--lengths must be comma-separated integers, got {','.join(f.lengths)!r}")
    if any(n <= 0 for n in lengths):
        cli.fail(f"--lengths must be positive integers, got {','.join(f.lengths)}")
    if f.max_tokens <= 0 or f.batch_tokens <= 0:
        cli.fail("--max_tokens and --batch_tokens must be positive")

    def body():
        from train_lib import checkpointing
        from train_lib.lm import data as data_lib
        run = checkpointing.restore_params(f.workdir, use_ema=f.use_ema, command=COMMAND)
        task, params, step = run.task, run.params, run.step
        check_lengths(task, lengths)
        stream = data_lib.load_text(task.data_path).validation
        rows = evaluate_lengths(task, params, lengths, stream=stream, max_tokens=f.max_tokens,
                                batch_tokens=f.batch_tokens)
        print(f"# checkpoint step {step} ({'EMA' if run.ema else 'raw'} parameters), {f.workdir}")
        print(format_table(rows))
        if f.output:
            pathlib.Path(f.output).write_text(json.dumps({"step": step, "rows": rows}, indent=2) + "\n")
        if f.attention_png:
            window = jnp.asarray(stream[:lengths[0]].astype(np.int32))[None]
            maps = capture_attention(task.model, params, window)
            if not maps:
                raise ConfigError(f"--attention_png: model.attention={task.model_config.attention!r} forms no "
                                  "attention weights to draw")
            plot_attention_maps(maps, f.attention_png, title=f"{f.workdir} step {step}, length {lengths[0]}")
            print(f"attention maps: {f.attention_png}")

    cli.run_guarded(body)


if __name__ == "__main__":
    main(sys.argv)
