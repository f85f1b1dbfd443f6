"""Negative log-likelihood in bits/dim from the KL decomposition of the variational bound.

For K steps τ₁ < … < τ_K (Ho et al., arXiv 2006.11239, eq. 5; Analytic-DPM, arXiv 2201.06503, §2):

    −log p(x₀) ≤ L_prior + Σ_{i≥2} KL(q(x_τᵢ₋₁|x_τᵢ, x₀) ‖ p_θ(x_τᵢ₋₁|x_τᵢ)) + L₀,

- L_prior = KL(q(x_τ_K|x₀) ‖ N(0, I)), in closed form;
- each diffusion term is between two isotropic Gaussians, evaluated at one draw x_τᵢ ~ q(x_τᵢ|x₀).
  q is the sampler's own inference distribution: the DDPM posterior (variance β̃) for the DDPM-type
  samplers, DDIM's q_σ (variance λ² = σ(η)², arXiv 2010.02502 eq. 7) for the DDIM-type ones; p has
  the sampler's mean rule and variance σ² (`samplers.reverse_process`);
- L₀ = −log p(x₀|x_τ₁) under a discretised Gaussian decoder N(x̂₀, σ₀²) whose bins have half-width
  1/(levels − 1) on [−1, 1] and open edge bins (levels = 17 for scikit-learn digits, 256 for 8-bit).

Terms are summed over the D dimensions of an example and divided by D·ln 2. DDIM with η = 0 has
λ² = 0 (a deterministic q), so its diffusion KL is infinite: the NLL needs η > 0 there.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr

from models.diffusion import prediction as pred_lib
from models.diffusion import samplers
from models.diffusion.schedules import Schedule


def gaussian_kl(mean_q, var_q, mean_p, var_p):
    """Elementwise KL(N(mean_q, var_q) ‖ N(mean_p, var_p)) in nats.

    Written as ½(r − 1 − log r + (mean_q − mean_p)²/var_p) with r = var_q/var_p: r − 1 − log r has no
    cancellation between large terms, so equal Gaussians give 0 to rounding of r, not of log var.
    """
    ratio = var_q / var_p
    return 0.5 * (ratio - 1.0 - jnp.log(ratio) + jnp.square(mean_q - mean_p) / var_p)


def prior_kl(x0, alpha_bar_last):
    """KL(q(x_T|x₀) ‖ N(0, I)) in nats summed over the dimensions of each example, `[B]`.

    ½(ᾱ x₀² + (1−ᾱ) − 1 − log(1−ᾱ)) written as ½(ᾱ x₀² − ᾱ − log1p(−ᾱ)): no cancellation at small ᾱ.
    """
    ab = jnp.asarray(alpha_bar_last, jnp.float32)
    kl = 0.5 * (ab * jnp.square(x0) - ab - jnp.log1p(-ab))
    return jnp.sum(kl.reshape(x0.shape[0], -1), axis=-1)


def _log_diff_ndtr(a, b):
    """log(Φ(b) − Φ(a)) for a < b, stable in both tails (uses Φ(b) − Φ(a) = Φ(−a) − Φ(−b))."""
    flip = a > 0
    lo, hi = jnp.where(flip, -b, a), jnp.where(flip, -a, b)
    log_hi = log_ndtr(hi)
    return log_hi + jnp.log(-jnp.expm1(jnp.minimum(log_ndtr(lo) - log_hi, -1e-30)))


def discretized_gaussian_log_likelihood(x, mean, variance, *, levels: int):
    """Elementwise log P(x) of a Gaussian N(mean, variance) integrated over x's bin, in nats.

    `x` lies on the grid −1 + 2k/(levels−1); its bin is x ± 1/(levels−1); the bins at −1 and +1 extend
    to ∓∞ so the probabilities sum to one (Ho et al., arXiv 2006.11239, eq. 13).
    """
    half_width = 1.0 / (levels - 1)
    std = jnp.sqrt(variance)
    upper = (x + half_width - mean) / std
    lower = (x - half_width - mean) / std
    left_edge, right_edge = x < -1.0 + half_width, x > 1.0 - half_width
    log_cdf_upper = log_ndtr(upper)  # open bin at −1: P = Φ(upper)
    log_sf_lower = log_ndtr(-lower)  # open bin at +1: P = 1 − Φ(lower)
    middle = _log_diff_ndtr(lower, jnp.where(left_edge | right_edge, lower + 1.0, upper))
    return jnp.where(left_edge, log_cdf_upper, jnp.where(right_edge, log_sf_lower, middle))


def _per_example_sum(values):
    return jnp.sum(values.reshape(values.shape[0], -1), axis=-1)


def _check_nll_inputs(methods: dict[str, tuple[str, float]], levels: int, prediction: str) -> None:
    for name, (method, eta) in methods.items():
        if samplers.SAMPLERS.get(method, ("",))[0] == "ddim" and not eta > 0.0:
            raise ValueError(f"The NLL of a DDIM-type sampler ({name!r}) needs eta > 0: with eta = 0, q is "
                             "deterministic and every diffusion KL is infinite.")
    if levels < 2:
        raise ValueError(f"levels must be >= 2 (17 for digits, 256 for 8-bit images), got {levels}.")
    pred_lib.check_prediction(prediction)


def nll_bits_per_dim(model_fn, params, x0, rng, *, schedule: Schedule, method: str = "ddpm_beta_tilde",
                     eta: float = 1.0, gamma=None, labels=None, levels: int = 256, prediction: str = "eps",
                     clip_x0: bool = False) -> dict[str, jnp.ndarray]:
    """Per-example NLL bound of `x0` `[B, H, W, C]` (on the `levels` grid in [−1, 1]) in bits/dim.

    Args:
      model_fn, params, labels, prediction: the network, as for `samplers.sample`.
      rng: the draw for step i is ε = `normal(fold_in(rng, i), x0.shape)`.
      schedule: K steps (respace it for a K-step bound). method, eta, gamma: the sampler whose
        reverse process p_θ is scored (`samplers.SAMPLERS`).
      levels: grey levels of the data (17 for digits, 256 for 8-bit images).
      clip_x0: clip x̂₀ to [−1, 1] before forming p's mean (Analytic-DPM's code does for its bounds).
    Returns: {"prior", "diffusion", "reconstruction", "total"}: `[B]` bits/dim, and "per_step" `[B, K]`
      (column 0 is L₀; column j ≥ 1 is the KL of the step from timesteps[j] to timesteps[j−1]).
    """
    scores = nll_bits_per_dim_of_samplers(model_fn, params, x0, rng, schedule=schedule, methods={method: (method, eta)},
                                          gamma=gamma, labels=labels, levels=levels, prediction=prediction,
                                          clip_x0=clip_x0)
    return scores[method]


def nll_bits_per_dim_of_samplers(model_fn, params, x0, rng, *, schedule: Schedule,
                                 methods: dict[str, tuple[str, float]], gamma=None, labels=None, levels: int = 256,
                                 prediction: str = "eps", clip_x0: bool = False) -> dict[str, dict[str, jnp.ndarray]]:
    """`nll_bits_per_dim` of several samplers at once, {name: its result}, sharing every network call.

    `methods` maps a name to (method, eta). All samplers are scored on the same draws xₜ ~ q(xₜ|x₀) and
    differ only in p's mean rule and variance, so the K network evaluations are made once (the cost of
    one sampler), not once per sampler.
    """
    _check_nll_inputs(methods, levels, prediction)
    processes = [samplers.reverse_process(schedule, method, eta=eta, gamma=gamma) for method, eta in methods.values()]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *processes)
    scores = _nll(model_fn, params, jnp.asarray(x0, jnp.float32), rng, schedule, stacked, labels, levels,
                  prediction, clip_x0)
    return {name: jax.tree.map(lambda a, m=m: a[m], scores) for m, name in enumerate(methods)}


@functools.partial(jax.jit, static_argnames=("model_fn", "levels", "prediction", "clip_x0"))
def _nll(model_fn, params, x0, rng, schedule, processes, labels, levels, prediction, clip_x0):
    """The bound for M reverse processes stacked on a leading axis; every result has a leading `[M]`."""
    scale = 1.0 / (np.prod(x0.shape[1:]) * np.log(2.0))

    def noisy(i):
        noise = jax.random.normal(jax.random.fold_in(rng, i), x0.shape, jnp.float32)
        x_t = jnp.sqrt(schedule.alpha_bar[i]) * x0 + jnp.sqrt(schedule.one_minus_alpha_bar[i]) * noise
        eps_hat, x0_hat = samplers.predict(model_fn, params, x_t, schedule, i, labels=labels,
                                           prediction=prediction, clip_x0=clip_x0)
        return x_t, noise, eps_hat, x0_hat

    def kl_term(_, i):
        x_t, noise, eps_hat, x0_hat = noisy(i)

        def kl(process):
            mean_q = samplers.reverse_mean(process, schedule, i, x_t, x0, noise)
            mean_p = samplers.reverse_mean(process, schedule, i, x_t, x0_hat, eps_hat)
            return _per_example_sum(gaussian_kl(mean_q, process.lambda2[i], mean_p, process.sigma2[i]))

        return None, jax.vmap(kl)(processes)  # [M, B]

    _, _, _, x0_hat = noisy(0)
    decoder = jax.vmap(lambda process: -_per_example_sum(
        discretized_gaussian_log_likelihood(x0, x0_hat, process.sigma2[0], levels=levels)))(processes)  # [M, B]
    if schedule.num_steps > 1:
        _, kls = jax.lax.scan(kl_term, None, jnp.arange(1, schedule.num_steps))  # [K-1, M, B]
        per_step = jnp.concatenate([decoder[:, :, None], jnp.moveaxis(kls, 0, -1)], axis=2) * scale
    else:
        per_step = decoder[:, :, None] * scale
    prior = jnp.broadcast_to(prior_kl(x0, schedule.alpha_bar[-1]) * scale, decoder.shape)
    diffusion = jnp.sum(per_step[:, :, 1:], axis=2)
    reconstruction = per_step[:, :, 0]
    return dict(prior=prior, diffusion=diffusion, reconstruction=reconstruction,
                total=prior + diffusion + reconstruction, per_step=per_step)
