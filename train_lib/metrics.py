"""Metric outputs of a run: `metrics.jsonl`, TensorBoard events and the console progress bar.

Only process 0 writes. Each line of `metrics.jsonl` is one JSON object with `step`, `split`
('train' or 'eval') and the metric values, so a run is read back with one line of pandas:
`pd.read_json('metrics.jsonl', lines=True)`.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import sys
from typing import Any

import tqdm


def _plain(value: Any) -> Any:
    value = float(value) if hasattr(value, "__float__") else value
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricsWriter:
    """Appends metrics to `workdir/metrics.jsonl` and `workdir/tensorboard/` (process 0 only)."""

    def __init__(self, workdir: pathlib.Path, *, enabled: bool):
        self.enabled = enabled
        self.path = workdir / "metrics.jsonl"
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter  # imported lazily: a heavy import other processes skip
            self._tb = SummaryWriter(str(workdir / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drops rows past `step`: after resuming from a checkpoint at `step` they would be logged twice."""
        if not self.enabled or not self.path.exists():
            return
        rows = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    rows.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):  # a line cut short by a kill
                continue
        partial = self.path.with_suffix(".jsonl.tmp")
        partial.write_text("".join(row + "\n" for row in rows))
        os.replace(partial, self.path)  # atomic: a kill leaves the old file or the new one

    def write(self, step: int, split: str, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "split": split, **{k: _plain(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if key not in ("step", "split") and isinstance(value, (int, float)):
                self._tb.add_scalar(f"{split}/{key}", value, step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class ProgressBar:
    """tqdm bar over steps with loss, step rate, throughput and ETA (process 0 only)."""

    def __init__(self, *, total: int, initial: int, unit: str, enabled: bool):
        interactive = sys.stderr.isatty()
        self._bar = tqdm.tqdm(total=total, initial=initial, unit="step", disable=not enabled, dynamic_ncols=True,
                              smoothing=0.1, mininterval=0.1 if interactive else 30.0)
        self._unit = unit
        self._enabled = enabled

    def update(self, steps: int = 1) -> None:
        self._bar.update(steps)

    def show(self, loss: float, throughput: float) -> None:
        self._bar.set_postfix_str(f"loss={loss:.4f} {self._unit}/s={throughput:,.0f}")

    def write(self, message: str) -> None:
        if self._enabled:  # tqdm.write prints even for a disabled bar
            self._bar.write(message)

    def close(self) -> None:
        self._bar.close()


def read_metrics(workdir: pathlib.Path) -> list[dict[str, Any]]:
    """The rows of `workdir/metrics.jsonl` (a line cut short by a kill is skipped)."""
    rows = []
    path = pathlib.Path(workdir) / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_curves(workdir: pathlib.Path) -> pathlib.Path | None:
    """Draws the train loss and every eval metric against the step into `workdir/curves.png` (replaced
    atomically); None if nothing is logged yet. Process 0 calls it at each evaluation and at the end."""
    rows = read_metrics(workdir)
    train = [r for r in rows if r.get("split") == "train" and r.get("loss") is not None]
    evals = [r for r in rows if r.get("split") == "eval"]
    if not train:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({k for r in evals for k, v in r.items() if k not in ("step", "split") and not k.startswith("ema_")
                    and isinstance(v, (int, float))})
    fig, axes = plt.subplots(1, 1 + len(names), figsize=(4.2 * (1 + len(names)), 3.2), squeeze=False)
    axes = axes[0]
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], lw=1)
    axes[0].set_title("train loss")
    for ax, name in zip(axes[1:], names):
        for key, label in ((name, "raw"), (f"ema_{name}", "EMA")):
            points = [(r["step"], r[key]) for r in evals if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", ms=3, label=label)
        ax.set_title(f"eval {name}")
        ax.legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = pathlib.Path(workdir) / "curves.png"
    partial = path.with_suffix(".tmp.png")
    fig.savefig(partial, dpi=80)
    plt.close(fig)
    os.replace(partial, path)
    return path
