"""Sample text from a trained LM with a KV cache:
`python -m train_lib.generate --workdir DIR --prompt "def " --max_new_tokens 200`.

Generation first runs the whole prompt through the model in one call (filling the cache), then
one token at a time inside a `lax.scan`; each new token attends to the cache, so its cost does not
grow with its position beyond the attention over cached keys.
"""
from __future__ import annotations

import functools
import json
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import flags

from train_lib import cli


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


def load_params(workdir: pathlib.Path, *, use_ema: bool):
    """(task, params) from the newest checkpoint in `workdir`, restored onto one device."""
    from train_lib import checkpointing, config_lib, optim, tasks, trainer

    config_path = workdir / "config.json"
    if not config_path.is_file():
        raise config_lib.ConfigError(f"--workdir: {str(workdir)!r} has no config.json; is it a training workdir?")
    config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
    task = tasks.get_task(config)
    checkpointer = checkpointing.Checkpointer(workdir / "checkpoints", keep=config.keep_checkpoints)
    step = checkpointer.latest_step()
    if step is None:
        raise config_lib.ConfigError(f"--workdir: {str(workdir / 'checkpoints')!r} holds no checkpoint yet")
    init_fn = functools.partial(trainer.init_state, task=task, optimizer=optim.make_optimizer(config),
                                ema=config.ema_decay > 0)
    abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(0), task.batch_spec(1))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
    state = checkpointer.restore(step, abstract, None)
    checkpointer.close()
    params = state.ema_params if (use_ema and state.ema_params is not None) else state.params
    return task, params, step


def main(argv: list[str]) -> None:
    flags.DEFINE_string("workdir", None, "Training workdir whose newest checkpoint to sample from.")
    flags.DEFINE_string("prompt", "def ", "Text to continue.")
    flags.DEFINE_integer("max_new_tokens", 200, "Number of bytes to generate.")
    flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 = greedy.")
    flags.DEFINE_integer("top_k", 40, "Sample among the k most likely bytes; 0 = all.")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_bool("use_ema", True, "Use the EMA parameters when the run kept them.")
    cli.parse_flags(argv)
    f = flags.FLAGS
    if not f.workdir:
        cli.fail("--workdir is required")
    if f.max_new_tokens <= 0 or f.temperature < 0 or f.top_k < 0:
        cli.fail("--max_new_tokens must be positive, --temperature and --top_k non-negative")

    def body():
        task, params, step = load_params(pathlib.Path(f.workdir), use_ema=f.use_ema)
        text = sample_text(task.model, params, prompt=f.prompt, max_new_tokens=f.max_new_tokens,
                           rng=jax.random.PRNGKey(f.seed), temperature=f.temperature, top_k=f.top_k)
        print(f"# checkpoint step {step}\n{text}")

    cli.run_guarded(body)


if __name__ == "__main__":
    main(sys.argv)
