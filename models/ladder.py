"""Ladder Side-Tuning (Sung, Cho and Bansal, arXiv 2206.06522; https://kexue.fm/archives/9138).

A frozen backbone's embedding output and layer outputs `h_0, h_1, …, h_L` (`TransformerEncoder(heads=
('hidden_states',))`) feed a small side Transformer of width `d / reduction`:

    s_0 = W_0 h_0
    s_i = Layer_i(fuse(s_{i-1}, W_i h_{t_i}))     for the tapped backbone layers t_1 < … < t_k
    gated (the paper):  fuse(s, x) = μ_i s + (1 − μ_i) x,  μ_i = σ(α_i / T), α_i = 0 at init, T = 0.1
    added (the post):   fuse(s, x) = s + x

The backbone's outputs enter under `stop_gradient`, so backpropagation runs through the side network alone:
its cost and its activation memory are those of a network 1/reduction as wide, not of the backbone (adapters
and P-tuning train few parameters but still backpropagate through every layer above the lowest one). The
paper also initialises the side layers from a pruned copy of the backbone; here they start from the usual
normal initialisation.

Shapes: hidden_states L + 1 arrays `[batch, n, d]` (a list), or a mapping from layer number to array holding at
least layer 0 and the taps (what a cache of the backbone's outputs keeps); returns `[batch, n, d / reduction]`.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import layers
from models.transformer import TransformerConfig, TransformerLayer

FUSIONS = ("gated", "added")


def side_config(backbone: TransformerConfig, reduction: int) -> TransformerConfig:
    """The side Transformer's config: the backbone's width, heads' count (at least one head of ≥ 8 dims) and FFN
    divided by `reduction`, no adapters or prompts."""
    hidden = max(8, backbone.hidden_size // reduction)
    heads = max(1, min(backbone.num_heads, hidden // 8))
    while hidden % heads or (hidden // heads) % 2:
        heads -= 1
    return dataclasses.replace(backbone, hidden_size=hidden, num_heads=heads,
                               intermediate_size=max(8, backbone.intermediate_size // reduction), embedding_size=0,
                               adapter_size=0, num_prompts=0, remat=False)


class LadderSideNetwork(nn.Module):
    """The side network over the backbone's `hidden_states`; `taps` are the backbone layers (1 … L) it reads."""

    backbone: TransformerConfig
    reduction: int = 8
    taps: tuple[int, ...] = ()  # () : every layer
    fusion: str = "gated"
    gate_temperature: float = 0.1

    @nn.compact
    def __call__(self, hidden_states, mask, *, train: bool = False):
        if self.fusion not in FUSIONS:
            raise ValueError(f"LadderSideNetwork: fusion is {self.fusion!r}; expected one of {list(FUSIONS)}")
        cfg = side_config(self.backbone, self.reduction)
        taps = self.taps or tuple(range(1, self.backbone.num_layers + 1))
        missing = [i for i in (0,) + taps if not (i in hidden_states if isinstance(hidden_states, dict)
                                                  else i < len(hidden_states))]
        if missing:
            raise ValueError(f"LadderSideNetwork: hidden_states lack the backbone layers {missing} (taps {taps})")
        hidden_states = {i: jax.lax.stop_gradient(hidden_states[i]) for i in (0,) + taps}
        down = lambda x, name: layers.Projection(  # noqa: E731
            (cfg.hidden_size,), ("embed", None), dtype=cfg.compute_dtype,
            kernel_init=nn.initializers.normal(stddev=cfg.initializer_range), name=name)(x)
        s = down(hidden_states[0], "down_0")
        n = s.shape[1]
        rope = layers.rope_tables(np.arange(n)[None], cfg.head_dim, base=cfg.rope_base) if cfg.position == "rope" \
            else None
        for i, tap in enumerate(taps, start=1):
            x = down(hidden_states[tap], f"down_{i}")
            if self.fusion == "gated":
                alpha = self.param(f"gate_{i}", nn.initializers.zeros, (), jnp.float32)
                mu = jax.nn.sigmoid(alpha / self.gate_temperature).astype(s.dtype)
                s = mu * s + (1 - mu) * x
            else:
                s = s + x
            s = TransformerLayer(cfg, deterministic=not train, name=f"layer_{i}")(s, mask, rope)
        return s
