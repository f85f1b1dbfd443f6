r"""NVAE on digits: likelihood against depth, and what keeps training stable (post 7574), in one table.

Post 7574 ("强大的NVAE：以后再也不能说VAE生成的图像模糊了") and the NVAE paper (Vahdat & Kautz, arXiv
2007.03898, §3.2–3.3, Table 4) make two claims measured here on scikit-learn's 8×8 digits:
1. a deeper hierarchy — more latent groups — gives a better likelihood (the `likelihood` cells: 1, 2 and 4
   groups per scale, two scales, `experiments/nvae_digits.py` otherwise unchanged);
2. the residual normal posterior and spectral regularisation stabilise training (the `stability` cells: at
   learning rate 0.3, 30× the default, for 600 steps, the plain model, each stabiliser alone and both, over
   `config.seeds`; a run whose loss or gradient turns NaN/Inf stops there, as the trainer stops any run).

Each cell is a run of `experiments/nvae_digits.py` through the real trainer, then `train_lib.vae.evaluate` on the
360 test images: the negative ELBO and the IWAE bound (K = `config.importance_samples`) in bits/dim, active units,
and FCD of 360 samples at temperatures 1.0 and 0.6 (BN readjusted), for the likelihood cells.

Run (each cell trains into WORKDIR/<cell>/; finished and diverged cells are read back from results.json, so an
interrupted study resumes):

  python -m experiments.nvae_study --config.workdir=runs/nvae_study
  python -m experiments.nvae_study --config=experiments/nvae_study.py:quick     # seconds

Writes WORKDIR/results.json and WORKDIR/results.md (the tables).

Results (the first command, 2,418 s on a 2-core CPU; the full tables are experiments/figures/nvae_study_results.md
and the README's NVAE section): −ELBO / IWAE-1000 bits/dim 1.881 / 1.793 for one group per scale, 2.217 / 2.085
for two (two of its four groups inactive), and for four the KL exploded in the first 100 steps and did not
recover (2.3e5 bits/dim); FCD at t = 1.0 / 0.6: 10.77 / 22.31 and 25.39 / 41.55. At lr 0.3 every one of the 12
stability runs was NaN-free, the plain model included (mean −ELBO 1.939 plain, 1.960 spectral only, 2.062
residual only, 2.068 both): the grid found no divergence for the stabilisers to prevent.
"""
from __future__ import annotations

import json
import pathlib
import time

import jax
import ml_collections

from experiments import nvae_digits
from train_lib import config_lib

LIKELIHOOD_CELLS = {"groups1": "groups1", "groups2": "", "groups4": "groups4"}
STABILITY_CELLS = {"plain": "plain", "spectral_only": "no_residual", "residual_only": "no_spectral", "nvae": ""}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """None (the 2-core CPU study) or 'quick' (one cell of each kind, a few steps)."""
    config = ml_collections.ConfigDict()
    config.workdir = "runs/nvae_study"
    config.variant = "digits"  # of experiments/nvae_digits.py
    config.likelihood_cells = tuple(LIKELIHOOD_CELLS)
    config.stability_cells = tuple(STABILITY_CELLS)
    config.stability_presets = "lr3e1,short"
    config.seeds = (0, 1, 2)
    config.importance_samples = 1000
    config.num_samples = 360
    if arg == "quick":
        config.variant, config.likelihood_cells, config.stability_cells = "quick", ("groups1",), ("plain",)
        config.stability_presets, config.seeds, config.importance_samples, config.num_samples = "lr3e1", (0,), 4, 20
    elif arg is not None:
        raise ValueError(f"unknown variant {arg!r} of experiments/nvae_study.py; expected None or 'quick'")
    return config


def run_config(config, kind: str, cell: str, seed: int) -> ml_collections.ConfigDict:
    presets = LIKELIHOOD_CELLS[cell] if kind == "likelihood" else ",".join(
        p for p in (STABILITY_CELLS[cell], config.stability_presets) if p)
    run_cfg = nvae_digits.get_config(config.variant + (f",{presets}" if presets else ""))
    return config_lib.apply_overrides(run_cfg, {"seed": seed, "sample.report_samples": 0, "mesh.data": -1})


def cells(config):
    """(kind, cell, seed, name) of every run, likelihood cells first."""
    for cell in config.likelihood_cells:
        yield "likelihood", cell, 0, cell
    for cell in config.stability_cells:
        for seed in config.seeds:
            yield "stability", cell, seed, f"{cell}_seed{seed}"


def describe(run_cfg) -> str:
    m, v = run_cfg.model, run_cfg.vae
    return (f"{m.num_scales}×{m.groups_per_scale} groups, residual q {'yes' if m.residual_posterior else 'no'}, "
            f"λ_SR {v.spectral_coeff:g}, lr {run_cfg.optimizer.learning_rate:g}, {run_cfg.total_steps} steps")


def tables(config, results: dict) -> str:
    rows = ["| cell | groups | residual q | λ_SR | −ELBO bits/dim | IWAE bits/dim | active units (top first) | "
            "FCD t=1.0 | FCD t=0.6 |", "|---|---|---|---|---|---|---|---|---|"]
    for cell in config.likelihood_cells:
        r = results.get(cell)
        if r is None:
            continue
        run_cfg = run_config(config, "likelihood", cell, 0)
        if "diverged_at" in r:
            rows.append(f"| {cell} | {run_cfg.model.num_scales}×{run_cfg.model.groups_per_scale} | | | diverged at step "
                        f"{r['diverged_at']} | | | | |")
            continue
        k = max(r["iwae_bpd"], key=int)
        fcd = {t: e.get("fcd") for t, e in r.get("samples", {}).items()}
        fmt = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
        rows.append(f"| {cell} | {run_cfg.model.num_scales}×{run_cfg.model.groups_per_scale} | "
                    f"{'yes' if run_cfg.model.residual_posterior else 'no'} | {run_cfg.vae.spectral_coeff:g} | "
                    f"{r['nelbo_bpd']:.4f} | {r['iwae_bpd'][k]:.4f} (K={k}) | "
                    f"{'/'.join(map(str, r['active_units']))} of {'/'.join(map(str, r['latent_dims']))} | "
                    f"{fmt(fcd.get('1'))} | {fmt(fcd.get('0.6'))} |")
    stab = ["| cell | residual q | λ_SR | NaN-free runs | −ELBO bits/dim of each seed | diverged at step |",
            "|---|---|---|---|---|---|"]
    for cell in config.stability_cells:
        runs = [results.get(f"{cell}_seed{seed}") for seed in config.seeds]
        if any(r is None for r in runs):
            continue
        run_cfg = run_config(config, "stability", cell, 0)
        finite = [r for r in runs if "diverged_at" not in r]
        stab.append(f"| {cell} | {'yes' if run_cfg.model.residual_posterior else 'no'} | "
                    f"{run_cfg.vae.spectral_coeff:g} | {len(finite)} of {len(runs)} | "
                    + ", ".join("NaN" if "diverged_at" in r else f"{r['nelbo_bpd']:.3f}" for r in runs) + " | "
                    + (", ".join(str(r["diverged_at"]) for r in runs if "diverged_at" in r) or "—") + " |")
    stability_run = run_config(config, "stability", config.stability_cells[0], 0) if config.stability_cells else None
    header = (f"Stability ({describe(stability_run).split(', ', 3)[-1]}; seeds {', '.join(map(str, config.seeds))}):"
              if stability_run is not None else "")
    return "Likelihood and samples:\n\n" + "\n".join(rows) + (f"\n\n{header}\n\n" + "\n".join(stab) if header else "")


def run(config: ml_collections.ConfigDict) -> str:
    from train_lib import checkpointing, cli, trainer
    from train_lib.vae import evaluate

    config_lib.check_study(config, choices={"likelihood_cells": LIKELIHOOD_CELLS, "stability_cells": STABILITY_CELLS},
                           positive=("importance_samples",))
    for kind, cell, seed, _ in cells(config):  # every run's config is checked before the first one trains
        trainer.setup(run_config(config, kind, cell, seed))
    cli.setup_logging()
    start = time.time()
    root = pathlib.Path(config.workdir)
    root.mkdir(parents=True, exist_ok=True)
    results_path = root / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for kind, cell, seed, name in cells(config):
        if name in results:
            continue
        workdir = root / name
        began = time.time()
        try:
            trainer.train_and_evaluate(run_config(config, kind, cell, seed), str(workdir))
        except trainer.NonFiniteLossError as error:
            step = error.step
            results[name] = {"diverged_at": step, "seconds": time.time() - began}
            print(f"{name}: diverged at step {step}", flush=True)
            results_path.write_text(json.dumps(results, indent=2) + "\n")
            continue
        restored = checkpointing.restore_params(workdir, use_ema=False)
        likelihood = kind == "likelihood"
        r = evaluate.evaluate(restored.task, restored.params, restored.model_state, workdir, restored.step,
                              importance_samples=config.importance_samples if likelihood else 0, num_images=0,
                              temperatures=restored.task.sample_settings.temperatures,
                              num_samples=config.num_samples if likelihood else 0,
                              readjust_steps=restored.task.sample_settings.bn_readjust_steps, seed=0, batch_size=2000,
                              log=lambda line: print(f"{name}: {line}", flush=True))
        r["seconds"] = time.time() - began
        results[name] = r
        results_path.write_text(json.dumps(results, indent=2) + "\n")
    text = tables(config, results) + (f"\n\nTotal {time.time() - start:.0f} s on {jax.device_count()} "
                                      f"{jax.devices()[0].platform} device(s).")
    (root / "results.md").write_text(text + "\n")
    return text


if __name__ == "__main__":
    from train_lib import cli

    cli.run_study(__file__, run)
