"""Autoregressive decoding of the GAU language model with a KV cache.

Generation first runs the whole prompt through the model in one call (filling the cache), then one
token at a time inside a `lax.scan`; each new token attends to the cache, so its cost does not grow
with its position beyond the attention over cached keys.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


def init_cache(model: nn.Module, batch_size: int, max_length: int):
    """An all-zero decode cache for `max_length` positions (shapes from `jax.eval_shape`, nothing run)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((batch_size, max_length),
                                                                                jnp.int32), decode=True))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.unbox(shapes["cache"]))


def sample_logits(logits: jax.Array, rng: jax.Array, *, temperature: float, top_k: int) -> jax.Array:
    """Token ids `[batch]` from logits `[batch, vocab]`: greedy at temperature 0, else top-k sampling."""
    if temperature == 0:
        return jnp.argmax(logits, -1)
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(rng, logits / temperature)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k"))
def generate_tokens(model: nn.Module, params, prompt: jax.Array, rng: jax.Array, *, max_new_tokens: int,
                    temperature: float, top_k: int) -> tuple[jax.Array, jax.Array]:
    """Continues `prompt` `[batch, p]`. Returns (new tokens `[batch, max_new_tokens]`, their logits)."""
    cache = init_cache(model, prompt.shape[0], prompt.shape[1] + max_new_tokens)
    logits, variables = model.apply({"params": params, "cache": cache}, prompt, decode=True, mutable=["cache"])

    def step(carry, key):
        cache, last_logits = carry
        token = sample_logits(last_logits, key, temperature=temperature, top_k=top_k)
        logits, variables = model.apply({"params": params, "cache": cache}, token[:, None], decode=True,
                                        mutable=["cache"])
        return (variables["cache"], logits[:, -1]), (token, last_logits)

    keys = jax.random.split(rng, max_new_tokens)
    _, (tokens, token_logits) = jax.lax.scan(step, (variables["cache"], logits[:, -1]), keys)
    return tokens.T, token_logits.swapaxes(0, 1)


def sample_text(model: nn.Module, params, *, prompt: str, max_new_tokens: int, rng: jax.Array,
                temperature: float = 0.8, top_k: int = 40) -> str:
    """Prompt plus a byte-level continuation, decoded as UTF-8 (invalid bytes replaced)."""
    prompt_bytes = prompt.encode("utf-8") or b"\n"
    prompt_tokens = jnp.asarray([list(prompt_bytes)], jnp.int32)
    tokens, _ = generate_tokens(model, params, prompt_tokens, rng, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_k=top_k)
    return (prompt_bytes + bytes(jax.device_get(tokens[0]).astype("uint8").tolist())).decode("utf-8", "replace")
