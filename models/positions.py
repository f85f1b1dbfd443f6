"""Position encodings of the GAU language model, chosen by name from `POSITIONS` (`model.position`).

- `rope`: rotary positions on Q and K (Su et al., RoFormer, arXiv 2104.09864; https://kexue.fm/archives/8265);
  the embeddings are left alone.
- `learned`: a learned absolute table `p` `[max_positions, d]` added to the token embeddings.
- `learned_hierarchical`: the same table, extended to `max_positions²` positions by the hierarchical
  decomposition of https://kexue.fm/archives/7947: `u_i = (p_i − α p_0)/(1 − α)` and position
  `i·n + j` (0-based) gets `α u_i + (1 − α) u_j`, α = 0.4. For i = 0 this is `p_j`, so the first n
  positions are exactly the trained table and a model keeps its behaviour at its training length.
- `none`: no positions at all (a bag of tokens up to the causal mask).

Each entry is `fn(config, x, positions) -> (x, rope)` with x `[batch, n, d]` embeddings, positions
`[n]` global positions and `rope` the (sin, cos) tables the layers rotate Q and K with, or None.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers


def hierarchical_position_embeddings(table: jax.Array, positions: jax.Array, *, alpha: float) -> jax.Array:
    """Embeddings `[..., d]` of `positions` `[...]` (< n²) from an n-row table `[n, d]` (post 7947).

    Rows i = 0 are returned as the table's rows themselves (not recomputed through u), so the first n
    positions are bit-for-bit unchanged.
    """
    n = table.shape[0]
    u = (table - alpha * table[:1]) / (1.0 - alpha)
    i, j = positions // n, positions % n
    extended = alpha * jnp.take(u, i, axis=0) + (1.0 - alpha) * jnp.take(u, j, axis=0)
    return jnp.where((i == 0)[..., None], jnp.take(table, j, axis=0), extended)


class LearnedPositions(nn.Module):
    """A learned absolute position table `[max_positions, d]`, optionally hierarchically extended.

    Args (call): positions `[n]` (ints). Returns `[n, d]` in float32.
    """

    max_positions: int
    features: int
    hierarchical: bool = False
    alpha: float = 0.4
    embedding_init: layers.Initializer = layers.DEFAULT_KERNEL_INIT

    @nn.compact
    def __call__(self, positions: jax.Array) -> jax.Array:
        table = self.param("table", layers.partitioned(self.embedding_init, (None, "embed")),
                           (self.max_positions, self.features), jnp.float32)
        if self.hierarchical:
            return hierarchical_position_embeddings(table, positions, alpha=self.alpha)
        return jnp.take(table, positions, axis=0)


def rotary(cfg: Any, x: jax.Array, positions: jax.Array):
    return x, layers.rope_tables(positions, cfg.key_dim, base=cfg.rope_base)


def _learned(cfg: Any, x: jax.Array, positions: jax.Array, *, hierarchical: bool):
    init = layers.KERNEL_INITS[cfg.kernel_init](cfg.num_layers, fan_in_axis=-1)
    table = LearnedPositions(cfg.max_positions, cfg.embed_dim, hierarchical=hierarchical,
                             alpha=cfg.hierarchical_alpha, embedding_init=init, name="positions")
    return x + table(positions).astype(x.dtype)[None], None


def learned(cfg: Any, x: jax.Array, positions: jax.Array):
    return _learned(cfg, x, positions, hierarchical=False)


def learned_hierarchical(cfg: Any, x: jax.Array, positions: jax.Array):
    return _learned(cfg, x, positions, hierarchical=True)


def no_positions(cfg: Any, x: jax.Array, positions: jax.Array):
    del cfg, positions
    return x, None


POSITIONS: dict[str, Callable[..., tuple[jax.Array, Any]]] = {
    "rope": rotary,
    "learned": learned,
    "learned_hierarchical": learned_hierarchical,
    "none": no_positions,
}

# The longest sequence each encoding covers, from `max_positions` n (None: any length).
MAX_LENGTH: dict[str, Callable[[int], int | None]] = {
    "rope": lambda n: None,
    "learned": lambda n: n,
    "learned_hierarchical": lambda n: n * n,
    "none": lambda n: None,
}
