r"""Contrastive learning: FlatNCE, and big-batch contrastive gradients computed chunk by chunk."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from losses import _numerics

Array = jax.Array


def flatnce(logits: Any, labels: Any, *, where: Any = None) -> Array:
    r"""FlatNCE: a contrastive loss whose gradient does not vanish in float arithmetic.

    .. math::
      \ell = \log \xi = \mathrm{logsumexp}_{i \ne t}\, s_i - s_t,
      \qquad \xi = \sum_{i \ne t} e^{s_i - s_t}.

    The paper writes the loss as :math:`\xi / \mathrm{sg}(\xi)` (value 1, useless for logging);
    :math:`\log \xi` has the same gradient, :math:`\nabla\xi / \xi`, and a meaningful value:
    :math:`\ell = \mathrm{InfoNCE} + \log(1 - p_t)`, where InfoNCE :math:`= -\log p_t`. With
    small batches InfoNCE's gradient :math:`1 - p_t` rounds to 0 once :math:`p_t \approx 1`;
    FlatNCE's does not, since it never forms :math:`1 - p_t`.

    Source: post 8586, "FlatNCE：小批次对比学习效果差的原因竟是浮点误差？",
    https://kexue.fm/archives/8586; Chen et al., "Simpler, Faster, Stronger: Breaking the
    log-K Curse on Contrastive Learners with FlatNCE", arXiv 2107.01152.

    Args:
      logits: similarity scores (already divided by the temperature), ``[..., num_candidates]``,
        ``num_candidates >= 2``.
      labels: integer index of the positive candidate, ``logits.shape[:-1]``.
      where: optional boolean candidate mask (e.g. padded negatives), broadcastable to
        ``logits.shape``. A row whose positive is masked, or that has no unmasked negative, has
        loss 0 and zero gradient.

    Returns:
      Per-example loss, ``logits.shape[:-1]``, dtype of ``logits``.

    Example:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from losses import flatnce
      >>> scores = jnp.array([[5.0, 1.0, 0.0], [0.0, 2.0, 2.0]])
      >>> print(np.asarray(flatnce(scores, jnp.array([0, 1]))).round(4))
      [-3.6867  0.1269]
    """
    if jnp.ndim(logits) >= 1:
        _numerics.check_index_range(labels, jnp.shape(logits)[-1])  # eager calls only
    return _flatnce(logits, labels, where)


@jax.jit
def _flatnce(logits: Array, labels: Array, where: Array | None) -> Array:
    logits = _numerics.floating(logits, "logits")
    _numerics.check_num_classes(logits, minimum=2)
    labels = _numerics.check_index_labels(labels, logits)
    mask = _numerics.class_mask(where, logits.shape)
    s = logits.astype(_numerics.compute_dtype(logits.dtype))

    log_p, log_one_minus_p, valid = _numerics.softmax_parts(s, labels, mask)
    valid &= jnp.isfinite(log_one_minus_p)
    # log ξ = logsumexp_{i≠t} s_i - s_t = log(1 - p_t) - log p_t, each part from a logsumexp.
    loss = jnp.where(valid, jnp.where(valid, log_one_minus_p, 0.0) - log_p, 0.0)
    return loss.astype(logits.dtype)


def contrastive_grad_cache(
    embed_fn: Callable[[Any, Any, Any], Any],
    loss_fn: Callable[[Any], Array],
    *,
    num_chunks: int,
) -> Callable[[Any, Any, Any], tuple[Array, Any]]:
    r"""Exact gradient of a batch-coupled loss, embedding the batch a chunk at a time (GradCache).

    A contrastive loss couples every example of the batch (each one is a negative for the
    others), so ordinary gradient accumulation over micro-batches changes the loss. Instead,
    with :math:`h = \mathrm{embed}(\theta, x)`:

    .. math::
      \nabla_\theta L(h) = \sum_{c} \nabla_\theta \big\langle \mathrm{embed}(\theta, x_c),
      \mathrm{sg}(g_c) \big\rangle, \qquad g = \partial L / \partial h,

    1. embed every chunk without keeping activations, concatenate, and get :math:`L` and
       :math:`g` (memory: the embeddings of the whole batch only);
    2. re-embed chunk by chunk, back-propagating :math:`\langle h_c, \mathrm{sg}(g_c)\rangle` and
       summing the parameter gradients (memory: the activations of one chunk).

    Chunk ``c`` (examples ``[c * B/num_chunks, (c+1) * B/num_chunks)``) is embedded with the key
    ``jax.random.split(rng, num_chunks)[c]`` in both passes, so dropout draws the same masks
    twice and the result equals ``jax.grad`` of
    ``params -> loss_fn(concatenate_c(embed_fn(params, chunk_c, keys[c])))`` to float tolerance.

    Source: post 8471, "对比学习可以使用梯度累积吗？", https://kexue.fm/archives/8471; Gao et al.,
    "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup" (GradCache),
    arXiv 2101.06983.

    Args:
      embed_fn: ``embed_fn(params, batch, rng) -> embeddings``; ``batch`` is a pytree whose leaves
        have a leading batch axis, ``embeddings`` a pytree of arrays with a leading batch axis
        (e.g. a ``(queries, documents)`` pair). ``rng`` is a key, or None if the caller passes
        None.
      loss_fn: ``loss_fn(embeddings) -> scalar``, any (reduced) loss of the whole batch's
        embeddings; per-batch targets can be closed over inside the caller's jitted step.
      num_chunks: number of chunks; must divide the batch size.

    Returns:
      ``value_and_grad(params, batch, rng=None) -> (loss, grads)``, like ``jax.value_and_grad``
      of the full-batch loss with respect to ``params``. It can be wrapped in ``jax.jit``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import numpy as np
      >>> from losses import contrastive_grad_cache
      >>> embed = lambda w, x, rng: jnp.tanh(x @ w)
      >>> loss = lambda h: -jnp.mean(jax.nn.log_softmax(h @ h.T / 0.1, axis=-1).diagonal())
      >>> w, x = jnp.eye(3)[:, :2], jnp.arange(12.0).reshape(4, 3) / 12
      >>> value_and_grad = jax.jit(contrastive_grad_cache(embed, loss, num_chunks=2))
      >>> value, grads = value_and_grad(w, x, None)
      >>> full = jax.jit(jax.grad(lambda w: loss(embed(w, x, None))))(w)
      >>> bool(jnp.allclose(grads, full, atol=1e-5))
      True
    """
    if not isinstance(num_chunks, int) or num_chunks < 1:
        raise ValueError(f"`num_chunks` must be a positive int, got {num_chunks!r}.")

    def value_and_grad(params: Any, batch: Any, rng: Any = None) -> tuple[Array, Any]:
        chunks = _split_batch(batch, num_chunks)
        keys = None if rng is None else jax.random.split(rng, num_chunks)

        # Pass 1: embeddings of every chunk, no activations kept (nothing differentiates this).
        stacked = jax.lax.map(lambda xs: embed_fn(params, xs[0], xs[1]), (chunks, keys))
        stacked = jax.lax.stop_gradient(stacked)
        embeddings = jax.tree.map(lambda e: e.reshape(-1, *e.shape[2:]), stacked)
        loss, embedding_grads = jax.value_and_grad(loss_fn)(embeddings)
        chunk_grads = jax.tree.map(lambda g, e: g.reshape(e.shape), embedding_grads, stacked)

        # Pass 2: re-embed each chunk and back-propagate <h_c, sg(g_c)>, summing over chunks.
        def accumulate(total: Any, xs: Any) -> tuple[Any, None]:
            chunk, key, grads_c = xs

            def surrogate(p: Any) -> Array:
                h = embed_fn(p, chunk, key)
                products = jax.tree.map(lambda a, g: jnp.sum(_upcast(a) * _upcast(g)), h, grads_c)
                return sum(jax.tree.leaves(products))

            step = jax.grad(surrogate)(params)
            return jax.tree.map(jnp.add, total, step), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, _ = jax.lax.scan(accumulate, zeros, (chunks, keys, chunk_grads))
        return loss, grads

    return value_and_grad


def _upcast(x: Array) -> Array:
    return x.astype(_numerics.compute_dtype(x.dtype))


def _split_batch(batch: Any, num_chunks: int) -> Any:
    """[batch, ...] leaves -> [num_chunks, batch // num_chunks, ...], with readable errors."""
    leaves = jax.tree.leaves(batch)
    if not leaves:
        raise ValueError("`batch` has no arrays to split into chunks.")
    sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"every leaf of `batch` needs the same leading batch size, got {sorted(map(str, sizes))}."
        )
    (size,) = sizes
    if size % num_chunks:
        raise ValueError(f"`num_chunks`={num_chunks} must divide the batch size {size}.")
    return jax.tree.map(lambda x: jnp.reshape(x, (num_chunks, size // num_chunks, *jnp.shape(x)[1:])), batch)
