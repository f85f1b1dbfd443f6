r"""Evaluate a trained NVAE: the importance-weighted bound, active units, and samples at several temperatures.

  python -m train_lib.vae.evaluate --workdir=DIR                          # IWAE-1000, AU, FCD at 1.0 and 0.6
  python -m train_lib.vae.evaluate --workdir=DIR --importance_samples=1 --num_samples=0   # the ELBO alone

On the test split (all of it unless --num_images):
- the negative ELBO with the analytic KL (β = 1), split into reconstruction and the KL of every group;
- the importance-weighted bound (IWAE; Burda et al., arXiv 1509.00519, Eq. 8):
  log p(x) ≥ E[log (1/K) Σ_k p(x, z_k)/q(z_k|x)], z_k ~ q(z|x) independently, K = --importance_samples. It is
  the single-sample ELBO at K = 1 and rises towards log p(x) with K (Burda et al., Theorem 1); the bits/dim is
  −log₂ of the bound over the pixels, in the convention of the diffusion likelihoods (bins x ± 1/(L−1));
- active units per group (Burda et al. §5.2): latent dimensions whose posterior mean varies over the split,
  Var_x(E_q[z|x]) > 0.01 (one draw of the ancestors for the groups below the top);
- for each temperature t (--temperatures, default the run's `sample.temperatures`): samples with
  z = μ_p + t·σ_p·ε after BatchNorm's statistics are readjusted to sampling at t (NVAE §5: --bn_readjust_steps
  passes in training mode), FCD and KID against the test split for digits (`train_lib.sample_quality`, next to
  the real train-vs-test floor), and a PNG grid in the workdir.

BatchNorm runs on its running statistics everywhere except the readjusting passes, so every image's bound is
independent of the others in its batch.
"""
from __future__ import annotations

import functools
import json
import math
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from models import nvae
from train_lib import cli, sample_quality
from train_lib.config_lib import ConfigError

COMMAND = "train_lib.vae.evaluate"
ACTIVE_THRESHOLD = 0.01
_PAD_GREY = 96


def _pad(array: np.ndarray, size: int) -> np.ndarray:
    return np.concatenate([array, np.repeat(array[-1:], size - len(array), axis=0)]) if len(array) < size else array


@functools.lru_cache(maxsize=8)
@functools.lru_cache(maxsize=8)
def _forward_fn(task):
    """The model's outputs on `[N, ...]` images, BN on its running statistics (jitted once per task)."""
    return jax.jit(lambda variables, x, key: task.model.apply(variables, x, train=False, rngs={"sample": key}))


def log_weights(task, params, model_state, images: np.ndarray, key: jax.Array, *, num_samples: int,
                batch_size: int = 2000) -> np.ndarray:
    """log p(x, z_k) − log q(z_k|x) `[N, K]` (nats) for K = `num_samples` independent posterior draws per image.

    Draw k of the images in chunk c (`batch_size` images at a time) comes from the key
    fold_in(fold_in(key, c), k), so chunks draw independent noise, and for the same images and `batch_size` the
    first K′ columns of a larger K are the K′-sample call's: bounds at K′ ≤ K read from one call use nested samples.
    """
    images = np.asarray(images, np.float32)
    n = len(images)
    per_call = max(1, min(n, batch_size))
    forward = _forward_fn(task)
    variables = task.variables(params, model_state)
    weights = np.zeros((n, num_samples), np.float64)
    for c, start in enumerate(range(0, n, per_call)):
        chunk = jnp.asarray(_pad(images[start:start + per_call], per_call))
        chunk_key = jax.random.fold_in(key, c)
        for k in range(num_samples):
            out = forward(variables, chunk, jax.random.fold_in(chunk_key, k))
            w = np.asarray(out["log_px"] + out["log_p"] - out["log_q"], np.float64)
            weights[start:start + per_call, k] = w[: min(per_call, n - start)]
    return weights


def iwae_bits_per_dim(weights: np.ndarray, dims: int, ks=None) -> dict[int, float]:
    """{K: the mean over images of −log₂((1/K) Σ_{k<K} w_k)/dims} from log weights `[N, K_max]`, for each K in
    `ks` (default: K_max alone)."""
    ks = ks or (weights.shape[1],)
    result = {}
    for k in ks:
        w = weights[:, :k]
        peak = w.max(axis=1, keepdims=True)
        log_mean = (peak[:, 0] + np.log(np.mean(np.exp(w - peak), axis=1)))
        result[int(k)] = float(-np.mean(log_mean) / (dims * math.log(2.0)))
    return result


def elbo_terms(task, params, model_state, images: np.ndarray, key: jax.Array, *, batch_size: int = 2000) -> dict:
    """Mean negative ELBO (analytic KL, β = 1) in bits/dim, its reconstruction and KL parts, each group's KL in
    nats per image, and the posterior means of every group `[N, dims_g]` (for the active units)."""
    images = np.asarray(images, np.float32)
    n = len(images)
    size = max(1, min(n, batch_size))
    forward = _forward_fn(task)
    variables = task.variables(params, model_state)
    recon, kl, means = [], [], []
    for i, start in enumerate(range(0, n, size)):
        out = forward(variables, jnp.asarray(_pad(images[start:start + size], size)), jax.random.fold_in(key, i))
        keep = min(size, n - start)
        recon.append(-np.asarray(out["log_px"], np.float64)[:keep])
        kl.append(np.asarray(out["kl"], np.float64)[:keep])
        means.append([np.asarray(m, np.float64)[:keep] for m in out["posterior_mean"]])
    recon, kl = np.concatenate(recon), np.concatenate(kl)
    to_bpd = 1.0 / (task.dims * math.log(2.0))
    return {"nelbo_bpd": float(np.mean(recon + kl.sum(1)) * to_bpd), "recon_bpd": float(np.mean(recon) * to_bpd),
            "kl_bpd": float(np.mean(kl.sum(1)) * to_bpd), "kl_per_group": [float(v) for v in kl.mean(0)],
            "posterior_means": [np.concatenate([m[g] for m in means]) for g in range(kl.shape[1])]}


def active_units(posterior_means, threshold: float = ACTIVE_THRESHOLD) -> list[int]:
    """Per group, the latent dimensions whose posterior mean has variance above `threshold` over the images."""
    return [int(np.sum(np.var(m, axis=0) > threshold)) for m in posterior_means]


def evaluate(task, params, model_state, workdir: pathlib.Path, step: int, *, importance_samples: int,
             num_images: int, temperatures, num_samples: int, readjust_steps: int, seed: int, batch_size: int,
             log=print) -> dict:
    """Everything the CLI prints, as a dict (and PNG grids of the samples in `workdir`)."""
    data = task.data
    test = data.test_images if num_images <= 0 else data.test_images[:num_images]
    key = jax.random.PRNGKey(seed)
    started = time.perf_counter()
    terms = elbo_terms(task, params, model_state, test, jax.random.fold_in(key, 0), batch_size=batch_size)
    dims = nvae.latent_dims_per_group(task.model_config)
    results = {"step": step, "test_images": len(test), "latent_dims": list(dims),
               **{k: v for k, v in terms.items() if k != "posterior_means"},
               "active_units": active_units(terms["posterior_means"])}
    log(f"negative ELBO {results['nelbo_bpd']:.4f} bits/dim (reconstruction {results['recon_bpd']:.4f} + KL "
        f"{results['kl_bpd']:.4f}) on {len(test)} test images ({time.perf_counter() - started:.0f} s)")
    if importance_samples > 0:
        started = time.perf_counter()
        weights = log_weights(task, params, model_state, test, jax.random.fold_in(key, 1),
                              num_samples=importance_samples, batch_size=batch_size)
        ks = sorted({k for k in (1, 10, 100, 1000) if k < importance_samples} | {importance_samples})
        results["iwae_bpd"] = {str(k): v for k, v in iwae_bits_per_dim(weights, task.dims, ks).items()}
        log(f"IWAE bound: " + ", ".join(f"K={k} {v:.4f}" for k, v in results["iwae_bpd"].items())
            + f" bits/dim ({time.perf_counter() - started:.0f} s)")
    if num_samples > 0:
        scorer = sample_quality.digits_sample_quality(str(workdir)) if task.dataset == "digits" else None
        results["samples"] = {}
        for t in temperatures:
            started = time.perf_counter()
            images = task.draw_samples(params, model_state, jax.random.fold_in(key, 2), num=num_samples,
                                       temperature=float(t), readjust_steps=readjust_steps)
            png = workdir / f"samples_{step}_t{float(t):g}_n{num_samples}_seed{seed}.png"
            sample_quality.save_image_grid(images[:256], str(png), scale=max(1, 32 // task.image_shape[0]),
                                           pad_value=_PAD_GREY)
            entry = {"png": str(png)}
            if scorer is not None:
                entry.update(scorer.evaluate(images))
            results["samples"][f"{float(t):g}"] = entry
            quality = (f"FCD {entry['fcd']:.3f} (floor {entry['fcd_floor']:.3f}), KID {entry['kid']:.5f}"
                       if scorer is not None else "")
            log(f"temperature {float(t):g}: {quality}; {png} ({time.perf_counter() - started:.0f} s)")
    return results


def format_groups(results: dict) -> str:
    lines = ["| group (top first) | latent dims | KL (nats/image) | active units |", "|---|---|---|---|"]
    for g, (d, kl, au) in enumerate(zip(results["latent_dims"], results["kl_per_group"], results["active_units"])):
        lines.append(f"| {g} | {d} | {kl:.3f} | {au} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    flags.DEFINE_string("workdir", None, "Training workdir of a 'vae' run whose newest checkpoint to evaluate.")
    flags.DEFINE_integer("importance_samples", 1000, "K of the importance-weighted bound (0: skip it).")
    flags.DEFINE_integer("num_images", 0, "Test images for the bounds (0: all).")
    flags.DEFINE_list("temperatures", None, "Sampling temperatures; default: the run's sample.temperatures.")
    flags.DEFINE_integer("num_samples", 360, "Samples per temperature for FCD/KID (0: no samples).")
    flags.DEFINE_integer("bn_readjust_steps", None, "BN readjusting passes before sampling; default: the run's "
                         "sample.bn_readjust_steps.")
    flags.DEFINE_integer("seed", 0, "Seed of the posterior draws and the samples.")
    flags.DEFINE_integer("batch_size", 2000, "Images per network call.")
    flags.DEFINE_bool("use_ema", True, "The trainer's EMA parameters when the run kept them (ema_decay > 0).")
    flags.DEFINE_string("output", None, "Optional JSON file for the results.")
    cli.parse_flags(argv)
    f = flags.FLAGS
    if not f.workdir:
        cli.fail("--workdir is required, e.g. --workdir=runs/nvae_digits")

    def body():
        from train_lib import checkpointing

        for name in ("importance_samples", "num_images", "num_samples"):
            if getattr(f, name) < 0:
                raise ConfigError(f"--{name} must be non-negative, got {getattr(f, name)}")
        if f.batch_size < 1:
            raise ConfigError(f"--batch_size must be positive, got {f.batch_size}")
        try:
            temperatures = None if f.temperatures is None else [float(t) for t in f.temperatures]
        except ValueError:
            raise ConfigError(f"--temperatures: expected numbers, e.g. 1.0,0.6, got {','.join(f.temperatures)}")
        if temperatures is not None and not all(t > 0 for t in temperatures):
            raise ConfigError(f"--temperatures must be positive, got {temperatures}")
        if f.bn_readjust_steps is not None and f.bn_readjust_steps < 0:
            raise ConfigError(f"--bn_readjust_steps must be non-negative, got {f.bn_readjust_steps}")
        run = checkpointing.restore_params(f.workdir, use_ema=f.use_ema, command=COMMAND)
        task, s = run.task, run.task.sample_settings
        workdir = pathlib.Path(f.workdir)
        print(f"# checkpoint step {run.step} ({'EMA' if run.ema else 'raw'} parameters), {f.workdir}", flush=True)
        results = evaluate(task, run.params, run.model_state, workdir, run.step,
                           importance_samples=f.importance_samples, num_images=f.num_images,
                           temperatures=temperatures or list(s.temperatures), num_samples=f.num_samples,
                           readjust_steps=s.bn_readjust_steps if f.bn_readjust_steps is None else f.bn_readjust_steps,
                           seed=f.seed, batch_size=f.batch_size, log=lambda line: print(line, flush=True))
        print(format_groups(results))
        if f.output:
            pathlib.Path(f.output).write_text(json.dumps(results, indent=2) + "\n")

    cli.run_guarded(body)


if __name__ == "__main__":
    main(sys.argv)
