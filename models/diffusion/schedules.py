"""Noise schedules as one pytree of per-step coefficients, and respacing to K-step sub-sequences.

Notation (Ho et al., *Denoising Diffusion Probabilistic Models*, arXiv 2006.11239):
αₜ = 1 − βₜ, ᾱₜ = Π_{s≤t} αₛ, q(xₜ|x₀) = N(√ᾱₜ x₀, (1−ᾱₜ) I), timesteps t = 1..T, ᾱ₀ = 1.

A `Schedule` holds K steps τ₁ < … < τ_K (original timesteps in 1..T; τ₀ = 0 is the data). The full
schedule is the case τ = (1, …, T). Every coefficient is of a step τᵢ₋₁ → τᵢ, so on a respaced
sub-sequence the step's αᵢ = ᾱ_τᵢ / ᾱ_τᵢ₋₁ and βᵢ = 1 − αᵢ (DDIM, arXiv 2010.02502, §4.2;
https://kexue.fm/archives/9181). With those, the posterior of post 9164
(https://kexue.fm/archives/9164)

    q(x_τᵢ₋₁ | x_τᵢ, x₀) = N(c₀ᵢ x₀ + cₜᵢ x_τᵢ, β̃ᵢ I),
    c₀ᵢ = √ᾱ_τᵢ₋₁ βᵢ / (1−ᾱ_τᵢ),  cₜᵢ = √αᵢ (1−ᾱ_τᵢ₋₁) / (1−ᾱ_τᵢ),  β̃ᵢ = βᵢ (1−ᾱ_τᵢ₋₁) / (1−ᾱ_τᵢ)

holds for every sub-sequence. Everything is computed in float64 NumPy from the registry's β and
only then cast to float32, because 1 − ᾱ near t = 1 (≈ 1e-4) loses three digits in float32.
"""
from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import numpy as np
from flax import struct


def linear_betas(num_timesteps: int) -> np.ndarray:
    """DDPM's linear schedule, β = linspace(1e-4, 0.02, T) (Ho et al., arXiv 2006.11239)."""
    return np.linspace(1e-4, 0.02, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int, offset: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Cosine schedule, ᾱₜ = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s) · π/2), β clipped at 0.999.

    Nichol & Dhariwal, *Improved Denoising Diffusion Probabilistic Models*, arXiv 2102.09672, eq. 17.
    """
    t = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    f = np.cos((t + offset) / (1.0 + offset) * np.pi / 2.0) ** 2
    alpha_bar = f / f[0]
    return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta)


def kexue_linear_betas(num_timesteps: int) -> np.ndarray:
    """The schedule of post 9119, βₜ = 0.02 t/T (Ho's notation), t = 1..T.

    *生成扩散模型漫谈（一）：DDPM = 拆楼 + 建楼*, https://kexue.fm/archives/9119, and its code, write
    αₜ = √(1 − 0.02 t/T) for the *per-step signal coefficient* in Su's notation, where his αₜ is the
    square root of Ho's αₜ (xₜ = αₜ xₜ₋₁ + βₜ εₜ, αₜ² + βₜ² = 1). It is not a schedule on ᾱ: it is
    DDPM's linear β started at 0.02/T instead of 1e-4.
    """
    return 0.02 * np.arange(1, num_timesteps + 1, dtype=np.float64) / num_timesteps


BETA_SCHEDULES: dict[str, Callable[[int], np.ndarray]] = {
    "linear": linear_betas,
    "cosine": cosine_betas,
    "kexue_linear": kexue_linear_betas,
}


def _check_name(name: str) -> None:
    if name not in BETA_SCHEDULES:
        raise ValueError(f"Unknown noise schedule {name!r}; choose one of {sorted(BETA_SCHEDULES)}.")


def alpha_bar_float64(name: str, num_timesteps: int) -> np.ndarray:
    """ᾱₜ for t = 1..T in float64, `[T]`: the single source the `Schedule` coefficients come from."""
    _check_name(name)
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}.")
    betas = BETA_SCHEDULES[name](num_timesteps)
    return np.cumprod(1.0 - betas)


@struct.dataclass
class Schedule:
    """Per-step coefficients of K steps τ₁ < … < τ_K, each array `[K]` (float32; `timesteps` int32).

    Entry i (0-based) is the step from t = timesteps[i] down to s = timesteps[i−1] (s = 0, the data,
    for i = 0): alpha_bar[i] = ᾱₜ, alpha_bar_prev[i] = ᾱₛ (1 at i = 0), alpha[i] = ᾱₜ/ᾱₛ, and so on.
    Build with `make_schedule` and `respace`; pass it into jitted functions as an ordinary argument
    (a pytree; `name` and `num_timesteps`, the full T, are static).
    """

    timesteps: jnp.ndarray  # t, original integer timesteps in 1..T (what the network sees)
    alpha_bar: jnp.ndarray  # ᾱₜ
    alpha_bar_prev: jnp.ndarray  # ᾱₛ (1 at i = 0)
    one_minus_alpha_bar: jnp.ndarray  # β̄ = 1 − ᾱₜ, from float64 (1 − ᾱ loses digits in float32 near t = 1)
    one_minus_alpha_bar_prev: jnp.ndarray  # β̄' = 1 − ᾱₛ (0 at i = 0)
    alpha: jnp.ndarray  # the step's α = ᾱₜ / ᾱₛ
    beta: jnp.ndarray  # the step's β = 1 − α
    beta_tilde: jnp.ndarray  # posterior variance β̃ = β (1−ᾱₛ)/(1−ᾱₜ) (0 at i = 0)
    log_beta_tilde_clipped: jnp.ndarray  # log β̃, with i = 0 replaced by the full schedule's β̃ at t = 2
    posterior_mean_coef_x0: jnp.ndarray  # c₀ = √ᾱₛ β/(1−ᾱₜ)
    posterior_mean_coef_xt: jnp.ndarray  # cₜ = √α (1−ᾱₛ)/(1−ᾱₜ)
    snr: jnp.ndarray  # ᾱₜ / (1 − ᾱₜ)
    name: str = struct.field(pytree_node=False)
    num_timesteps: int = struct.field(pytree_node=False)

    @property
    def num_steps(self) -> int:
        """K, the number of steps of this (possibly respaced) schedule."""
        return self.timesteps.shape[0]


def step_coefficients(alpha_bar: np.ndarray, alpha_bar_prev: np.ndarray) -> dict[str, np.ndarray]:
    """Float64 coefficients of the steps ᾱ_prev → ᾱ (arrays `[K]`); the one place these formulas live."""
    alpha = alpha_bar / alpha_bar_prev
    beta = 1.0 - alpha
    one_minus = 1.0 - alpha_bar
    return dict(
        alpha_bar=alpha_bar,
        alpha_bar_prev=alpha_bar_prev,
        one_minus_alpha_bar=one_minus,
        one_minus_alpha_bar_prev=1.0 - alpha_bar_prev,
        alpha=alpha,
        beta=beta,
        beta_tilde=beta * (1.0 - alpha_bar_prev) / one_minus,
        posterior_mean_coef_x0=np.sqrt(alpha_bar_prev) * beta / one_minus,
        posterior_mean_coef_xt=np.sqrt(alpha) * (1.0 - alpha_bar_prev) / one_minus,
        snr=alpha_bar / one_minus,
    )


def schedule_at(name: str, num_timesteps: int, timesteps) -> Schedule:
    """The schedule `name` (T = `num_timesteps`) restricted to the increasing `timesteps` (in 1..T)."""
    steps = np.asarray(timesteps, dtype=np.int64)
    if steps.ndim != 1 or steps.size == 0:
        raise ValueError(f"timesteps must be a non-empty 1-D sequence, got shape {steps.shape}.")
    if steps[0] < 1 or steps[-1] > num_timesteps or np.any(np.diff(steps) <= 0):
        raise ValueError(
            f"timesteps must increase strictly within 1..{num_timesteps}, got {steps.tolist()[:8]}...")
    full = alpha_bar_float64(name, num_timesteps)
    alpha_bar = full[steps - 1]
    alpha_bar_prev = np.concatenate([[1.0], alpha_bar[:-1]])
    coef = step_coefficients(alpha_bar, alpha_bar_prev)
    # Ho et al. clip log β̃ at t = 1 (where β̃ = 0) to β̃ at t = 2; we always take the *full* schedule's
    # value, so the decoder variance p(x₀|x₁) is the same for every K (as Analytic-DPM's code does).
    full_beta_tilde_2 = step_coefficients(full[1:2], full[0:1])["beta_tilde"][0]
    log_beta_tilde = np.log(np.concatenate([[full_beta_tilde_2], coef["beta_tilde"][1:]]))
    arrays = {k: jnp.asarray(v, jnp.float32) for k, v in coef.items()}
    return Schedule(
        timesteps=jnp.asarray(steps, jnp.int32),
        log_beta_tilde_clipped=jnp.asarray(log_beta_tilde, jnp.float32),
        name=name,
        num_timesteps=int(num_timesteps),
        **arrays,
    )


def make_schedule(name: str = "linear", num_timesteps: int = 1000) -> Schedule:
    """The full T-step schedule `name` from `BETA_SCHEDULES` (τ = 1..T)."""
    return schedule_at(name, num_timesteps, np.arange(1, num_timesteps + 1))


def even_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """K evenly spaced timesteps round(1 + i (T−1)/(K−1)), i = 0..K−1 (Analytic-DPM's "linear")."""
    if num_steps == 1:
        return np.array([num_timesteps])
    return np.round(np.linspace(1.0, num_timesteps, num_steps)).astype(np.int64)


def quadratic_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """K timesteps 1 + (T−1)(i/(K−1))², i = 0..K−1: dense near t = 1 (DDIM's quadratic spacing, ending at T).

    After rounding, repeated steps at the start are pushed forward by one; τ_K = T is kept.
    """
    if num_steps == 1:
        return np.array([num_timesteps])
    steps = np.round(1.0 + (num_timesteps - 1) * np.linspace(0.0, 1.0, num_steps) ** 2).astype(np.int64)
    for i in range(1, num_steps):
        steps[i] = max(steps[i], steps[i - 1] + 1)
    if steps[-1] > num_timesteps:
        raise ValueError(f"quadratic spacing cannot fit {num_steps} distinct steps in 1..{num_timesteps}.")
    return steps


SPACINGS: dict[str, Callable[[int, int], np.ndarray]] = {
    "even": even_timesteps,
    "quadratic": quadratic_timesteps,
}


def respace(schedule: Schedule, num_steps: int, spacing: str = "even") -> Schedule:
    """`schedule`'s full T-step process seen at K = `num_steps` timesteps chosen by `spacing`.

    The step coefficients are recomputed in float64 from ᾱ_τᵢ / ᾱ_τᵢ₋₁. Respacing a respaced schedule
    respaces the original T steps again.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"Unknown spacing {spacing!r}; choose one of {sorted(SPACINGS)}.")
    if not 1 <= num_steps <= schedule.num_timesteps:
        raise ValueError(f"num_steps must be in 1..{schedule.num_timesteps}, got {num_steps}.")
    steps = SPACINGS[spacing](schedule.num_timesteps, num_steps)
    return schedule_at(schedule.name, schedule.num_timesteps, steps)


def broadcast_to(values: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
    """Per-example values `[B]` (or a scalar) reshaped to broadcast against `x` `[B, ...]`."""
    values = jnp.asarray(values, x.dtype)
    return values.reshape(values.shape + (1,) * (x.ndim - values.ndim))
