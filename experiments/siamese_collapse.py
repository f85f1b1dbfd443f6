r"""What keeps SimSiam and BYOL from collapsing? The grid of post 7980, measured on 8×8 digits.

Post 7980 ("从动力学角度看SimSiam") argues that a Siamese network trained without negatives avoids the
collapsed solution (every image → the same output) because of how gradient descent moves it, not because the
objective rules collapse out: the stop-gradient and the predictor shape the dynamics, and a predictor that is
optimised "too well" at every step should let the network collapse. SimSiam (arXiv 2011.10566) found that
removing the stop-gradient or the predictor collapses; BYOL (arXiv 2006.07733) adds an EMA target network;
DirectPred (arXiv 2102.06810) sets the predictor in closed form and reports no collapse.

Each cell is one run of `experiments/simsiam_digits.py` through the real trainer (2,000 steps of batch 256,
SGD or AdamW), evaluated on the 360 test images (`train_lib.selfsup.probe`): the collapse diagnostics — std of
the ℓ2-normalised projector output z (healthy ≈ 1/√d = 0.125 for d = 64; the table gives std·√d, 1 healthy,
0 collapsed) and the effective ranks of z (of 64) and of the representation h (of 256) — and the linear-probe
and 10-NN accuracies of h, with 10-NN on z. A run has collapsed completely when std·√d < 0.25, dimensionally
when the effective rank of z is below d/8 = 8 (batch normalisation on z keeps every dimension's variance, so
only the rank shows it). Two rows without training give the scale: raw pixels and the untrained network.

Run (each cell trains into WORKDIR/<cell>/; finished cells are reused, so an interrupted study resumes):

  python -m experiments.siamese_collapse --config.workdir=runs/siamese_collapse
  python -m experiments.siamese_collapse --config=experiments/siamese_collapse.py:quick   # seconds

Writes WORKDIR/results.json and results.md (the table).

Result (2-core CPU, 2026-12-03, 17 min; the table is in README "SimSiam and BYOL"): without
the stop-gradient or the predictor every run without BN on z collapsed completely (std·√d 0.01–0.09, z of rank
2–6, loss −0.999 to −1.000, its global minimum), with SGD and with Adam, with BYOL's EMA target or without it; SimSiam and BYOL with the learnt predictor
stayed spread (0.82–0.89) at losses of −0.76 to −0.87. The closed-form predictor did not collapse: it gave the
most spread outputs (0.99, rank 54). With BN on z and no stop-gradient the std stayed at 0.36 while the rank fell
to 5.6 (dimensional collapse). The linear probe on h read 95.0–98.3% everywhere (raw pixels 96.7%); 10-NN on z
separated collapsed (81–87%) from healthy (90–97%) runs.
"""
from __future__ import annotations

import json
import pathlib
import time

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from experiments import simsiam_digits
from train_lib import config_lib

# cell → the presets of experiments/simsiam_digits.py that make it (the table's columns are read from its config).
CELLS = {
    "simsiam": "",
    "simsiam_adam": "adam",
    "no_stop_gradient": "no_stop_gradient",
    "no_stop_gradient_adam": "no_stop_gradient,adam",
    "no_predictor": "no_predictor",
    "no_predictor_adam": "no_predictor,adam",
    "simsiam_closed_form": "closed_form_predictor",
    "byol": "byol",
    "byol_adam": "byol,adam",
    "byol_no_predictor": "byol,no_predictor",
    "byol_no_predictor_adam": "byol,no_predictor,adam",
    "byol_closed_form": "byol,closed_form_predictor",
    "no_stop_gradient_output_norm": "no_stop_gradient,output_norm",
}
_PREDICTORS = {"mlp": "MLP", "none": "none", "closed_form": "closed form"}
_OPTIMISERS = {"sgd": "SGD", "adamw": "Adam"}
COLLAPSED_BELOW = 0.25  # std·√d of the normalised outputs: complete collapse
DIMENSIONAL_BELOW = 1 / 8  # effective rank of z over d: dimensional collapse (the outputs span a few directions)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """None (the 2-core CPU study, ~17 minutes) or 'quick' (three cells of a few steps)."""
    config = ml_collections.ConfigDict()
    config.workdir = "runs/siamese_collapse"
    config.variant = "digits"  # of experiments/simsiam_digits.py
    config.cells = tuple(CELLS)
    config.seed = 0
    if arg == "quick":
        config.variant, config.cells = "quick", ("simsiam", "no_predictor", "byol_closed_form")
    elif arg is not None:
        raise ValueError(f"unknown variant {arg!r} of experiments/siamese_collapse.py; expected None or 'quick'")
    return config


def run_config(config, cell: str) -> ml_collections.ConfigDict:
    presets = CELLS[cell]
    run_cfg = simsiam_digits.get_config(config.variant + (f",{presets}" if presets else ""))
    return config_lib.apply_overrides(run_cfg, {"seed": config.seed, "probe.final_report": False, "mesh.data": -1})


def columns(config, cell: str) -> tuple[str, str, float, str]:
    """(stop-gradient, predictor, EMA τ, optimiser) of a cell, as the table shows them."""
    run_cfg = run_config(config, cell)
    predictor = _PREDICTORS[run_cfg.model.predictor] + (", BN on z" if run_cfg.model.projector_output_norm else "")
    return ("yes" if run_cfg.siamese.stop_gradient else "no", predictor, run_cfg.siamese.target_decay,
            _OPTIMISERS[run_cfg.optimizer.name])


def baselines(config) -> dict[str, dict]:
    """Probe and k-NN of the raw pixels, and of the untrained SimSiam network (all diagnostics)."""
    from train_lib import registry
    from train_lib.selfsup import probe

    task = registry.make_task(run_config(config, "simsiam"))
    data = task.data
    flat = lambda x: x.reshape(len(x), -1)  # noqa: E731
    k = task.probe.knn_k
    pixels = {"linear_probe_accuracy": probe.linear_probe_accuracy(flat(data.train_images), data.train_labels,
                                                                   flat(data.test_images), data.test_labels),
              "knn_accuracy": probe.knn_accuracy(flat(data.train_images), data.train_labels, flat(data.test_images),
                                                 data.test_labels, k=k)}
    spec = {name: np.zeros(v.shape, v.dtype) for name, v in task.batch_spec(2).items()}
    params = nn.unbox(task.init_params(jax.random.PRNGKey(config.seed), spec))
    return {"raw pixels": pixels, "untrained network": probe.evaluate(task, params)}


def table(config, results: dict) -> str:
    def pct(value):
        return "—" if value is None else f"{100 * value:.1f}"

    lines = ["| cell | stop-gradient | predictor | EMA τ | optimiser | final loss | std·√d of z | rank of z | "
             "rank of h | collapsed | linear probe % | 10-NN on h % | 10-NN on z % |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["baselines"].items():
        diag = [f"{r['output_std'] / r['output_std_healthy']:.3f}", f"{r['output_rank']:.1f}",
                f"{r['representation_rank']:.1f}"] if "output_std" in r else ["—", "—", "—"]
        lines.append(f"| {name} | — | — | — | — | — | " + " | ".join(diag) + " | — | "
                     f"{pct(r['linear_probe_accuracy'])} | {pct(r['knn_accuracy'])} | "
                     f"{pct(r.get('knn_accuracy_projection'))} |")
    for cell in config.cells:
        r = results["cells"].get(cell)
        if r is None:
            continue
        stop, predictor, tau, optimiser = columns(config, cell)
        ratio = r["output_std"] / r["output_std_healthy"]
        d = round(1 / r["output_std_healthy"] ** 2)
        collapsed = "yes" if ratio < COLLAPSED_BELOW else "dimensional" if r["output_rank"] < DIMENSIONAL_BELOW * d else "no"
        lines.append(f"| {cell} | {stop} | {predictor} | {tau:g} | {optimiser} | {r['final_loss']:.3f} | {ratio:.3f} | "
                     f"{r['output_rank']:.1f} | {r['representation_rank']:.1f} | "
                     f"{collapsed} | {pct(r['linear_probe_accuracy'])} | "
                     f"{pct(r['knn_accuracy'])} | {pct(r['knn_accuracy_projection'])} |")
    return "\n".join(lines)


def final_train_loss(workdir: pathlib.Path) -> float:
    """The last logged training loss of a run (metrics.jsonl)."""
    from train_lib import metrics

    return float([r["loss"] for r in metrics.read_metrics(workdir) if r.get("split") == "train" and "loss" in r][-1])


def run(config: ml_collections.ConfigDict) -> str:
    from train_lib import checkpointing, cli, trainer
    from train_lib.selfsup import probe

    config_lib.check_study(config, choices={"cells": CELLS})
    for cell in config.cells:  # every run's config is checked before the first one trains
        trainer.setup(run_config(config, cell))
    cli.setup_logging()
    start = time.time()
    root = pathlib.Path(config.workdir)
    root.mkdir(parents=True, exist_ok=True)
    results = {"baselines": baselines(config), "cells": {}}
    for cell in config.cells:
        workdir = root / cell
        began = time.time()
        trainer.train_and_evaluate(run_config(config, cell), str(workdir))
        restored = checkpointing.restore_params(workdir, use_ema=False)
        r = {**probe.evaluate(restored.task, restored.params), "final_loss": final_train_loss(workdir),
             "seconds": time.time() - began}
        results["cells"][cell] = r
        print(f"{cell}: std·√d {r['output_std'] / r['output_std_healthy']:.3f}, probe "
              f"{r['linear_probe_accuracy']:.3f} ({r['seconds']:.0f} s)", flush=True)
        (root / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = table(config, results) + (f"\n\nTotal {time.time() - start:.0f} s on {jax.device_count()} "
                                     f"{jax.devices()[0].platform} device(s).")
    (root / "results.md").write_text(text + "\n")
    return text


if __name__ == "__main__":
    from train_lib import cli

    cli.run_study(__file__, run)
