"""GAU layer, RoPE and attention normalisers against float64 NumPy and the identities they must satisfy."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from models import attention, layers
from models.gau import GAUConfig, GAULanguageModel
from tests.models import gau_references as ref
from tests.models.gau_fixtures import tiny_model


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


@pytest.mark.parametrize("name", sorted(attention.NORMALIZERS))
def test_normalizers_match_numpy_with_causal_and_padding_masks(name):
    rng = np.random.default_rng(1)
    scores = rng.normal(scale=8.0, size=(2, 7, 7)).astype(np.float32)
    key_valid = np.array([[True] * 7, [True] * 4 + [False] * 3])
    mask = np.asarray(attention.attention_mask(jnp.arange(7), jnp.arange(7), causal=True,
                                               key_valid=jnp.asarray(key_valid)))
    assert mask[1, 6].sum() == 4 and mask[0, 2].sum() == 3  # l = visible, unpadded keys
    got = attention.get_normalizer(name)(jnp.asarray(scores), jnp.asarray(mask), key_dim=16, train_length=5)
    want = ref.normalize(name, scores, mask, key_dim=16, train_length=5)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=1e-7)
    assert np.all(np.asarray(got)[~mask] == 0)


def test_relu2_paper_divides_every_row_by_the_unpadded_sequence_length():
    """The documented choice: n is the sequence's length without padding, the same for all causal rows."""
    scores = jnp.full((2, 6, 6), 3.0)
    key_valid = jnp.array([[True] * 6, [True] * 4 + [False] * 2])
    mask = attention.attention_mask(jnp.arange(6), jnp.arange(6), causal=True, key_valid=key_valid)
    weights = np.asarray(attention.relu2_paper(scores, mask, key_dim=16, train_length=99))
    np.testing.assert_allclose(weights[0][np.asarray(mask[0])], (3.0 / 6) ** 2)
    np.testing.assert_allclose(weights[1][np.asarray(mask[1])], (3.0 / 4) ** 2)
    explicit = attention.relu2_paper(scores, mask, key_dim=16, train_length=99, sequence_length=jnp.array([6, 4]))
    np.testing.assert_array_equal(np.asarray(explicit), weights)


def test_normalizers_handle_extreme_scores_and_empty_rows():
    scores = jnp.array([[[3000.0, -3000.0, 2990.0], [5.0, 6.0, 7.0]]])
    mask = jnp.array([[[True, True, True], [False, False, False]]])
    for name in attention.NORMALIZERS:
        got = np.asarray(attention.get_normalizer(name)(scores, mask, key_dim=1, train_length=3))
        assert np.all(np.isfinite(got)) and np.all(got[0, 1] == 0), name
    got = np.asarray(attention.l2(scores, mask, key_dim=1, train_length=3))[0, 0]
    want = ref.normalize_row("l2", np.asarray(scores[0, 0]), np.ones(3, bool), key_dim=1)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(np.sum(got ** 2), 1.0, rtol=1e-6)  # unit ℓ2 norm, not unit sum


def test_softmax_plus_scale_follows_visible_length():
    """softmax_plus = softmax with logits scaled by log(max(l,16))/log 512: l = 512 is plain softmax."""
    rng = np.random.default_rng(2)
    scores = jnp.asarray(rng.normal(size=(1, 1, 512)), jnp.float32)
    mask = jnp.ones((1, 1, 512), bool)
    np.testing.assert_allclose(np.asarray(attention.softmax_plus(scores, mask, key_dim=4, train_length=1)),
                               np.asarray(attention.softmax(scores, mask, key_dim=4, train_length=1)), rtol=1e-5)
    short = mask.at[..., 8:].set(False)  # l = 8 < 16: the scale is log 16 / log 512 = 4/9
    np.testing.assert_allclose(np.asarray(attention.softmax_plus(scores, short, key_dim=4, train_length=1)),
                               np.asarray(attention.softmax(scores * 4 / 9, short, key_dim=4, train_length=1)),
                               rtol=1e-5, atol=1e-7)


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


@pytest.mark.parametrize("normalizer", ["softmax", "relu2_paper", "l2", *(
    pytest.param(name, marks=pytest.mark.slow) for name in ("relu2", "relu2_fixed", "softmax_plus"))])
def test_kv_cache_decoding_equals_full_forward(normalizer):
    model, params = tiny_model(normalizer=normalizer, train_length=12)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, 256)
    full = model.apply({"params": params}, tokens)
    from train_lib.lm.decoding import init_cache
    # relu2_paper divides by the sequence length n, which under decoding is the cache length.
    cache = init_cache(model, 2, 12 if normalizer == "relu2_paper" else 16)
    pieces = []
    for chunk in (tokens[:, :5], tokens[:, 5:6], tokens[:, 6:7], tokens[:, 7:12]):  # prompt, tokens, a chunk
        logits, variables = model.apply({"params": params, "cache": cache}, chunk, decode=True, mutable=["cache"])
        cache = variables["cache"]
        pieces.append(logits)
    decoded = jnp.concatenate(pieces, axis=1)
    earlier = model.apply({"params": params}, tokens.at[:, 0].set((tokens[:, 0] + 1) % 256))
    assert float(jnp.max(jnp.abs(earlier[:, -1] - full[:, -1]))) > 1e-3  # attention carries information
    np.testing.assert_allclose(np.asarray(decoded), np.asarray(full), rtol=1e-5, atol=1e-5)


def test_generate_tokens_logits_equal_full_forward():
    from train_lib.lm.decoding import generate_tokens
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


def test_realformer_adds_previous_layer_scores():
    """Post 8027: S_l = Q_l K_lᵀ + S_{l−1}. Layer 1 given layer 0's scores returns its own plus those."""
    from models.gau import GatedAttentionUnit
    cfg = GAUConfig(num_layers=2, embed_dim=32, key_dim=16, residual_scores=True)
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 6, 32))
    rope = layers.rope_tables(jnp.arange(6), 16)
    layer = GatedAttentionUnit(cfg)
    p0, p1 = (nn.unbox(layer.init(jax.random.PRNGKey(i), x, rope, jnp.arange(6))["params"]) for i in (1, 2))
    x1, s0 = layer.apply({"params": p0}, x, rope, jnp.arange(6))
    _, own = layer.apply({"params": p1}, x1, rope, jnp.arange(6))
    (y_res, s1), state = layer.apply({"params": p1}, x1, rope, jnp.arange(6), None, None, s0,
                                     mutable=["intermediates"])
    np.testing.assert_allclose(np.asarray(s1), np.asarray(own + s0), rtol=1e-6)
    weights = state["intermediates"]["attention_weights"][0]
    mask = attention.attention_mask(jnp.arange(6), jnp.arange(6), causal=True)
    np.testing.assert_allclose(np.asarray(weights), ref.normalize("softmax", np.asarray(own + s0), np.asarray(mask),
                                                                  key_dim=16), rtol=1e-5, atol=1e-7)
    # and the language model threads the scores through: switching it off changes layer 1 only
    model, params = tiny_model(residual_scores=True)
    plain = GAULanguageModel(GAUConfig(num_layers=2, embed_dim=32, key_dim=16))
    tokens = jnp.arange(10)[None] * 7
    _, with_res = model.apply({"params": params}, tokens, mutable=["intermediates"])
    _, without = plain.apply({"params": params}, tokens, mutable=["intermediates"])
    w = lambda s, i: np.asarray(s["intermediates"][f"layer_{i}"]["attention_weights"][0])  # noqa: E731
    np.testing.assert_array_equal(w(with_res, 0), w(without, 0))
    assert not np.allclose(w(with_res, 1), w(without, 1), atol=1e-3)


def test_hierarchical_positions_keep_first_rows_and_follow_post_7947():
    from models.positions import hierarchical_position_embeddings
    table = np.random.default_rng(3).normal(size=(5, 4)).astype(np.float32)
    positions = np.arange(25)
    got = np.asarray(hierarchical_position_embeddings(jnp.asarray(table), jnp.asarray(positions), alpha=0.4))
    np.testing.assert_array_equal(got[:5], table)  # the first n positions are the trained table, bit for bit
    np.testing.assert_allclose(got, ref.hierarchical_positions(table, positions, 0.4), rtol=1e-5, atol=1e-6)
    # A model with the extension equals one without it up to the table's length, and runs beyond it.
    model, params = tiny_model(position="learned_hierarchical", max_positions=8)
    flat = GAULanguageModel(GAUConfig(num_layers=2, embed_dim=32, key_dim=16, position="learned", max_positions=8))
    tokens = jnp.arange(20)[None] * 11 % 256
    np.testing.assert_array_equal(np.asarray(model.apply({"params": params}, tokens[:, :8])),
                                  np.asarray(flat.apply({"params": params}, tokens[:, :8])))
    assert np.all(np.isfinite(np.asarray(model.apply({"params": params}, tokens))))


def test_gau_alpha_init_std_and_post_norm():
    """GAU-α: truncated normal, std L^{-1/3}/√fan_in after truncation (1.13684723 corrects it); Post-Norm
    with a scale-free RMSNorm leaves every layer's output with unit root-mean-square."""
    init = layers.depth_scaled_truncated_normal(24)
    w = np.asarray(init(jax.random.PRNGKey(0), (768, 2, 1536)))
    target = 24 ** (-1 / 3) / np.sqrt(768)
    assert abs(w.std() / target - 1) < 0.01
    assert np.abs(w).max() <= 2 * 1.13684723 * target * (1 + 1e-6)
    cfg = dict(norm_position="post", norm="rmsnorm_noscale", use_bias=False, kernel_init="gau_alpha",
               normalizer="softmax_plus", causal=False)
    model, params = tiny_model(**cfg)
    assert "norm" not in params["layer_0"]  # the scale-free RMSNorm has no parameters
    assert "bias" not in params["layer_0"]["uv"] and "final_norm" not in params
    emb = np.asarray(params["embed"]["embedding"])
    assert abs(emb.std() / (2 ** (-1 / 3) / np.sqrt(32)) - 1) < 0.05  # the embedding's fan-in is d
    _, state = model.apply({"params": params}, jnp.arange(12)[None], capture_intermediates=True,
                           mutable=["intermediates"])
    out = np.asarray(state["intermediates"]["layer_1"]["__call__"][0][0])
    np.testing.assert_allclose(np.sqrt(np.mean(out ** 2, axis=-1)), 1.0, rtol=1e-4)


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


def test_relu2_needs_unit_qk_scale_to_get_gradients():
    """With γ ~ N(0, 0.02²) the scores are ~1e-5 and relu² sits at its saddle: the loss gradient reaching
    γ is orders of magnitude below softmax's, so relu² models never learn to attend (see ScaleOffset);
    `qk_scale_init='ones'` gives it a usable gradient."""
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 17), 0, 256)

    def gamma_grad_norm(**cfg):
        model = GAULanguageModel(GAUConfig(num_layers=1, embed_dim=32, key_dim=16, **cfg))
        params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(1), tokens[:, :-1])["params"])
        loss = lambda p: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
            model.apply({"params": p}, tokens[:, :-1]), tokens[:, 1:]))
        return float(jnp.linalg.norm(jax.jit(jax.grad(loss))(params)["layer_0"]["qk_scale_offset"]["gamma"]))

    stuck, unit = gamma_grad_norm(normalizer="relu2"), gamma_grad_norm(normalizer="relu2", qk_scale_init="ones")
    assert unit > 1e3 * stuck and gamma_grad_norm(normalizer="softmax") > 1e2 * stuck


@pytest.mark.parametrize("attention, remat", [("gau", False), ("flash", False), ("gau", True)])
def test_scanned_layers_equal_the_unrolled_stack(attention, remat):
    """`scan_layers` (with or without remat inside the scan) with the unrolled model's parameters stacked gives
    the same logits and gradients, decodes the same tokens through the (stacked) KV cache, and captures the same
    attention maps."""
    import dataclasses
    from models.gau import stack_layer_params
    from train_lib.lm.evaluate import capture_attention
    from train_lib.lm.decoding import generate_tokens
    model, params = tiny_model(attention=attention, chunk_size=4)
    scanned = GAULanguageModel(dataclasses.replace(model.config, scan_layers=True, remat=remat))
    stacked = stack_layer_params(params, 2)
    shapes = nn.unbox(jax.eval_shape(scanned.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(lambda x: x.shape, stacked)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, 256)
    np.testing.assert_allclose(np.asarray(scanned.apply({"params": stacked}, tokens)),
                               np.asarray(model.apply({"params": params}, tokens)), rtol=1e-5, atol=1e-5)

    def loss(m):
        return lambda p: jnp.mean(m.apply({"params": p}, tokens) ** 2)
    grad_scanned = jax.grad(loss(scanned))(stacked)
    grad_unrolled = stack_layer_params(jax.grad(loss(model))(params), 2)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6),
                 grad_scanned, grad_unrolled)

    prompt = tokens[:1, :3]
    ours = generate_tokens(scanned, stacked, prompt, jax.random.PRNGKey(0), max_new_tokens=4, temperature=0.0, top_k=0)
    theirs = generate_tokens(model, params, prompt, jax.random.PRNGKey(0), max_new_tokens=4, temperature=0.0, top_k=0)
    np.testing.assert_array_equal(np.asarray(ours[0]), np.asarray(theirs[0]))
    np.testing.assert_allclose(np.asarray(ours[1]), np.asarray(theirs[1]), rtol=1e-5, atol=1e-5)

    maps, reference = capture_attention(scanned, stacked, tokens[:1]), capture_attention(model, params, tokens[:1])
    assert list(maps) == list(reference)
    for name in reference:
        np.testing.assert_allclose(maps[name], reference[name], rtol=1e-5, atol=1e-6)


def test_scanned_layer_parameters_get_a_leading_layers_axis():
    cfg = GAUConfig(num_layers=3, embed_dim=64, key_dim=32, scan_layers=True)
    params = jax.eval_shape(GAULanguageModel(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    assert "layer_0" not in params
    assert params["layers"]["uv"]["kernel"].names == ("layers", "embed", None, "expand")
    assert params["layers"]["uv"]["kernel"].value.shape == (3, 64, 2, 128)
    from models.gau import stack_layer_params
    with pytest.raises(ValueError, match=r"missing \['layer_2'\], extra \[\]"):
        stack_layer_params({"layer_0": {}, "layer_1": {}}, 3)
    with pytest.raises(ValueError, match=r"missing \[\], extra \['layer_2'\]"):
        stack_layer_params({"layer_0": {}, "layer_1": {}, "layer_2": {}}, 2)
    for bad in (dict(residual_scores=True), dict(attention="performer")):
        model = GAULanguageModel(GAUConfig(num_layers=2, embed_dim=32, key_dim=16, scan_layers=True, **bad))
        with pytest.raises(ValueError, match="scan_layers needs residual_scores=False"):
            jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
