"""The denoising training loss: sample t, noise x₀, predict ε / x₀ / v, weight, per example.

    L = w_t · mean_d (target − output)²,  t ~ U{τ₁..τ_K},  xₜ = √ᾱₜ x₀ + √(1−ᾱₜ) ε
(posts 9119/9152, https://kexue.fm/archives/9119 and https://kexue.fm/archives/9152; Ho et al.,
arXiv 2006.11239, eq. 14).

Weightings (`WEIGHTINGS`):
- "simple": w = 1, the MSE on the network's own target (DDPM's L_simple for ε-prediction);
- "elbo": the Gaussian variational bound, K · β²/(2σ² α (1−ᾱ)) · mean_d ‖ε − ε̂‖² with σ² the clipped β̃
  (Ho et al., eq. 8–12), whatever the prediction type (ε̂ comes from `prediction.eps_and_x0`). Its
  expectation over t is Σ_t L_{t−1} in nats per dimension, up to the constant terms; for t ≥ 2 the
  weight equals ½ (SNR_{t−1} − SNR_t)(1−ᾱₜ)/ᾱₜ (Kingma et al., *VDM*, arXiv 2107.00630).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from models.diffusion import prediction as pred_lib
from models.diffusion.schedules import Schedule


def loss_weights(schedule: Schedule, weighting: str) -> jnp.ndarray:
    """The per-step weight w `[K]` of `weighting` (a key of `WEIGHTINGS`), including the factor K for "elbo"."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"Unknown loss weighting {weighting!r}; choose one of {sorted(WEIGHTINGS)}.")
    return WEIGHTINGS[weighting](schedule)


def _elbo_weights(schedule: Schedule) -> jnp.ndarray:
    sigma2 = jnp.exp(schedule.log_beta_tilde_clipped)
    kl_weight = jnp.square(schedule.beta) / (2.0 * sigma2 * schedule.alpha * schedule.one_minus_alpha_bar)
    return schedule.num_steps * kl_weight


WEIGHTINGS: dict[str, Callable[[Schedule], jnp.ndarray]] = {
    "simple": lambda schedule: jnp.ones_like(schedule.alpha_bar),
    "elbo": _elbo_weights,
}


def diffusion_loss(apply_fn, params, x0, rng, *, schedule: Schedule, prediction: str = "eps",
                   weighting: str = "simple", labels=None) -> jnp.ndarray:
    """Per-example denoising loss `[B]` for images `x0` `[B, H, W, C]` in [−1, 1].

    Args:
      apply_fn: `apply_fn(params, x_t, t, labels=labels, rngs={"dropout": key}) -> output`, e.g.
        `functools.partial(unet.apply, train=True)`; t `[B]` int32 original timesteps.
      params: the variables passed to `apply_fn` (e.g. `{"params": p}`).
      rng: split into (timestep, noise, dropout) keys.
      schedule: usually the full schedule (t uniform over 1..T); a respaced one trains only its steps.
      prediction: "eps", "x0" or "v". weighting: "simple" or "elbo". labels: optional `[B]` int classes.
    Returns: the loss per example `[B]`; the caller takes the (masked) mean.
    """
    pred_lib.check_prediction(prediction)
    weights = loss_weights(schedule, weighting)
    t_key, noise_key, dropout_key = jax.random.split(rng, 3)
    x0 = jnp.asarray(x0, jnp.float32)
    batch = x0.shape[0]
    i = jax.random.randint(t_key, (batch,), 0, schedule.num_steps)
    alpha_bar = schedule.alpha_bar[i]
    noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
    shape = (batch,) + (1,) * (x0.ndim - 1)
    x_t = (jnp.sqrt(alpha_bar).reshape(shape) * x0
           + jnp.sqrt(schedule.one_minus_alpha_bar[i]).reshape(shape) * noise)
    output = apply_fn(params, x_t, schedule.timesteps[i], labels=labels, rngs={"dropout": dropout_key})
    output = output.astype(jnp.float32)
    if weighting == "simple":
        error = output - pred_lib.prediction_target(x0, noise, alpha_bar, prediction)
    else:
        error = noise - pred_lib.eps_and_x0(output, x_t, alpha_bar, prediction)[0]
    return weights[i] * jnp.mean(jnp.square(error).reshape(batch, -1), axis=-1)
