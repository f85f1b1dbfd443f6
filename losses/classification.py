r"""Softmax classification losses: R-Drop, focal, logit adjustment and smooth accuracy.

All take integer class labels of shape ``logits.shape[:-1]`` and an optional boolean class mask
``where`` (broadcastable to ``logits.shape``; masked classes leave the softmax). An example whose
target class is masked out, which includes a fully masked row, has loss 0 and zero gradient.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from losses import _numerics

Array = jax.Array


def _check_label_values(labels: Any, logits: Any) -> None:
    """Eager calls only: out-of-range labels would be clamped silently by the gather."""
    if jnp.ndim(logits) >= 1:
        _numerics.check_index_range(labels, jnp.shape(logits)[-1])


def _prepare(logits: Any, labels: Any, where: Any, name: str = "logits"):
    logits = _numerics.floating(logits, name)
    _numerics.check_num_classes(logits, name)
    labels = _numerics.check_index_labels(labels, logits)
    mask = _numerics.class_mask(where, logits.shape)
    return logits, logits.astype(_numerics.compute_dtype(logits.dtype)), labels, mask


def _cross_entropy(s: Array, labels: Array, mask: Array) -> tuple[Array, Array]:
    log_p, _, valid = _numerics.softmax_parts(s, labels, mask)
    return jnp.where(valid, -log_p, 0.0), valid


def rdrop_loss(logits1: Any, logits2: Any, labels: Any, *, alpha: float, where: Any = None) -> Array:
    r"""R-Drop: cross-entropy of two dropout passes plus a symmetric KL between them.

    .. math::
      \ell = \mathrm{CE}(z^{(1)}, y) + \mathrm{CE}(z^{(2)}, y)
           + \frac{\alpha}{2}\Big[\mathrm{KL}(P^{(2)} \| P^{(1)}) + \mathrm{KL}(P^{(1)} \| P^{(2)})\Big],

    with :math:`P^{(k)} = \mathrm{softmax}(z^{(k)})`. The symmetric KL is computed as
    :math:`\sum_i (p^{(1)}_i - p^{(2)}_i)(\log p^{(1)}_i - \log p^{(2)}_i)`, from log-softmax, so
    it stays finite when probabilities underflow. With identical passes it is :math:`2\,\mathrm{CE}`.

    Source: post 8496, "又是Dropout两次！这次它做到了有监督任务的SOTA", https://kexue.fm/archives/8496;
    Liang et al., "R-Drop: Regularized Dropout for Neural Networks", NeurIPS 2021, arXiv 2106.14448.

    Args:
      logits1: logits of the first forward pass, ``[..., num_classes]``.
      logits2: logits of the second pass (another dropout mask), same shape.
      labels: integer class indices, ``logits1.shape[:-1]``.
      alpha: weight of the KL term (the paper uses values in [0.1, 5]).
      where: optional boolean class mask, broadcastable to the logits' shape.

    Returns:
      Per-example loss, ``logits1.shape[:-1]``, dtype of ``logits1``.

    Example:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from losses import rdrop_loss
      >>> z1 = jnp.array([[2.0, 0.0, -1.0]])
      >>> z2 = jnp.array([[1.5, 0.5, -1.0]])
      >>> print(np.asarray(rdrop_loss(z1, z2, jnp.array([0]), alpha=1.0)).round(4))
      [0.6148]
    """
    _check_label_values(labels, logits1)
    return _rdrop(logits1, logits2, labels, alpha, where)


@jax.jit
def _rdrop(logits1: Array, logits2: Array, labels: Array, alpha: Array, where: Array | None) -> Array:
    logits1, s1, labels, mask = _prepare(logits1, labels, where, "logits1")
    logits2 = _numerics.floating(logits2, "logits2")
    _numerics.check_same_shape(logits1, logits2, "logits1", "logits2")
    s2 = logits2.astype(s1.dtype)

    ce1, valid = _cross_entropy(s1, labels, mask)
    ce2, _ = _cross_entropy(s2, labels, mask)
    mask = mask | ~valid[..., None]  # keep the KL of invalid rows finite; zeroed below
    log_p1 = _numerics.masked_log_softmax(s1, mask)
    log_p2 = _numerics.masked_log_softmax(s2, mask)
    p1 = jnp.where(mask, jnp.exp(log_p1), 0.0)
    p2 = jnp.where(mask, jnp.exp(log_p2), 0.0)
    symmetric_kl = jnp.sum((p1 - p2) * (log_p1 - log_p2), axis=-1)
    loss = ce1 + ce2 + 0.5 * alpha * jnp.where(valid, symmetric_kl, 0.0)
    return loss.astype(logits1.dtype)


def softmax_focal_loss(
    logits: Any, labels: Any, *, gamma: float = 2.0, alpha: Any = None, where: Any = None
) -> Array:
    r"""Multi-class (softmax) focal loss.

    .. math::
      \ell = -\alpha_y \,(1 - p_y)^{\gamma} \log p_y, \qquad p = \mathrm{softmax}(z).

    :math:`(1 - p_y)^\gamma` is evaluated as :math:`\exp(\gamma \log(1 - p_y))` with
    :math:`\log(1 - p_y) = \mathrm{logsumexp}_{i \ne y} z_i - \mathrm{logsumexp}_i z_i`: no
    cancellation in :math:`1 - p_y` and a finite gradient at :math:`p_y = 1` for any
    :math:`\gamma > 0` (the power form has an infinite derivative there when :math:`\gamma < 1`).
    :math:`\gamma = 0`, ``alpha=None`` is exactly the cross-entropy.

    Source: Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017, arXiv 1708.02002;
    post 4733, "从loss的硬截断、软化到focal loss", https://kexue.fm/archives/4733. For the
    sigmoid form use ``optax.sigmoid_focal_loss``.

    Args:
      logits: ``[..., num_classes]``.
      labels: integer class indices, ``logits.shape[:-1]``.
      gamma: focusing exponent, >= 0.
      alpha: None (no weighting), a scalar, or per-class weights of shape ``[num_classes]``
        (:math:`\alpha_y` is the target's weight).
      where: optional boolean class mask, broadcastable to ``logits.shape``.

    Returns:
      Per-example loss, ``logits.shape[:-1]``, dtype of ``logits``.

    Example:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from losses import softmax_focal_loss
      >>> logits = jnp.array([[2.0, 0.0, -1.0], [0.0, 1.0, 3.0]])
      >>> print(np.asarray(softmax_focal_loss(logits, jnp.array([0, 1]), gamma=2.0)).round(4))
      [0.0041 1.7026]
    """
    _check_label_values(labels, logits)
    if _numerics.is_concrete(gamma) and np.any(np.asarray(gamma) < 0):
        raise ValueError(f"`gamma` must be >= 0, got {gamma}.")
    return _focal(logits, labels, gamma, alpha, where)


@jax.jit
def _focal(logits: Array, labels: Array, gamma: Array, alpha: Array | None, where: Array | None) -> Array:
    logits, s, labels, mask = _prepare(logits, labels, where)
    log_p, log_one_minus_p, valid = _numerics.softmax_parts(s, labels, mask)
    has_others = jnp.isfinite(log_one_minus_p)
    # With no other class p_y = 1 and log p_y = 0, so the modulating factor is irrelevant; 0 avoids
    # exp(0 * -inf) = NaN when gamma = 0.
    modulator = jnp.where(has_others, jnp.exp(gamma * jnp.where(has_others, log_one_minus_p, 0.0)), 0.0)
    loss = -modulator * log_p
    if alpha is not None:
        alpha = jnp.asarray(alpha, s.dtype)
        if alpha.ndim == 1:
            if alpha.shape[0] != logits.shape[-1]:
                raise ValueError(
                    f"`alpha` must be a scalar or have shape [num_classes] = [{logits.shape[-1]}], "
                    f"got {alpha.shape}."
                )
            alpha = alpha[labels]
        elif alpha.ndim != 0:
            raise ValueError(f"`alpha` must be a scalar or a [num_classes] vector, got shape {alpha.shape}.")
        loss = alpha * loss
    return jnp.where(valid, loss, 0.0).astype(logits.dtype)


def logit_adjusted_cross_entropy(
    logits: Any, labels: Any, *, class_prior: Any, tau: float = 1.0, where: Any = None
) -> Array:
    r"""Logit-adjusted softmax cross-entropy for long-tailed classification.

    .. math::
      \ell = -\log \frac{e^{z_y + \tau \log \pi_y}}{\sum_i e^{z_i + \tau \log \pi_i}}.

    Train with this loss and predict with the plain ``argmax z``: the prior offset is absorbed
    during training, so the raw logits estimate the balanced (prior-free) decision. Scaling
    ``class_prior`` by a constant shifts all logits equally and changes nothing.

    Source: post 7615, "通过互信息思想来缓解类别不平衡问题", https://kexue.fm/archives/7615 (and 7708);
    Menon et al., "Long-tail learning via logit adjustment", ICLR 2021, arXiv 2007.07314.

    Args:
      logits: ``[..., num_classes]``.
      labels: integer class indices, ``logits.shape[:-1]``.
      class_prior: class frequencies :math:`\pi`, positive, broadcastable to ``logits.shape``
        (usually ``[num_classes]``). Positivity is checked for concrete arrays.
      tau: adjustment strength; 0 gives the plain cross-entropy.
      where: optional boolean class mask, broadcastable to ``logits.shape``.

    Returns:
      Per-example loss, ``logits.shape[:-1]``, dtype of ``logits``.

    Example:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from losses import logit_adjusted_cross_entropy
      >>> logits = jnp.array([[2.0, 0.0, -1.0]])
      >>> prior = jnp.array([0.7, 0.2, 0.1])
      >>> print(np.asarray(logit_adjusted_cross_entropy(logits, jnp.array([0]), class_prior=prior)).round(4))
      [0.0448]
    """
    _check_label_values(labels, logits)
    if _numerics.is_concrete(class_prior):
        prior_values = np.asarray(class_prior)
        if prior_values.size and np.any(prior_values <= 0):
            raise ValueError("`class_prior` must be positive for every class (log 0 = -inf).")
    return _logit_adjusted(logits, labels, class_prior, tau, where)


@jax.jit
def _logit_adjusted(
    logits: Array, labels: Array, class_prior: Array, tau: Array, where: Array | None
) -> Array:
    logits, s, labels, mask = _prepare(logits, labels, where)
    prior = _numerics.floating(class_prior, "class_prior")
    try:
        jnp.broadcast_shapes(prior.shape, logits.shape)
    except ValueError:
        raise ValueError(
            f"`class_prior` of shape {prior.shape} does not broadcast to logits {logits.shape}; "
            "pass one frequency per class, shape [num_classes]."
        ) from None
    adjusted = s + tau * jnp.log(prior.astype(s.dtype))
    loss, _ = _cross_entropy(adjusted, labels, mask)
    return loss.astype(logits.dtype)


def smooth_accuracy_loss(logits: Any, labels: Any, *, where: Any = None) -> Array:
    r"""Negative target probability, a smooth surrogate of accuracy.

    .. math::
      \ell = -p_y = -\frac{e^{z_y}}{\sum_i e^{z_i}}.

    Its expectation is minus the expected accuracy of sampling from the softmax; it is bounded,
    so mislabelled examples cannot dominate, but its gradient vanishes for confidently wrong
    examples (start from a cross-entropy-trained model).

    Source: post 9098, "如何训练你的准确率？", https://kexue.fm/archives/9098; Karpukhin et al.,
    "EXACT: How to Train Your Accuracy", arXiv 2205.09615.

    Args:
      logits: ``[..., num_classes]``.
      labels: integer class indices, ``logits.shape[:-1]``.
      where: optional boolean class mask, broadcastable to ``logits.shape``.

    Returns:
      Per-example loss in [-1, 0], ``logits.shape[:-1]``, dtype of ``logits``.

    Example:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from losses import smooth_accuracy_loss
      >>> logits = jnp.array([[2.0, 0.0, -1.0]])
      >>> print(np.asarray(smooth_accuracy_loss(logits, jnp.array([1]))).round(4))
      [-0.1142]
    """
    _check_label_values(labels, logits)
    return _smooth_accuracy(logits, labels, where)


@jax.jit
def _smooth_accuracy(logits: Array, labels: Array, where: Array | None) -> Array:
    logits, s, labels, mask = _prepare(logits, labels, where)
    log_p, _, valid = _numerics.softmax_parts(s, labels, mask)
    return jnp.where(valid, -jnp.exp(log_p), 0.0).astype(logits.dtype)


def exact_loss(logits: Any, labels: Any, *, sigma: Any, margin: Any = 0.0, where: Any = None,
               num_nodes: int = 64) -> Array:
    r"""EXACT: minus the expected accuracy of the argmax of Gaussian-perturbed logits.

    With the model's logits :math:`\mu` as the mean of a stochastic classifier
    :math:`\hat y = \arg\max_i (\mu_i + \sigma\varepsilon_i)`, :math:`\varepsilon \sim N(0, I)`,

    .. math::
      \ell = -P\big[\mu_y + \sigma\varepsilon_y > \mu_j + r + \sigma\varepsilon_j\ \ \forall j \ne y\big]
           = -\int \varphi(t) \prod_{j \ne y} \Phi\Big(\frac{\mu_y - \mu_j - r}{\sigma} + t\Big)\, dt,

    where the second form conditions on :math:`t = \varepsilon_y` (the events are then independent).
    The paper evaluates the orthant probability of the :math:`C - 1` correlated differences with Genz's
    sampling algorithm; here the one-dimensional integral is taken by ``num_nodes``-point Gauss–Hermite
    quadrature in log space (``log Φ`` by ``log_ndtr``), which is deterministic and exact to float
    precision for the smooth integrand. For two classes it is :math:`-\Phi((\mu_y - \mu_j - r)/(\sigma\sqrt2))`.
    As :math:`\sigma \to 0` it tends to minus the 0/1 accuracy (with margin :math:`r`): anneal
    :math:`\sigma` from large to small over training (`exact_sigma_schedule`). The loss depends on
    :math:`\mu / \sigma` only, so the logits' scale must be fixed (the paper normalises them) or the
    model can shrink the effective :math:`\sigma` by growing its weights.

    Source: post 9098, "如何训练你的准确率？", https://kexue.fm/archives/9098; Karpukhin et al.,
    "EXACT: How to Train Your Accuracy", arXiv 2205.09615.

    Args:
      logits: ``[..., num_classes]``, the mean :math:`\mu`.
      labels: integer class indices, ``logits.shape[:-1]``.
      sigma: the noise scale, positive (a scalar or broadcastable to ``logits.shape[:-1]``).
      margin: :math:`r \ge 0`; the target must beat every other class by it.
      where: optional boolean class mask, broadcastable to ``logits.shape``; masked classes never win.
      num_nodes: Gauss–Hermite nodes (64 is exact to ~1e-12 relative for moderate :math:`|\mu/\sigma|`).

    Returns:
      Per-example loss in [-1, 0], ``logits.shape[:-1]``, dtype of ``logits``.

    Example:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from losses import exact_loss
      >>> logits = jnp.array([[0.0, 1.0]])
      >>> print(np.asarray(exact_loss(logits, jnp.array([1]), sigma=1.0)).round(4))  # -Φ(1/√2)
      [-0.7602]
    """
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 2:
        raise ValueError(f"`num_nodes` must be an integer >= 2 (Gauss–Hermite nodes), got {num_nodes!r}.")
    _check_label_values(labels, logits)
    for value, name, zero_allowed in ((sigma, "sigma", False), (margin, "margin", True)):
        if _numerics.is_concrete(value):  # eager calls only, like the label check
            values = np.asarray(value, dtype=np.float64)
            if values.size and not np.all(np.isfinite(values) & ((values >= 0) if zero_allowed else (values > 0))):
                raise ValueError(f"`{name}` must be {'non-negative' if zero_allowed else 'positive'} and finite, got "
                                 f"values in [{values.min()}, {values.max()}].")
    return _exact(logits, labels, sigma, margin, where, num_nodes)


@functools.lru_cache(maxsize=None)
def _hermite_nodes(num_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """(nodes t = √2 x, log weights − ½ log π) of Gauss–Hermite quadrature, so that E_{t~N(0,1)} f(t) ≈ Σ e^{lw} f(t)
    (∫ e^{−x²} f(x) dx ≈ Σ w f(x)); computed once per node count."""
    x, w = np.polynomial.hermite.hermgauss(num_nodes)
    return np.sqrt(2.0) * x, np.log(w) - 0.5 * np.log(np.pi)


@functools.partial(jax.jit, static_argnames="num_nodes")
def _exact(logits: Array, labels: Array, sigma: Any, margin: Any, where: Array | None, num_nodes: int) -> Array:
    nodes, log_weights = _hermite_nodes(num_nodes)  # constants of the trace
    logits, s, labels, mask = _prepare(logits, labels, where)
    valid = _numerics.take_class(mask, labels)
    sigma = jnp.asarray(sigma, s.dtype)[..., None]
    margin = jnp.asarray(margin, s.dtype)[..., None]
    gap = (_numerics.take_class(s, labels)[..., None] - s - margin) / sigma  # [..., C]
    rivals = mask & (jnp.arange(s.shape[-1]) != labels[..., None])
    log_phi = jax.scipy.special.log_ndtr(gap[..., None] + jnp.asarray(nodes, s.dtype))  # [..., C, K]
    log_integrand = jnp.sum(jnp.where(rivals[..., None], log_phi, 0.0), axis=-2)  # [..., K]
    log_accuracy = jax.nn.logsumexp(log_integrand + jnp.asarray(log_weights, s.dtype), axis=-1)
    return jnp.where(valid, -jnp.exp(log_accuracy), 0.0).astype(logits.dtype)


def exact_sigma_schedule(initial: float, final: float, steps: int):
    r"""EXACT's annealing of the noise scale: :math:`\sigma_t = \sigma_0 (\sigma_T/\sigma_0)^{\min(t, T)/T}`,
    geometric from ``initial`` at step 0 to ``final`` at step ``steps`` and constant after (the toy of the
    EXACT code multiplies σ by a constant each step). An optax-style schedule: step → value.

    Source: Karpukhin et al., "EXACT: How to Train Your Accuracy", arXiv 2205.09615; post 9098.
    """
    if not (np.isfinite(initial) and np.isfinite(final) and initial > 0 and final > 0):
        raise ValueError(f"exact_sigma_schedule: `initial` and `final` must be positive, got {initial!r}, {final!r}.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"exact_sigma_schedule: `steps` must be a positive integer, got {steps!r}.")
    log_ratio = float(np.log(final / initial))

    def schedule(step):
        fraction = jnp.clip(jnp.asarray(step, jnp.float32) / steps, 0.0, 1.0)
        return initial * jnp.exp(log_ratio * fraction)

    return schedule
