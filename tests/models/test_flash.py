"""FLASH (mixed chunk attention) and behaviour shared by all gated attention layers: causality, padding,
decoding state, sharding. References: float64 NumPy loops (gau_references) and the quadratic GAU layer."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from experiments import gau_lm
from models import attention, flash, layers
from models.gau import GAUConfig, GatedAttentionUnit
from tests.models import gau_references as ref
from tests.models.gau_fixtures import sharpen, tiny_model


def _inputs(seed, b=2, n=10, s=8, e=6):
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    qk = [jax.random.normal(k, (b, n, s)) for k in keys[:4]]
    return (*qk, jax.random.normal(keys[4], (b, n, e)))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("normalizer", ["relu2_paper", "softmax_plus"])
def test_mixed_chunk_attention_matches_numpy(causal, normalizer):
    """n = 10 is not a multiple of C = 4 (the last chunk is padded); row 1 also has padding inside."""
    inputs = _inputs(0)
    key_valid = np.ones((2, 10), bool)
    key_valid[1, [3, 8, 9]] = False
    got, _ = jax.jit(lambda *a: flash.mixed_chunk_attention(
        *a, chunk_size=4, causal=causal, normalizer=attention.get_normalizer(normalizer), train_length=10,
        key_valid=jnp.asarray(key_valid)))(*inputs)
    want = ref.mixed_chunk_attention(*map(np.asarray, inputs), chunk_size=4, causal=causal, normalizer=normalizer,
                                     key_valid=key_valid)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def _layer_params(layer, x, rope, seed):
    return nn.unbox(jax.jit(layer.init)(jax.random.PRNGKey(seed), x, rope, jnp.arange(x.shape[1]))["params"])


@pytest.mark.parametrize("normalizer, n, chunk", [("relu2_paper", 8, 8),
                                                  pytest.param("softmax", 6, 8, marks=pytest.mark.slow)])
def test_one_chunk_flash_equals_quadratic_gau_layer(normalizer, n, chunk):
    """Causal FLASH with one chunk over the whole sequence has no earlier chunks, so its global part is
    zero and it is a GAU whose Q, K are Q_quad, K_quad (relu2_paper: the paper's /C equals /n when C = n)."""
    cfg = GAUConfig(num_layers=1, embed_dim=16, key_dim=8, normalizer=normalizer, attention="flash", chunk_size=chunk)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, n, 16))
    rope = layers.rope_tables(jnp.arange(n), 8)
    flash_layer = flash.FlashLayer(cfg)
    params = sharpen(_layer_params(flash_layer, x, rope, 1))
    gau_params = {**params, "qk_scale_offset": jax.tree.map(lambda t: t[:2], params["qk_scale_offset"])}
    got, _ = flash_layer.apply({"params": params}, x, rope, jnp.arange(n))
    want, _ = GatedAttentionUnit(cfg).apply({"params": gau_params}, x, rope, jnp.arange(n))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    assert np.max(np.abs(np.asarray(got - x))) > 1e-2  # the layer does something


def test_noncausal_flash_is_permutation_consistent():
    """Without positions, non-causal FLASH is equivariant to permutations that keep chunks together
    (whole chunks reordered, tokens reordered inside a chunk) — and only to those."""
    fn = jax.jit(lambda *a: flash.mixed_chunk_attention(*a, chunk_size=4, causal=False,
                                                        normalizer=attention.relu2_paper, train_length=12)[0])
    inputs = _inputs(1, n=12)
    out = np.asarray(fn(*inputs))
    for perm in (np.r_[8:12, 0:4, 4:8], np.r_[3, 1, 0, 2, 4:8, 11, 10, 9, 8]):
        np.testing.assert_allclose(np.asarray(fn(*(t[:, perm] for t in inputs))), out[:, perm], rtol=1e-5, atol=1e-6)
    mixing = np.r_[4, 1:4, 0, 5:12]  # swaps tokens of different chunks: the local groups change
    permuted = np.asarray(fn(*(t[:, mixing] for t in inputs)))
    assert not np.allclose(permuted, out[:, mixing], atol=1e-3)
    want = ref.mixed_chunk_attention(*(np.asarray(t)[:, mixing] for t in inputs), chunk_size=4, causal=False,
                                     normalizer="relu2_paper")
    np.testing.assert_allclose(permuted, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attention_kind", ["gau", "flash", pytest.param("performer", marks=pytest.mark.slow)])
def test_future_and_padding_tokens_never_change_earlier_outputs(attention_kind):
    model, params = tiny_model(attention=attention_kind, chunk_size=4)
    apply = jax.jit(lambda tokens, padding: model.apply({"params": params}, tokens, padding_mask=padding))
    a = jax.random.randint(jax.random.PRNGKey(2), (2, 12), 0, 256)
    full = jnp.ones((2, 12), bool)
    future = a.at[:, 6:].set((a[:, 6:] + 17) % 256)
    out_a, out_future = np.asarray(apply(a, full)), np.asarray(apply(future, full))
    np.testing.assert_array_equal(out_a[:, :6], out_future[:, :6])
    assert not np.allclose(out_a[:, 6:], out_future[:, 6:], atol=1e-4)
    # Padding (the last 3 positions of row 0, position 2 of row 1): its tokens never matter.
    padding = full.at[0, 9:].set(False).at[1, 2].set(False)
    padded = a.at[0, 9:].set(0).at[1, 2].set(0)
    out_p, out_p2 = np.asarray(apply(a, padding)), np.asarray(apply(padded, padding))
    valid = np.asarray(padding)
    np.testing.assert_array_equal(out_p[valid], out_p2[valid])
    assert not np.allclose(out_p[1, 3:], out_a[1, 3:], atol=1e-4)  # the padded key really was left out


@pytest.mark.parametrize("normalizer", ["relu2_paper", "softmax"])
def test_flash_decode_state_equals_full_forward(normalizer):
    """Token-by-token (and piece-by-piece) decoding through the constant-size state, across chunk borders."""
    q_quad, k_quad, q_lin, k_lin, v = _inputs(3, n=11)
    kwargs = dict(normalizer=attention.get_normalizer(normalizer), train_length=11)
    full, _ = flash.mixed_chunk_attention(q_quad, k_quad, q_lin, k_lin, v, chunk_size=4, causal=True, **kwargs)
    b, s, e = 2, 8, 6
    state = flash.FlashDecodeState(jnp.zeros((b, s, e)), jnp.zeros((b, s, e)), jnp.zeros((b, 4, s)),
                                   jnp.zeros((b, 4, e)))
    decode = jax.jit(lambda st, *a: flash.decode_tokens(st, *a, **kwargs))
    pieces = []
    for start, stop in ((0, 5), (5, 6), (6, 7), (7, 11)):
        state, out = decode(state, *(t[:, start:stop] for t in (q_quad, k_quad, q_lin, k_lin, v)),
                            jnp.arange(start, stop))
        pieces.append(out)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(pieces, 1)), np.asarray(full), rtol=1e-5, atol=1e-5)


def test_flash_language_model_decoding_equals_full_forward():
    """The LM threads positions and per-layer states: a prompt, then single tokens across chunk borders."""
    from train_lib.lm.decoding import init_cache
    model, params = tiny_model(attention="flash", chunk_size=4, normalizer="relu2_paper")
    # constant size: the state of a 4096-token cache is the state of a 16-token one
    assert jax.tree.map(jnp.shape, init_cache(model, 2, 16)) == jax.tree.map(jnp.shape, init_cache(model, 2, 4096))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, 256)
    full = model.apply({"params": params}, tokens)
    cache = init_cache(model, 2, 16)
    step = jax.jit(lambda cache, chunk: model.apply({"params": params, "cache": cache}, chunk, decode=True,
                                                    mutable=["cache"]))
    pieces = []
    for start, stop in ((0, 3), *((i, i + 1) for i in range(3, 9))):
        logits, variables = step(cache, tokens[:, start:stop])
        cache = variables["cache"]
        pieces.append(logits)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(pieces, 1)), np.asarray(full), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_flash_generation_equals_full_forward():
    from train_lib.lm.decoding import generate_tokens
    model, params = tiny_model(attention="flash", chunk_size=4, normalizer="relu2_paper")
    prompt = jnp.array([[100, 101, 102]], jnp.int32)
    new, logits = generate_tokens(model, params, prompt, jax.random.PRNGKey(0), max_new_tokens=6,
                                  temperature=1.0, top_k=0)
    again = model.apply({"params": params}, jnp.concatenate([prompt, new], axis=1))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(again[:, 2:-1]), rtol=1e-5, atol=1e-5)


def test_causal_flash_never_materialises_per_token_states():
    """Memory b·(n/C)·(C+s)·e at most (the stacked [V_g ; M_g] of each chunk): no intermediate of the causal
    forward pass is as large as the per-token states b·n·s·e."""
    b, n, s, e, c = 1, 1024, 16, 32, 32
    args = [jax.ShapeDtypeStruct((b, n, d), jnp.float32) for d in (s, s, s, s, e)]
    jaxpr = jax.make_jaxpr(lambda *a: flash.mixed_chunk_attention(
        *a, chunk_size=c, causal=True, normalizer=attention.relu2_paper, train_length=n))(*args)
    sizes = [int(np.prod(var.aval.shape)) for eqn in jaxpr.jaxpr.eqns for var in eqn.outvars]
    assert max(sizes) <= max(b * (n // c) * (c + s) * e, b * n * c) < b * n * s * e


@pytest.mark.parametrize("attention_kind, rules", [pytest.param("gau", "tensor", marks=pytest.mark.slow),
                                                   ("flash", "tensor"), ("flash", "sequence")])
def test_sharded_over_model_axis_equals_unsharded(attention_kind, rules):
    """Parameters split over e and s (tensor rules) or activations over the sequence (sequence rules) on a
    model axis of 2 devices give the single-device result."""
    rules = {"tensor": gau_lm.LOGICAL_AXIS_RULES, "sequence": gau_lm.SEQUENCE_PARALLEL_RULES}[rules]
    model, params = tiny_model(attention=attention_kind, chunk_size=4)
    tokens = jax.random.randint(jax.random.PRNGKey(4), (2, 16), 0, 256)
    apply = lambda p, t: model.apply({"params": p}, t)  # noqa: E731
    want = np.asarray(jax.jit(apply)(params, tokens))
    mesh = Mesh(np.array(jax.devices()[:2]).reshape(1, 1, 2), ("data", "fsdp", "model"))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)["params"]
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
        sharded = jax.device_put(params, shardings)
        got = np.asarray(jax.jit(apply)(sharded, tokens))
    uv = sharded["layer_0"]["uv"]["kernel"]
    assert ("model" in uv.sharding.spec) == (rules is gau_lm.LOGICAL_AXIS_RULES)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
