"""One generalised reverse process: DDPM (σ² = β or β̃), DDIM(η), Analytic-DPM and Analytic-DDIM.

Step i goes from xₜ to xₛ, t = timesteps[i], s = timesteps[i−1] (s = 0 for i = 0; see `schedules`),
with ᾱ = ᾱₜ, ᾱ' = ᾱₛ, β̄ = 1 − ᾱ, β̄' = 1 − ᾱ', α = ᾱ/ᾱ':

    xₛ = mean(x̂₀, ε̂; λ²) + σ z,   z ~ N(0, I)   (no noise on the final step to x₀, i = 0).

Two mean rules:
- "posterior": the DDPM posterior mean c₀ x̂₀ + cₜ xₜ (post 9164, https://kexue.fm/archives/9164), whose
  own variance is λ² = β̃;
- "ddim": √ᾱ' x̂₀ + √(1 − ᾱ' − λ²) ε̂ with λ² = σ(η)², σ(η) = η √((1−ᾱ')/(1−ᾱ)) √(1 − ᾱ/ᾱ')
  (Song et al., *DDIM*, arXiv 2010.02502, eq. 12, 16; post 9181, https://kexue.fm/archives/9181).
  η = 1 gives the posterior mean and λ² = β̃; η = 0 is deterministic.

The sampling variance σ² is a separate choice (`VARIANCES`): β, β̃, λ² itself, or the Analytic-DPM
optimum (Bao et al., arXiv 2201.06503, Thm. 1–2; post 9245, https://kexue.fm/archives/9245)

    σ*² = λ² + (√(β̄/α) − √(β̄' − λ²))² (1 − Γₜ),   Γₜ = E_q ‖ε_θ(xₜ, t)‖² / d,

clipped to [λ², λ² + (√(β̄/α) − √(β̄' − λ²))²] and, for data in [−r, r], to
λ² + (√ᾱ' − √(β̄' − λ²) √(ᾱ/β̄))² r² (the bound Analytic-DPM's code applies, r = 1).

Network contract: `model_fn(params, x, t, labels=labels) -> output`, x `[B, H, W, C]`, t `[B]` int32
original timesteps; output is ε, x₀ or v (see `prediction`). Pass the same `model_fn` object each
call (it is a static jit argument), e.g. `functools.partial(unet.apply, train=False)` made once.
"""
from __future__ import annotations

import functools
from typing import Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from models.diffusion import prediction as pred_lib
from models.diffusion.schedules import Schedule


def ddim_lambda2(schedule: Schedule, eta: float) -> jnp.ndarray:
    """DDIM's σ(η)² per step `[K]`, η² (1−ᾱ')/(1−ᾱ) (1 − ᾱ/ᾱ') (arXiv 2010.02502, eq. 16).

    1 − ᾱ/ᾱ' is the step's β, taken from the schedule (float64-derived) rather than recomputed in float32.
    """
    return eta**2 * schedule.one_minus_alpha_bar_prev / schedule.one_minus_alpha_bar * schedule.beta


def analytic_variance(lambda2, gamma, *, alpha_bar, alpha_bar_prev, one_minus_alpha_bar=None,
                      one_minus_alpha_bar_prev=None, data_half_range: float | None = 1.0):
    """Analytic-DPM's σ*² clipped to its bounds (arXiv 2201.06503, eq. 7 and Thm. 2); arrays `[K]`.

    `gamma` is Γ = E‖ε_θ‖²/d at each step; at Γ = 0 the value is the upper bound, at Γ = 1 it is λ².
    Pass β̄ = 1 − ᾱ and β̄' precomputed (the `Schedule` fields) to keep float32 accuracy near t = 1.
    """
    bbar = 1.0 - alpha_bar if one_minus_alpha_bar is None else one_minus_alpha_bar
    bbar_prev = 1.0 - alpha_bar_prev if one_minus_alpha_bar_prev is None else one_minus_alpha_bar_prev
    alpha = alpha_bar / alpha_bar_prev
    root_prev = jnp.sqrt(jnp.maximum(bbar_prev - lambda2, 0.0))
    gap = (jnp.sqrt(bbar / alpha) - root_prev) ** 2
    upper = lambda2 + gap
    if data_half_range is not None:
        x0_coef = (jnp.sqrt(alpha_bar_prev) - root_prev * jnp.sqrt(alpha_bar / bbar)) ** 2
        upper = jnp.minimum(upper, lambda2 + x0_coef * data_half_range**2)
    return jnp.clip(lambda2 + gap * (1.0 - gamma), lambda2, upper)


class ReverseProcess(NamedTuple):
    """One sampler as data (a pytree, so every method shares one compiled sampler).

    `ddim_mean` (bool scalar) picks the mean rule; `lambda2` is q's variance λ² and `sigma2` p's σ², `[K]`.
    σ²[0] is the decoder variance p(x₀|x_τ₁) used by the likelihood (the clipped β̃ of the schedule,
    as in Ho et al. and Analytic-DPM); sampling adds no noise at i = 0.
    """

    ddim_mean: jnp.ndarray
    lambda2: jnp.ndarray
    sigma2: jnp.ndarray


def _analytic(schedule, lambda2, gamma):
    if gamma is None:
        raise ValueError("analytic samplers need gamma: Γ per step, from estimate_gamma(...).")
    gamma = jnp.asarray(gamma, jnp.float32)
    if gamma.shape != schedule.timesteps.shape:
        raise ValueError(f"gamma must have shape {schedule.timesteps.shape} (one Γ per step of this "
                         f"schedule; index a full-T estimate with schedule.timesteps - 1), got {gamma.shape}.")
    return analytic_variance(lambda2, gamma, alpha_bar=schedule.alpha_bar, alpha_bar_prev=schedule.alpha_bar_prev,
                             one_minus_alpha_bar=schedule.one_minus_alpha_bar,
                             one_minus_alpha_bar_prev=schedule.one_minus_alpha_bar_prev)


VARIANCES: dict[str, Callable] = {
    "beta": lambda schedule, lambda2, gamma: schedule.beta,
    "beta_tilde": lambda schedule, lambda2, gamma: schedule.beta_tilde,
    "lambda": lambda schedule, lambda2, gamma: lambda2,
    "analytic": _analytic,
}

# name -> (mean rule, variance rule)
SAMPLERS: dict[str, tuple[str, str]] = {
    "ddpm_beta": ("posterior", "beta"),
    "ddpm_beta_tilde": ("posterior", "beta_tilde"),
    "ddim": ("ddim", "lambda"),
    "analytic_ddpm": ("posterior", "analytic"),
    "analytic_ddim": ("ddim", "analytic"),
}


def reverse_process(schedule: Schedule, method: str, *, eta: float = 0.0, gamma=None) -> ReverseProcess:
    """The `ReverseProcess` of sampler `method` (a key of `SAMPLERS`) on `schedule`; validates its inputs."""
    if method not in SAMPLERS:
        raise ValueError(f"Unknown sampler {method!r}; choose one of {sorted(SAMPLERS)}.")
    mean_rule, variance_rule = SAMPLERS[method]
    lambda2 = schedule.beta_tilde if mean_rule == "posterior" else ddim_lambda2(schedule, eta)
    sigma2 = VARIANCES[variance_rule](schedule, lambda2, gamma)
    sigma2 = sigma2.at[0].set(jnp.exp(schedule.log_beta_tilde_clipped[0]))
    return ReverseProcess(jnp.asarray(mean_rule == "ddim"), lambda2, sigma2)


def reverse_mean(process: ReverseProcess, schedule: Schedule, i, x_t, x0, eps):
    """Mean of xₛ at step i given (x₀, ε): the true pair gives q's mean, the predicted pair p's mean."""
    posterior = schedule.posterior_mean_coef_x0[i] * x0 + schedule.posterior_mean_coef_xt[i] * x_t
    abp = schedule.alpha_bar_prev[i]
    bbar_prev = schedule.one_minus_alpha_bar_prev[i]
    ddim = jnp.sqrt(abp) * x0 + jnp.sqrt(jnp.maximum(bbar_prev - process.lambda2[i], 0.0)) * eps
    return jnp.where(process.ddim_mean, ddim, posterior)


def predict(model_fn, params, x_t, schedule: Schedule, i, *, labels, prediction: str, clip_x0: bool,
            eps_from_clipped_x0: bool = True):
    """(ε̂, x̂₀) at step i. With `clip_x0`, x̂₀ is clipped to [−1, 1], and with `eps_from_clipped_x0` ε̂ is
    recomputed to match it, (xₜ − √ᾱ x̂₀)/√(1 − ᾱ) (guided-diffusion's convention); without, ε̂ stays the
    network's (Analytic-DPM's official code, whose DDIM direction term uses the raw ε̂)."""
    t = jnp.full((x_t.shape[0],), schedule.timesteps[i], jnp.int32)
    output = model_fn(params, x_t, t, labels=labels)
    eps, x0 = pred_lib.eps_and_x0(output, x_t, schedule.alpha_bar[i], prediction)
    if clip_x0:
        x0 = jnp.clip(x0, -1.0, 1.0)
        if eps_from_clipped_x0:
            eps = pred_lib.eps_from_x0(x_t, x0, schedule.alpha_bar[i])
    return eps, x0


def pixel_sigma2_cap(pixels: float, levels: int) -> float:
    """σ² whose mean absolute noise E|σz| = σ√(2/π) is `pixels` grey levels of width 2/(levels − 1):
    (pixels · 2/(levels − 1) · √(π/2))². Analytic-DPM's code caps the second-to-last step's σ² at this
    (`clip_pixel` 2 for its linear-schedule CIFAR-10 Analytic-DDPM, 1 elsewhere, with 256 levels)."""
    return float((pixels * 2.0 / (levels - 1) * np.sqrt(np.pi / 2.0)) ** 2)


def sample(model_fn, params, rng, *, schedule: Schedule, shape: tuple[int, ...], method: str = "ddpm_beta_tilde",
           eta: float = 0.0, gamma=None, labels=None, x_T=None, prediction: str = "eps", clip_x0: bool = False,
           eps_from_clipped_x0: bool = True, second_last_sigma2_cap: float | None = None):
    """Draw samples `[*shape]` by running `method` over the K steps of `schedule` (jitted `lax.scan`).

    Args:
      model_fn, params: the network (module docstring); `labels` `[B]` is passed through to it.
      rng: split into (x_T key, noise key); the noise of step i is `normal(fold_in(noise_key, i))`.
      schedule: full or respaced `Schedule`. method: a key of `SAMPLERS`. eta: DDIM's η.
      gamma: Γ per step `[K]` for the analytic methods. x_T: optional starting noise `[*shape]`.
      clip_x0: clip x̂₀ to [−1, 1] at every step (off for exact DDIM inversion and likelihoods).
      eps_from_clipped_x0: with `clip_x0`, recompute ε̂ from the clipped x̂₀ (see `predict`); False is the
        official Analytic-DPM code's DDIM. The posterior-mean (DDPM) samplers use x̂₀ and xₜ only.
      second_last_sigma2_cap: cap σ² of step i = 1 (to the first timestep, the last noisy step) at this
        value, as Analytic-DPM's code does in sampling (`pixel_sigma2_cap`); None: no cap. Likelihoods
        (`models.diffusion.likelihood`) never cap.
    Returns: x₀ samples `[*shape]` float32. All methods share one compilation per (model_fn, shape).
    """
    pred_lib.check_prediction(prediction)
    process = reverse_process(schedule, method, eta=eta, gamma=gamma)
    if second_last_sigma2_cap is not None and schedule.num_steps > 1:
        process = process._replace(sigma2=process.sigma2.at[1].min(second_last_sigma2_cap))
    return _sample(model_fn, params, rng, schedule, process, labels, x_T, tuple(shape), prediction, clip_x0,
                   eps_from_clipped_x0)


@functools.partial(jax.jit, static_argnames=("model_fn", "shape", "prediction", "clip_x0", "eps_from_clipped_x0"))
def _sample(model_fn, params, rng, schedule, process, labels, x_T, shape, prediction, clip_x0, eps_from_clipped_x0):
    x_key, noise_key = jax.random.split(rng)
    x = jax.random.normal(x_key, shape, jnp.float32) if x_T is None else jnp.asarray(x_T, jnp.float32)

    def step(x, i):
        eps, x0 = predict(model_fn, params, x, schedule, i, labels=labels, prediction=prediction, clip_x0=clip_x0,
                          eps_from_clipped_x0=eps_from_clipped_x0)
        mean = reverse_mean(process, schedule, i, x, x0, eps)
        z = jax.random.normal(jax.random.fold_in(noise_key, i), shape, jnp.float32)
        std = jnp.where(i > 0, jnp.sqrt(process.sigma2[i]), 0.0)
        return mean + std * z, None

    x, _ = jax.lax.scan(step, x, jnp.arange(schedule.num_steps)[::-1])
    return x


@functools.partial(jax.jit, static_argnames=("model_fn", "prediction", "fixed_point_iters"))
def ddim_encode(model_fn, params, x0, *, schedule: Schedule, labels=None, prediction: str = "eps",
                fixed_point_iters: int = 0):
    """Deterministic DDIM encoding x₀ → x_T `[B, ...]`, the inverse of `sample(method="ddim", eta=0)`.

    The decoding step is x_s = √(ᾱₛ/ᾱₜ) xₜ + c ε̂(xₜ, t), c = √(1−ᾱₛ) − √(ᾱₛ/ᾱₜ)√(1−ᾱₜ); we solve it for
    xₜ by the iteration xₜ ← √(ᾱₜ/ᾱₛ)(xₛ − c ε̂(xₜ, t)) started at xₜ = xₛ. One pass is the usual DDIM
    inversion (ε̂ taken at the known point, arXiv 2010.02502 §4.3); `fixed_point_iters` more passes make
    the inversion exact when the step is contractive (small steps, smooth ε̂).
    """
    pred_lib.check_prediction(prediction)

    def step(x_s, i):
        ab, abp = schedule.alpha_bar[i], schedule.alpha_bar_prev[i]
        bbar, bbar_prev = schedule.one_minus_alpha_bar[i], schedule.one_minus_alpha_bar_prev[i]
        c = jnp.sqrt(bbar_prev) - jnp.sqrt(abp / ab) * jnp.sqrt(bbar)

        def refine(_, x_t):
            eps, _ = predict(model_fn, params, x_t, schedule, i, labels=labels, prediction=prediction,
                             clip_x0=False)
            return jnp.sqrt(ab / abp) * (x_s - c * eps)

        return jax.lax.fori_loop(0, 1 + fixed_point_iters, refine, x_s), None

    x, _ = jax.lax.scan(step, jnp.asarray(x0, jnp.float32), jnp.arange(schedule.num_steps))
    return x


@functools.partial(jax.jit, static_argnames=("model_fn", "prediction"))
def _gamma_batch_sums(model_fn, params, x0, labels, rng, schedule: Schedule, prediction: str):
    """Σ over the batch of ‖ε_θ(xₜ, t)‖²/d for every step's t, `[K]`, with xₜ ~ q(xₜ|x₀).

    The noise at t is drawn from fold_in(rng, t), keyed by the timestep itself rather than its position
    in the schedule, so Γₜ comes out the same whichever set of timesteps it is estimated with.
    """
    dims = int(np.prod(x0.shape[1:]))

    def one_step(_, i):
        noise = jax.random.normal(jax.random.fold_in(rng, schedule.timesteps[i]), x0.shape, jnp.float32)
        x_t = jnp.sqrt(schedule.alpha_bar[i]) * x0 + jnp.sqrt(schedule.one_minus_alpha_bar[i]) * noise
        eps, _ = predict(model_fn, params, x_t, schedule, i, labels=labels, prediction=prediction, clip_x0=False)
        return None, jnp.sum(jnp.square(eps)) / dims

    _, sums = jax.lax.scan(one_step, None, jnp.arange(schedule.num_steps))
    return sums


def estimate_gamma(model_fn, params, batches: Iterable, rng, *, schedule: Schedule, prediction: str = "eps",
                   max_batches: int | None = None) -> np.ndarray:
    """Monte-Carlo Γₜ = E_{q(xₜ)} ‖ε_θ(xₜ, t)‖² / d at each t in `schedule.timesteps`, float64 `[K]`.

    Estimated once over training data (Analytic-DPM, arXiv 2201.06503, eq. 8). Γ depends only on t,
    so an estimate on the full schedule serves every respacing: `gamma_full[respaced.timesteps - 1]`.
    Γₜ does not depend on which other timesteps `schedule` holds (the noise is keyed by t), so estimates
    made piece by piece, e.g. cached per timestep, agree with one made at once.
    `batches` yields x₀ `[B, ...]` or `(x₀, labels)` pairs; each batch gets one fresh noise draw per step.
    """
    total, count = np.zeros(schedule.num_steps, np.float64), 0
    for b, batch in enumerate(batches):
        if max_batches is not None and b >= max_batches:
            break
        x0, labels = batch if isinstance(batch, tuple) else (batch, None)
        x0 = jnp.asarray(x0, jnp.float32)
        sums = _gamma_batch_sums(model_fn, params, x0, labels, jax.random.fold_in(rng, b), schedule, prediction)
        total += np.asarray(sums, np.float64)
        count += x0.shape[0]
    if count == 0:
        raise ValueError("estimate_gamma got no data: `batches` was empty.")
    return total / count
