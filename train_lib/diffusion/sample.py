r"""Sample from a trained diffusion model, score it, and tabulate NLL and FCD over samplers and step counts.

  python -m train_lib.diffusion.sample --workdir=DIR --sampler=ddim --steps=50 --num=64   # PNG grid, FCD/KID
  python -m train_lib.diffusion.sample --workdir=DIR --nll --sampler=analytic_ddpm --steps=20  # NLL, test split
  python -m train_lib.diffusion.sample --workdir=DIR --table                               # K × sampler table

Samplers (`models.diffusion.samplers.SAMPLERS`): ddpm_beta, ddpm_beta_tilde, ddim (η from --eta),
analytic_ddpm, analytic_ddim (Bao et al., *Analytic-DPM*, arXiv 2201.06503). K steps are chosen from the
training schedule's T by --spacing (even | quadratic). The analytic samplers need Γₜ = E‖ε_θ(xₜ, t)‖²/d,
estimated once by Monte Carlo over training images and cached per checkpoint in
`DIR/analytic_gamma_<step>.npz` (one entry per timestep; later runs estimate only timesteps not yet there).

For digits, samples are scored by FCD and KID against the test split, next to the same distances between
the real train and test splits (the floor); see `train_lib.sample_quality`. The NLL is the K-step bound
of `models.diffusion.likelihood` on the test split, with its prior, diffusion and reconstruction terms;
DDIM-type samplers have an NLL only for η > 0. Sample grids are named by checkpoint step, sampler, K,
number of samples and seed (`samples_<step>_<sampler>_k<K>_n<num>_seed<seed>.png`), so runs with other
settings never overwrite each other.

Two conventions on which implementations differ are switches (defaults: the run's `sample.*` keys):
`--eps_from_clipped_x0` (True, guided-diffusion's: ε̂ recomputed from the clipped x̂₀; False, the official
Analytic-DPM code's DDIM, which keeps the network's ε̂) and `--second_last_sigma_pixels` (0: off; the
official code caps the last noisy step's σ² at `samplers.pixel_sigma2_cap` of 2 grey levels for its
linear-schedule Analytic-DDPM and 1 for Analytic-DDIM and DDPM σ²=β, on 256 levels).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from models.diffusion import likelihood, samplers, schedules
from train_lib import cli, xla_flags
from train_lib.config_lib import ConfigError
from train_lib import sample_quality

COMMAND = "train_lib.diffusion.sample"

TABLE_SAMPLERS = ("ddpm_beta", "ddpm_beta_tilde", "analytic_ddpm", "ddim", "analytic_ddim")
TABLE_STEPS = (10, 25, 50, 100, 1000)
_NAMES = {"ddpm_beta": "DDPM σ²=β", "ddpm_beta_tilde": "DDPM σ²=β̃", "analytic_ddpm": "Analytic-DDPM",
          "ddim": "DDIM", "analytic_ddim": "Analytic-DDIM"}
_TERMS = ("total", "prior", "diffusion", "reconstruction")
_PAD_GREY = 96  # the lines between images in a PNG grid


# --------------------------------------------------------------------------------------------------
# Loading a trained model.
# --------------------------------------------------------------------------------------------------
def load_model(workdir: pathlib.Path, *, use_ema: bool):
    """(task, params, step, whether the params are the EMA's) of a diffusion run's newest checkpoint."""
    from train_lib import checkpointing

    run = checkpointing.restore_params(workdir, use_ema=use_ema, command=COMMAND)
    return run.task, run.params, run.step, run.ema


def _chunks(num: int, batch_size: int):
    """(start, stop) of `num` items in chunks of one size (the last padded), so one compilation serves all."""
    size = min(num, batch_size)
    return size, [(start, min(start + size, num)) for start in range(0, num, size)]


def _pad(array: np.ndarray, size: int) -> np.ndarray:
    return np.concatenate([array, np.repeat(array[-1:], size - len(array), axis=0)]) if len(array) < size else array


# --------------------------------------------------------------------------------------------------
# Analytic-DPM's Γ, estimated once per checkpoint and cached.
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class GammaCache:
    """Γₜ for t = 1..T of one checkpoint (NaN where not estimated yet), stored as `.npz` in the workdir.

    The cache is valid for the same schedule, prediction type, parameters (EMA or not), number of training
    images and seed; a file written for other settings is replaced.
    """

    path: pathlib.Path
    settings: dict[str, Any]
    estimated_now: int = 0  # timesteps estimated by the last `get` (0: all came from the file)

    def _read(self, num_timesteps: int) -> np.ndarray:
        if self.path.is_file():
            with np.load(self.path) as stored:
                if json.loads(str(stored["settings"])) == self.settings:
                    return np.array(stored["gamma"], np.float64)
        return np.full(num_timesteps, np.nan)

    def get(self, task, params, timesteps: np.ndarray, *, batch_size: int) -> np.ndarray:
        """Γ at `timesteps` (ints in 1..T) `[K]`, estimating (and saving) the ones the file lacks."""
        full = task.schedule
        gamma = self._read(full.num_timesteps)
        missing = np.unique(timesteps[np.isnan(gamma[timesteps - 1])])
        self.estimated_now = len(missing)
        if len(missing):
            data = task.data
            count = min(self.settings["images"], len(data.train_images))
            _, spans = _chunks(count, batch_size)  # a smaller last batch costs one more compilation, no bias
            batches = ((jnp.asarray(data.train_images[a:b]), task.labels_for_model(jnp.asarray(data.train_labels[a:b])))
                       for a, b in spans)
            schedule = schedules.schedule_at(full.name, full.num_timesteps, missing)
            estimate = samplers.estimate_gamma(task.denoiser, params, batches,
                                               jax.random.PRNGKey(self.settings["seed"]), schedule=schedule,
                                               prediction=task.prediction)
            gamma[missing - 1] = estimate
            tmp = self.path.with_suffix(".tmp.npz")
            np.savez(tmp, gamma=gamma, settings=json.dumps(self.settings, sort_keys=True))
            os.replace(tmp, self.path)  # atomic: a concurrent reader never sees half a file
        return gamma[timesteps - 1]


def gamma_cache(workdir: pathlib.Path, task, step: int, *, use_ema: bool, images: int, seed: int) -> GammaCache:
    name = f"analytic_gamma_{step}.npz" if use_ema else f"analytic_gamma_{step}_raw_params.npz"
    d = task.diffusion
    settings = {"schedule": d.schedule, "num_timesteps": d.num_timesteps, "prediction": d.prediction,
                "ema": use_ema, "images": images, "seed": seed}
    return GammaCache(workdir / name, json.loads(json.dumps(settings, sort_keys=True)))


# --------------------------------------------------------------------------------------------------
# Samples and likelihoods.
# --------------------------------------------------------------------------------------------------
def draw_samples(task, params, *, schedule, method: str, eta: float, gamma, num: int, batch_size: int, seed: int,
                 class_label: int | None, conventions: dict[str, Any]) -> np.ndarray:
    """`num` samples `[num, H, W, C]` in [−1, 1]; chunk j uses key fold_in(PRNGKey(seed), j) for every method.
    `conventions`: `clip_x0`, `eps_from_clipped_x0`, `second_last_sigma2_cap` of `samplers.sample`."""
    size, spans = _chunks(num, batch_size)
    labels = task.sample_labels(num, class_label)
    out = []
    for j, (a, b) in enumerate(spans):
        chunk_labels = None if labels is None else jnp.asarray(_pad(np.asarray(labels[a:b]), size))
        x = samplers.sample(task.denoiser, params, jax.random.fold_in(jax.random.PRNGKey(seed), j), schedule=schedule,
                            shape=(size,) + task.image_shape, method=method, eta=eta, gamma=gamma,
                            labels=chunk_labels, prediction=task.prediction, **conventions)
        out.append(np.asarray(x)[: b - a])
    return np.concatenate(out)


def nll_on_test_split(task, params, *, schedule, methods: dict[str, tuple[str, float]], gamma, batch_size: int,
                   seed: int, num_images: int = 0) -> dict[str, dict[str, float]]:
    """Mean NLL bits/dim {name: {total, prior, diffusion, reconstruction}} over the test split (all of it,
    or its first `num_images`), every sampler scored on the same draws."""
    data = task.data
    count = len(data.test_images) if num_images <= 0 else min(num_images, len(data.test_images))
    size, spans = _chunks(count, batch_size)
    sums = {name: dict.fromkeys(_TERMS, 0.0) for name in methods}
    for j, (a, b) in enumerate(spans):
        labels = task.labels_for_model(jnp.asarray(_pad(data.test_labels[a:b], size)))
        scores = likelihood.nll_bits_per_dim_of_samplers(
            task.denoiser, params, jnp.asarray(_pad(data.test_images[a:b], size)),
            jax.random.fold_in(jax.random.PRNGKey(seed), j), schedule=schedule, methods=methods, gamma=gamma,
            labels=labels, levels=task.levels, prediction=task.prediction)
        for name in methods:
            for term in _TERMS:
                sums[name][term] += float(np.sum(np.asarray(scores[name][term])[: b - a], dtype=np.float64))
    return {name: {term: value / count for term, value in terms.items()} for name, terms in sums.items()}


def sample_scorer(task, workdir: pathlib.Path):
    """FCD/KID against the test split for digits (classifier cached in the workdir); None for other data."""
    return sample_quality.digits_sample_quality(str(workdir)) if task.dataset == "digits" else None


def _has_nll(method: str, eta: float) -> bool:
    return samplers.SAMPLERS[method][0] != "ddim" or eta > 0


# --------------------------------------------------------------------------------------------------
# The K × sampler table.
# --------------------------------------------------------------------------------------------------
def run_table(task, params, step: int, workdir: pathlib.Path, *, steps_list, methods, eta: float, spacing: str,
              num: int, cache: GammaCache, batch_size: int, seed: int, conventions: dict[str, Any], log=print) -> str:
    """NLL bits/dim and FCD/KID for every K in `steps_list` and sampler in `methods`: markdown, also written to
    `workdir/table_<step>.md`, with 16 samples of each (sampler, K) in `workdir/table_samples_<step>.png`."""
    scorer = sample_scorer(task, workdir)
    nll_methods = {m: (m, eta) for m in methods if _has_nll(m, eta)}
    nll, quality, timings, grid = {}, {}, {}, []
    png = workdir / f"table_samples_{step}.png"
    for done, k in enumerate(steps_list, 1):
        schedule = schedules.respace(task.schedule, k, spacing)
        start = time.perf_counter()
        gamma = cache.get(task, params, np.asarray(schedule.timesteps), batch_size=batch_size)
        timings[(k, "gamma")] = (time.perf_counter() - start, cache.estimated_now)
        if nll_methods:
            start = time.perf_counter()
            nll[k] = nll_on_test_split(task, params, schedule=schedule, methods=nll_methods, gamma=gamma,
                                       batch_size=batch_size, seed=seed + 1)
            timings[(k, "nll")] = time.perf_counter() - start
            log(f"K={k}: NLL " + ", ".join(f"{m} {v['total']:.3f}" for m, v in nll[k].items())
                + f" bits/dim ({timings[(k, 'nll')]:.0f} s)")
        for method in methods:
            start = time.perf_counter()
            images = draw_samples(task, params, schedule=schedule, method=method, eta=eta, gamma=gamma, num=num,
                                  batch_size=batch_size, seed=seed, class_label=None, conventions=conventions)
            timings[(k, method)] = time.perf_counter() - start
            grid.append(images[:16])
            if scorer is not None:
                quality[(k, method)] = scorer.evaluate(images)
            log(f"K={k}: {method} sampled in {timings[(k, method)]:.0f} s" + (
                f", FCD {quality[(k, method)]['fcd']:.3f}, KID {quality[(k, method)]['kid']:.4f}" if scorer else ""))
        # Written after every K, so a long table that is stopped keeps the rows it finished.
        sample_quality.save_image_grid(np.concatenate(grid), str(png), ncols=16,
                                       scale=max(1, 32 // task.image_shape[0]), pad_value=_PAD_GREY)
        text = _table_markdown(task, step, steps_list=steps_list[:done], methods=methods, eta=eta, spacing=spacing,
                               num=num, cache=cache, nll=nll, quality=quality, timings=timings, png=png)
        (workdir / f"table_{step}.md").write_text(text)
    return text


def _table_markdown(task, step, *, steps_list, methods, eta, spacing, num, cache, nll, quality, timings, png) -> str:
    name = lambda m: _NAMES[m] + (f" η={eta:g}" if samplers.SAMPLERS[m][0] == "ddim" else "")  # noqa: E731
    header = "| sampler | " + " | ".join(f"K={k}" for k in steps_list) + " |\n|---|" + "---|" * len(steps_list)
    lines = [f"Checkpoint step {step} ({'EMA' if cache.settings['ema'] else 'raw'} parameters), {spacing} spacing "
             f"of T={task.schedule.num_timesteps}; Γ from {cache.settings['images']} training images.", "",
             f"NLL bound, bits/dim on the {len(task.data.test_images)} test images (— : undefined for η = 0):", "",
             header]
    for m in methods:
        cells = [f"{nll[k][m]['total']:.3f}" if k in nll and m in nll[k] else "—" for k in steps_list]
        lines.append(f"| {name(m)} | " + " | ".join(cells) + " |")
    best = [m for m in methods if all(k in nll and m in nll[k] for k in steps_list)]
    if best:
        lines += ["", "Terms of the NLL (prior + diffusion + reconstruction):", "", header]
        for m in best:
            cells = [" + ".join(f"{nll[k][m][t]:.3f}" for t in _TERMS[1:]) for k in steps_list]
            lines.append(f"| {name(m)} | " + " | ".join(cells) + " |")
    if quality:
        floor = next(iter(quality.values()))
        for metric, digits in (("fcd", 3), ("kid", 4)):
            lines += ["", f"{metric.upper()} of {num} samples vs the test split (floor, real train vs test: "
                      f"{floor[metric + '_floor']:.{digits}f}):", "", header]
            for m in methods:
                lines.append(f"| {name(m)} | " + " | ".join(f"{quality[(k, m)][metric]:.{digits}f}"
                                                            for k in steps_list) + " |")
    lines += ["", "Wall time (s): " + "; ".join(
        f"K={k}: Γ {timings[(k, 'gamma')][0]:.0f} ({timings[(k, 'gamma')][1]} new timesteps)"
        + (f", NLL {timings[(k, 'nll')]:.0f}" if (k, 'nll') in timings else "")
        + ", samples " + ", ".join(f"{m} {timings[(k, m)]:.0f}" for m in methods) for k in steps_list),
        "", f"Samples: {png.name}, 16 per row; rows are, for each K in order, the samplers in the order above."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------------
def _define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Training workdir (of a 'diffusion' run) whose newest checkpoint to use.")
    flags.DEFINE_string("sampler", None, f"One of {sorted(samplers.SAMPLERS)}; default: the run's sample.sampler.")
    flags.DEFINE_integer("steps", None, "K, the number of sampling steps; default: the run's sample.steps.")
    flags.DEFINE_float("eta", None, "DDIM's η (DDIM-type samplers); default: the run's sample.eta.")
    flags.DEFINE_string("spacing", None, f"How the K steps are chosen: {sorted(schedules.SPACINGS)}.")
    flags.DEFINE_integer("num", 64, "Number of samples (the PNG grid shows all of them).")
    flags.DEFINE_integer("class_label", None, "Class of every sample for a class-conditional model (-1: the "
                         "'no class' token); default: classes 0, 1, 2, … in turn.")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_bool("use_ema", True, "Use the EMA parameters when the run kept them.")
    flags.DEFINE_bool("clip_x0", None, "Clip x̂₀ to [−1, 1] while sampling; default: the run's sample.clip_x0.")
    flags.DEFINE_bool("eps_from_clipped_x0", None, "With clip_x0, recompute ε̂ from the clipped x̂₀ (False: keep the "
                      "network's, as Analytic-DPM's code); default: the run's sample.eps_from_clipped_x0.")
    flags.DEFINE_float("second_last_sigma_pixels", None, "Cap the last noisy step's σ² so that E|σz| is this many "
                       "grey levels (0: no cap; Analytic-DPM's code: 1 or 2); default: the run's "
                       "sample.second_last_sigma_pixels.")
    flags.DEFINE_integer("batch_size", 500, "Images per network call (samples, NLL and Γ batches).")
    flags.DEFINE_integer("gamma_images", None, "Training images for Γ; default: the run's sample.gamma_images.")
    flags.DEFINE_bool("nll", False, "Compute the NLL bound on the test split instead of sampling.")
    flags.DEFINE_integer("nll_images", 0, "Test images for --nll (0: all).")
    flags.DEFINE_bool("table", False, "Tabulate NLL and FCD for --table_steps × --table_samplers.")
    flags.DEFINE_list("table_steps", [str(k) for k in TABLE_STEPS], "Step counts K of the table.")
    flags.DEFINE_list("table_samplers", list(TABLE_SAMPLERS), "Samplers of the table.")
    flags.DEFINE_integer("table_num", 0, "Samples per table cell for FCD (0: as many as test images).")


def _settings(task):
    """The sampling settings: flags, else the run's `sample.*` (`task.sample_settings`)."""
    f, s = flags.FLAGS, task.sample_settings
    pick = lambda flag, default: default if flag is None else flag  # noqa: E731  (0 and False are values)
    return dict(sampler=pick(f.sampler, s.sampler), steps=pick(f.steps, s.steps), eta=pick(f.eta, s.eta),
                spacing=pick(f.spacing, s.spacing), clip_x0=pick(f.clip_x0, s.clip_x0),
                gamma_images=pick(f.gamma_images, s.gamma_images),
                eps_from_clipped_x0=pick(f.eps_from_clipped_x0, s.eps_from_clipped_x0),
                second_last_sigma_pixels=pick(f.second_last_sigma_pixels, s.second_last_sigma_pixels))


def _conventions(task, opts) -> dict[str, Any]:
    pixels = opts["second_last_sigma_pixels"]
    return dict(clip_x0=opts["clip_x0"], eps_from_clipped_x0=opts["eps_from_clipped_x0"],
                second_last_sigma2_cap=samplers.pixel_sigma2_cap(pixels, task.levels) if pixels > 0 else None)


def _validate(task, opts) -> None:
    f, total = flags.FLAGS, task.schedule.num_timesteps
    for method in ([opts["sampler"]] if not f.table else f.table_samplers):
        if method not in samplers.SAMPLERS:
            raise ConfigError(f"--sampler/--table_samplers: {method!r} is not one of {sorted(samplers.SAMPLERS)}")
    if opts["spacing"] not in schedules.SPACINGS:
        raise ConfigError(f"--spacing: {opts['spacing']!r} is not one of {sorted(schedules.SPACINGS)}")
    steps = [opts["steps"]] if not f.table else [int(k) for k in f.table_steps]
    if not all(1 <= k <= total for k in steps):
        raise ConfigError(f"--steps/--table_steps: every K must be in 1..{total} (the run's diffusion.num_timesteps), "
                          f"got {steps}")
    if opts["eta"] < 0 or opts["second_last_sigma_pixels"] < 0:
        raise ConfigError(f"--eta ({opts['eta']}) and --second_last_sigma_pixels ({opts['second_last_sigma_pixels']}) "
                          "must be non-negative")
    for name, value in (("--num", f.num), ("--batch_size", f.batch_size), ("--gamma_images", opts["gamma_images"])):
        if value <= 0:
            raise ConfigError(f"{name} must be positive, got {value}")
    if f.table_num < 0 or f.nll_images < 0:
        raise ConfigError(f"--table_num ({f.table_num}) and --nll_images ({f.nll_images}) must be non-negative "
                          "(0: all test images)")
    if f.nll and not _has_nll(opts["sampler"], opts["eta"]):
        raise ConfigError(f"--nll: sampler {opts['sampler']!r} with --eta={opts['eta']:g} has a deterministic "
                          "q, so its NLL is infinite; give --eta > 0 or a DDPM-type sampler")
    if f.class_label is not None:
        if task.num_classes == 0:
            raise ConfigError("--class_label: this run's model is unconditional (model.num_classes = 0)")
        if not -1 <= f.class_label < task.num_classes:
            raise ConfigError(f"--class_label must be in -1..{task.num_classes - 1}, got {f.class_label}")


def _body() -> None:
    f = flags.FLAGS
    workdir = pathlib.Path(f.workdir)
    task, params, step, ema = load_model(workdir, use_ema=f.use_ema)
    opts = _settings(task)
    _validate(task, opts)
    conventions = _conventions(task, opts)
    # Γ's Monte-Carlo draws follow the run's seed, not --seed: sampling with other seeds reuses the cache.
    cache = gamma_cache(workdir, task, step, use_ema=ema, images=opts["gamma_images"], seed=task.seed)
    print(f"# checkpoint step {step} ({'EMA' if ema else 'raw'} parameters)", flush=True)
    started = time.perf_counter()
    if f.table:
        text = run_table(task, params, step, workdir, steps_list=[int(k) for k in f.table_steps],
                         methods=list(f.table_samplers), eta=opts["eta"], spacing=opts["spacing"],
                         num=f.table_num or len(task.data.test_images), cache=cache, batch_size=f.batch_size,
                         seed=f.seed, conventions=conventions, log=lambda line: print(line, flush=True))
        print(f"\n{text}\ntable: {workdir / f'table_{step}.md'} ({time.perf_counter() - started:.0f} s)")
        return
    method, k = opts["sampler"], opts["steps"]
    schedule = schedules.respace(task.schedule, k, opts["spacing"])
    gamma = None
    if samplers.SAMPLERS[method][1] == "analytic":
        gamma = cache.get(task, params, np.asarray(schedule.timesteps), batch_size=f.batch_size)
        print(f"Γ: {cache.path} ({cache.estimated_now} timesteps estimated now, "
              f"{len(schedule.timesteps) - cache.estimated_now} read from the cache)")
    label = f"{method}, K={k} ({opts['spacing']} spacing)" + (f", η={opts['eta']:g}" if
                                                             samplers.SAMPLERS[method][0] == "ddim" else "")
    if f.nll:
        scores = nll_on_test_split(task, params, schedule=schedule, methods={method: (method, opts["eta"])},
                                   gamma=gamma, batch_size=f.batch_size, seed=f.seed, num_images=f.nll_images)[method]
        count = len(task.data.test_images) if f.nll_images <= 0 else min(f.nll_images, len(task.data.test_images))
        print(f"NLL bound of {label} on {count} test images: {scores['total']:.4f} bits/dim = prior "
              f"{scores['prior']:.4f} + diffusion {scores['diffusion']:.4f} + reconstruction "
              f"{scores['reconstruction']:.4f} ({time.perf_counter() - started:.0f} s)")
        return
    class_label = None if f.class_label is None else (task.num_classes if f.class_label == -1 else f.class_label)
    images = draw_samples(task, params, schedule=schedule, method=method, eta=opts["eta"], gamma=gamma, num=f.num,
                          batch_size=f.batch_size, seed=f.seed, class_label=class_label, conventions=conventions)
    elapsed = time.perf_counter() - started
    png = workdir / f"samples_{step}_{method}_k{k}_n{f.num}_seed{f.seed}.png"
    sample_quality.save_image_grid(images, str(png), scale=max(1, 32 // task.image_shape[0]), pad_value=_PAD_GREY)
    print(f"samples: {png} ({f.num} images, {label}, {elapsed:.1f} s)")
    scorer = sample_scorer(task, workdir)
    if scorer is not None:
        q = scorer.evaluate(images)
        print(f"FCD {q['fcd']:.4f} (floor, real train vs test: {q['fcd_floor']:.4f}); KID {q['kid']:.5f} (floor "
              f"{q['kid_floor']:.5f}); {f.num} samples vs {len(task.data.test_images)} test images")


def main(argv: list[str]) -> None:
    _define_flags()
    cli.parse_flags(argv)
    if not flags.FLAGS.workdir:
        cli.fail("--workdir is required")
    from train_lib.diffusion.task import DiffusionTask
    xla_flags.apply_defaults(DiffusionTask.xla_cpu_flags)  # before JAX starts a backend

    def guarded():
        try:
            _body()
        except ValueError as e:  # a library check (e.g. quadratic spacing cannot fit K steps) in one line
            if isinstance(e, ConfigError):
                raise
            cli.fail(" ".join(str(e).split()))

    cli.run_guarded(guarded)


if __name__ == "__main__":
    main(sys.argv)
