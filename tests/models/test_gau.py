"""GAU layer, RoPE and attention normalisers against float64 NumPy and the identities they must satisfy."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import attention, layers
from models.gau import GAUConfig, GAULanguageModel


def _np_rope(x, positions, base=10000.0):
    """Float64 RoPE, half-split pairing: (x_i, x_{i+d/2}) rotated by m·θ_i."""
    d = x.shape[-1]
    theta = base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    ang = positions[:, None].astype(np.float64) * theta
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


def test_rope_matches_numpy_and_is_relative():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 300, 16)).astype(np.float32)
    positions = np.arange(300)
    sin, cos = layers.rope_tables(jnp.asarray(positions), 16)
    got = np.asarray(layers.apply_rope(jnp.asarray(x), sin, cos))
    np.testing.assert_allclose(got[0], _np_rope(x[0].astype(np.float64), positions), atol=2e-4)
    # (R_m q)·(R_n k) = q·(R_{n-m} k): depends only on n − m.
    q, k = rng.normal(size=16), rng.normal(size=16)
    for m, n in [(3, 10), (100, 107), (250, 257)]:
        lhs = _np_rope(q[None], np.array([m])) @ _np_rope(k[None], np.array([n])).T
        rhs = q @ _np_rope(k[None], np.array([n - m]))[0]
        np.testing.assert_allclose(lhs.item(), rhs, rtol=1e-10)
    # and the float32 tables reproduce it at long positions
    qs = layers.apply_rope(jnp.asarray(np.stack([q, q])[None], jnp.float32), *layers.rope_tables(jnp.array([5, 2005]), 16))
    ks = layers.apply_rope(jnp.asarray(np.stack([k, k])[None], jnp.float32), *layers.rope_tables(jnp.array([12, 2012]), 16))
    np.testing.assert_allclose(float(qs[0, 0] @ ks[0, 0]), float(qs[0, 1] @ ks[0, 1]), rtol=2e-3)


def _np_normalize(name, scores, mask, s):
    scores = scores.astype(np.float64)
    counts = np.maximum(mask.sum(-1, keepdims=True), 1)
    if name == "softmax":
        z = np.where(mask, scores / np.sqrt(s), -np.inf)
        z = z - z.max(-1, keepdims=True)
        w = np.where(mask, np.exp(z), 0.0)
        return w / w.sum(-1, keepdims=True)
    if name == "relu2":
        return np.where(mask, np.maximum(scores / np.sqrt(s), 0) ** 2 / counts, 0.0)
    raise KeyError(name)


@pytest.mark.parametrize("name", ["softmax", "relu2"])
def test_normalizers_match_numpy_with_causal_and_padding_masks(name):
    rng = np.random.default_rng(1)
    scores = rng.normal(scale=8.0, size=(2, 7, 7)).astype(np.float32)
    key_valid = np.array([[True] * 7, [True] * 4 + [False] * 3])
    mask = np.asarray(attention.attention_mask(jnp.arange(7), jnp.arange(7), causal=True,
                                               key_valid=jnp.asarray(key_valid)))
    assert mask[1, 6].sum() == 4 and mask[0, 2].sum() == 3  # l = visible, unpadded keys
    got = attention.get_normalizer(name)(jnp.asarray(scores), jnp.asarray(mask), key_dim=16, train_length=7)
    np.testing.assert_allclose(np.asarray(got), _np_normalize(name, scores, mask, 16), rtol=1e-5, atol=1e-7)


def test_unknown_normalizer_lists_choices():
    with pytest.raises(ValueError, match="relu2"):
        attention.get_normalizer("relu3")


def _model_and_params(normalizer, causal=True, scale=20.0):
    cfg = GAUConfig(num_layers=2, embed_dim=32, key_dim=16, normalizer=normalizer, causal=causal)
    model = GAULanguageModel(cfg)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    # Scale the scale-offsets up from their N(0, 0.02²) init so attention is far from uniform.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x * scale if "gamma" in jax.tree_util.keystr(p) else x, params)
    return model, params


@pytest.mark.parametrize("normalizer", ["softmax", "relu2"])
def test_kv_cache_decoding_equals_full_forward(normalizer):
    model, params = _model_and_params(normalizer)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, 256)
    full = model.apply({"params": params}, tokens)
    from train_lib.generate import init_cache
    cache = init_cache(model, 2, 16)
    pieces = []
    for chunk in (tokens[:, :5], tokens[:, 5:6], tokens[:, 6:7], tokens[:, 7:12]):  # prompt, tokens, a chunk
        logits, variables = model.apply({"params": params, "cache": cache}, chunk, decode=True, mutable=["cache"])
        cache = variables["cache"]
        pieces.append(logits)
    decoded = jnp.concatenate(pieces, axis=1)
    assert float(jnp.max(jnp.abs(full))) > 0.1
    np.testing.assert_allclose(np.asarray(decoded), np.asarray(full), rtol=1e-5, atol=1e-5)


def test_generate_tokens_logits_equal_full_forward():
    from train_lib.generate import generate_tokens
    model, params = _model_and_params("softmax")
    prompt = jnp.array([[100, 101, 102]], jnp.int32)
    tokens, logits = generate_tokens(model, params, prompt, jax.random.PRNGKey(0), max_new_tokens=6,
                                     temperature=1.0, top_k=0)
    full = model.apply({"params": params}, jnp.concatenate([prompt, tokens], axis=1))
    # logits[:, i] predicted token i from everything before it
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full[:, 2:-1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("normalizer", ["softmax", "relu2"])
def test_causal_model_ignores_future_tokens(normalizer):
    model, params = _model_and_params(normalizer)
    a = jax.random.randint(jax.random.PRNGKey(2), (1, 10), 0, 256)
    b = a.at[:, 6:].set((a[:, 6:] + 17) % 256)
    out_a, out_b = model.apply({"params": params}, a), model.apply({"params": params}, b)
    np.testing.assert_array_equal(np.asarray(out_a[:, :6]), np.asarray(out_b[:, :6]))
    assert not np.allclose(np.asarray(out_a[:, 6:]), np.asarray(out_b[:, 6:]))


def test_bidirectional_model_sees_future_tokens():
    model, params = _model_and_params("softmax", causal=False)
    a = jax.random.randint(jax.random.PRNGKey(2), (1, 10), 0, 256)
    b = a.at[:, 9].set((a[:, 9] + 17) % 256)
    assert not np.allclose(np.asarray(model.apply({"params": params}, a)[:, 0]),
                           np.asarray(model.apply({"params": params}, b)[:, 0]))


def test_parameters_carry_logical_names_and_gau_size():
    cfg = GAUConfig(num_layers=1, embed_dim=64, key_dim=32, use_bias=False)
    variables = jax.eval_shape(GAULanguageModel(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    layer = variables["params"]["layer_0"]
    assert layer["uv"]["kernel"].names == ("embed", None, "expand")
    assert layer["z"]["kernel"].names == ("embed", "qk")
    assert layer["out"]["kernel"].names == ("expand", "embed")
    d, e, s = 64, 128, 32
    count = sum(np.prod(x.value.shape) for x in jax.tree.leaves(layer, is_leaf=lambda x: hasattr(x, "names")))
    assert count == 3 * d * e + d * s + 2 * s + d  # W_uv, W_o, W_z, γ of Q and K (no β without biases), norm


def test_bfloat16_compute_keeps_float32_parameters_and_float32_logits():
    cfg = GAUConfig(num_layers=2, embed_dim=32, key_dim=16, dtype="bfloat16")
    model = GAULanguageModel(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 16), 0, 256)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), tokens)["params"])
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    low = model.apply({"params": params}, tokens)
    high = GAULanguageModel(GAUConfig(num_layers=2, embed_dim=32, key_dim=16)).apply({"params": params}, tokens)
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(low), np.asarray(high), atol=0.05)
    assert not np.array_equal(np.asarray(low), np.asarray(high))  # really computed in bfloat16
