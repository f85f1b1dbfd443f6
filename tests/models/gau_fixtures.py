"""Small gated-attention language models whose attention is far from uniform, for behaviour tests."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.gau import GAUConfig, GAULanguageModel


def sharpen(params, *, gamma=100.0, projections=10.0):
    """Scales the scale-offsets γ and the U/V/Z projections up from their N(0, 0.02²) init.

    At init the scores Q·K are ~1e-3 and attention is nearly uniform (or nearly zero for relu²), so a
    test could pass with attention doing nothing; scaled up, tokens visibly influence one another.
    """
    def scale(path, x):
        name = jax.tree_util.keystr(path)
        if "gamma" in name:
            return x * gamma
        if "'z'" in name or "'uv'" in name:
            return x * projections
        return x
    return jax.tree_util.tree_map_with_path(scale, params)


@functools.lru_cache(maxsize=None)
def _cached_model(seed, overrides):
    cfg = GAUConfig(**{"num_layers": 2, "embed_dim": 32, "key_dim": 16, **dict(overrides)})
    model = GAULanguageModel(cfg)
    # One jitted init compiles faster than running init op by op.
    params = jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32))["params"]
    return model, sharpen(nn.unbox(params))


def tiny_model(seed=0, **overrides):
    """(model, sharpened params) of a 2-layer d=32, s=16 model; `overrides` are GAUConfig fields.

    Cached: tests that ask for the same model share one initialisation (params are immutable arrays).
    """
    return _cached_model(seed, tuple(sorted(overrides.items())))
