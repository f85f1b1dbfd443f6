r"""Perturb-and-max: class probabilities defined as the argmax of noisy scores.

Post 9085, "从重参数的角度看离散概率分布的构建", https://kexue.fm/archives/9085: any noise
distribution defines :math:`p_i = P[\arg\max_j (s_j + \varepsilon_j) = i]`; Gumbel noise gives
exactly :math:`\mathrm{softmax}(s)` (the Gumbel-max trick; Gumbel 1954, Maddison et al. 2014,
arXiv 1411.0030), other noises give other (generally closed-form-free) distributions.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from losses import _numerics

Array = jax.Array

# name -> sampler(key, shape, dtype) of i.i.d. standard noise.
NOISE_SAMPLERS: dict[str, Callable[..., Array]] = {
    "gumbel": jax.random.gumbel,
    "normal": jax.random.normal,
    "logistic": jax.random.logistic,
    "uniform": jax.random.uniform,
}


def perturb_max_probabilities(logits: Any, *, noise: Any, num_samples: int, rng: Any) -> Array:
    r"""Monte Carlo estimate of :math:`P[\arg\max_j (s_j + \varepsilon_j) = i]`.

    .. math::
      \hat p_i = \frac1N \sum_{n=1}^N \mathbb{1}\big[\arg\max_j (s_j + \varepsilon^{(n)}_j) = i\big],
      \qquad \varepsilon^{(n)}_j \overset{iid}{\sim} \text{noise}.

    With ``noise="gumbel"``, :math:`\hat p \to \mathrm{softmax}(s)`; with ``"normal"`` and two
    classes, :math:`p_0 = \Phi((s_0 - s_1)/\sqrt2)`. The estimate is piecewise constant in the
    logits, so its gradient is zero (it is a sampler, not a relaxation). Its standard error is
    :math:`\sqrt{p_i(1 - p_i)/N}`. Memory is ``num_samples * logits.size`` noise values.

    Args:
      logits: scores, ``[..., num_classes]``.
      noise: a name from ``NOISE_SAMPLERS`` (``"gumbel"``, ``"normal"``, ``"logistic"``,
        ``"uniform"``), or a callable ``sampler(key, shape, dtype)``.
      num_samples: number of noise draws N.
      rng: a JAX PRNG key.

    Returns:
      Estimated probabilities, ``logits.shape``, dtype of ``logits``; each row sums to 1.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from losses import perturb_max_probabilities
      >>> logits = jnp.log(jnp.array([0.5, 0.3, 0.2]))
      >>> p = perturb_max_probabilities(logits, noise="gumbel", num_samples=20000,
      ...                               rng=jax.random.key(0))
      >>> bool(jnp.allclose(p, jnp.array([0.5, 0.3, 0.2]), atol=0.02))
      True
    """
    logits = _numerics.floating(logits, "logits")
    _numerics.check_num_classes(logits)
    if isinstance(noise, str):
        if noise not in NOISE_SAMPLERS:
            raise ValueError(f"`noise` must be one of {sorted(NOISE_SAMPLERS)} or a callable, got {noise!r}.")
        sampler = NOISE_SAMPLERS[noise]
    elif callable(noise):
        sampler = noise
    else:
        raise ValueError(f"`noise` must be a name or a callable sampler(key, shape, dtype), got {noise!r}.")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"`num_samples` must be a positive int, got {num_samples!r}.")

    return _estimate(logits, rng, sampler, num_samples)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _estimate(logits: Array, rng: Array, sampler: Callable[..., Array], num_samples: int) -> Array:
    num_classes = logits.shape[-1]
    dtype = _numerics.compute_dtype(logits.dtype)
    perturbed = logits.astype(dtype) + sampler(rng, (num_samples, *logits.shape), dtype)
    winners = jnp.argmax(perturbed, axis=-1)
    probabilities = jnp.mean(jax.nn.one_hot(winners, num_classes, dtype=dtype), axis=0)
    return probabilities.astype(logits.dtype)
