"""TransformerEncoder (BERT/RoFormer) against a float64 NumPy forward pass and the identities its masks imply.

The reference is written from the formulas of BERT (Devlin et al., arXiv 1810.04805) and RoFormer (Su et al.,
arXiv 2104.09864; https://kexue.fm/archives/8265) with the model's own parameters, independently of Hugging
Face. The masks are those of models.masks: UniLM (https://kexue.fm/archives/6933) and causal.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from scipy.special import erf

from models import masks
from models.transformer import TransformerConfig, TransformerEncoder

# initializer_range 0.2 (not BERT's 0.02) so attention is far from uniform and tokens visibly move each other.
TINY = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_positions=16,
            dropout_rate=0.0, attention_dropout_rate=0.0, initializer_range=0.2, layer_norm_eps=1e-12)
VARIANTS = {  # rotary post-norm with factorised embeddings (ALBERT/ELECTRA-style), learned pre-norm
    "rope_post_factorised": dict(position="rope", norm_position="post", embedding_size=16),
    "learned_pre": dict(position="learned", norm_position="pre"),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def model_and_params(request):
    cfg = TransformerConfig(**TINY, **VARIANTS[request.param])
    model = TransformerEncoder(cfg)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((2, 10), jnp.int32))["params"]
    return model, nn.unbox(params)


def _seq2seq(source, target, n):
    """Segment ids (source 0, target 1, padding 0) and padding mask `[batch, n]` for per-row lengths."""
    segments, valid = np.zeros((len(source), n), np.int32), np.zeros((len(source), n), bool)
    for b, (s, t) in enumerate(zip(source, target)):
        segments[b, s:s + t] = 1
        valid[b, :s + t] = True
    return jnp.asarray(segments), jnp.asarray(valid)


@functools.partial(jax.jit, static_argnames=("model", "kind"))
def _jitted_forward(model, params, tokens, segments, valid, kind):
    mask = masks.mask_from_tokens(kind, segment_ids=segments, padding_mask=valid)
    return model.apply({"params": params}, tokens, segment_ids=segments, padding_mask=valid, attention_mask=mask)


def _forward(model, params, tokens, segments, valid, kind):
    """The model's outputs (NumPy) under the `kind` mask of these segments and padding."""
    return jax.tree.map(np.asarray, _jitted_forward(model, params, tokens, segments, valid, kind))


def _changed(tokens, column):
    return tokens.at[:, column].set((tokens[:, column] + 29) % 64)


def test_unilm_sources_ignore_targets_and_targets_ignore_later_targets(model_and_params):
    model, params = model_and_params
    segments, valid = _seq2seq((4, 3), (5, 5), 10)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 10), 0, 64)
    base = _forward(model, params, tokens, segments, valid, "unilm")["hidden"]
    for j in (4, 6):  # a target of both rows
        out = _forward(model, params, _changed(tokens, j), segments, valid, "unilm")["hidden"]
        np.testing.assert_array_equal(out[:, :j], base[:, :j])
        assert not np.allclose(out[:, j + 1:8], base[:, j + 1:8], atol=1e-4)  # later targets see it
    out = _forward(model, params, _changed(tokens, 1), segments, valid, "unilm")["hidden"]
    assert not np.allclose(out[:, 0], base[:, 0], atol=1e-4)  # the source is bidirectional


def test_causal_positions_ignore_later_tokens(model_and_params):
    model, params = model_and_params
    segments, valid = _seq2seq((10, 10), (0, 0), 10)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 10), 0, 64)
    base = _forward(model, params, tokens, segments, valid, "causal")["hidden"]
    out = _forward(model, params, _changed(tokens, 5), segments, valid, "causal")["hidden"]
    np.testing.assert_array_equal(out[:, :5], base[:, :5])
    assert not np.allclose(out[:, 6:], base[:, 6:], atol=1e-4)


def test_outputs_at_valid_positions_ignore_padded_tokens(model_and_params):
    model, params = model_and_params
    valid = jnp.array([[True] * 10, [True] * 6 + [False] * 4])
    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 10), 0, 64)
    other = tokens.at[1, 6:].set((tokens[1, 6:] + 11) % 64)
    apply = jax.jit(lambda t, m: model.apply({"params": params}, t, padding_mask=m))
    base, out = apply(tokens, valid), apply(other, valid)
    np.testing.assert_array_equal(np.asarray(out["hidden"][1, :6]), np.asarray(base["hidden"][1, :6]))
    np.testing.assert_array_equal(np.asarray(out["pooled"]), np.asarray(base["pooled"]))
    unmasked = apply(other, jnp.ones_like(valid))["hidden"]  # the same program, padding visible: it moves
    assert not np.allclose(np.asarray(unmasked[1, :6]), np.asarray(base["hidden"][1, :6]), atol=1e-4)


@pytest.mark.parametrize("kind", ["unilm", "causal"])
def test_kv_cache_decoding_equals_the_full_forward(model_and_params, kind):
    """The source in one call, then one token at a time against the whole cache (make_mask with the unwritten
    slots invalid), equals one full pass: hidden states and MLM logits."""
    model, params = model_and_params
    n, source = 10, 4
    segments, _ = _seq2seq((source, source), (n - source, n - source), n)
    tokens = jax.random.randint(jax.random.PRNGKey(4), (2, n), 0, 64)
    full = _forward(model, params, tokens, segments, jnp.ones((2, n), bool), kind)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((2, n), jnp.int32), decode=True))
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.unbox(shapes["cache"]))
    counts, positions = masks.segment_counts(segments), jnp.broadcast_to(jnp.arange(n), (2, n))

    @jax.jit
    def step(cache, start, tokens, segments_now):
        stop = start + tokens.shape[1]
        query = jnp.arange(tokens.shape[1]) + start
        written = jnp.broadcast_to(jnp.arange(n) < stop, (2, n))
        mask = masks.make_mask(kind, query_segments=segments_now, query_counts=jnp.take(counts, query, axis=1),
                               query_positions=jnp.broadcast_to(query, tokens.shape),
                               key_segments=jnp.where(written, segments, 0), key_counts=jnp.where(written, counts, 0),
                               key_positions=positions, key_valid=written)
        out, variables = model.apply({"params": params, "cache": cache}, tokens, segment_ids=segments_now,
                                     attention_mask=mask, decode=True, heads=("mlm",), mutable=["cache"])
        return variables["cache"], out

    pieces = []
    for start, stop in [(0, source)] + [(t, t + 1) for t in range(source, n)]:
        cache, out = step(cache, start, tokens[:, start:stop], segments[:, start:stop])
        pieces.append(out)
    for key in ("hidden", "mlm_logits"):
        got = np.concatenate([np.asarray(p[key]) for p in pieces], axis=1)
        np.testing.assert_allclose(got, full[key], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="decoding with a cache needs attention_mask"):
        model.apply({"params": params, "cache": cache}, tokens[:, :1], decode=True, mutable=["cache"])


def _layer_norm(x, p, eps=1e-12):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps) * p["scale"] + p["bias"]


def _gelu(x):
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def _np_rope(x, positions, base=10000.0):
    """Float64 RoPE on `[..., n, heads, d]`, half-split pairs (x_i, x_{i+d/2}) rotated by m·θ_i."""
    d = x.shape[-1]
    angles = (positions[:, None] * base ** (-np.arange(0, d, 2) / d))[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([x1 * np.cos(angles) - x2 * np.sin(angles), x2 * np.cos(angles) + x1 * np.sin(angles)], -1)


def _np_bert(p, cfg, tokens, segments, mask):
    """One post-norm layer, loop-free float64: embeddings + LN (+ projection), MHA, GELU FFN, tied MLM head,
    pooler. mask `[batch, n, n]` bool."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    emb = p["embeddings"]
    n = tokens.shape[1]
    h = emb["word_embeddings"]["embedding"][tokens] + emb["token_type_embeddings"]["embedding"][segments]
    if cfg.position == "learned":
        h = h + emb["position_embeddings"]["embedding"][:n]
    h = _layer_norm(h, emb["norm"])
    if "embeddings_project" in p:
        h = h @ p["embeddings_project"]["kernel"] + p["embeddings_project"]["bias"]
    a = p["layer_0"]["attention"]
    q, k, v = (np.einsum("bnd,dhk->bnhk", h, a[name]["kernel"]) + a[name]["bias"] for name in ("query", "key", "value"))
    if cfg.position == "rope":
        q, k = _np_rope(q, np.arange(n)), _np_rope(k, np.arange(n))
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(cfg.head_dim)
    scores = np.where(mask[:, None], scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights = weights / weights.sum(-1, keepdims=True)
    attended = np.einsum("bhqk,bkhd,hde->bqe", weights, v, a["output"]["kernel"]) + a["output"]["bias"]
    h = _layer_norm(h + attended, p["layer_0"]["attention_norm"])
    mlp = p["layer_0"]["mlp"]
    ffn = _gelu(h @ mlp["intermediate"]["kernel"] + mlp["intermediate"]["bias"]) @ mlp["output"]["kernel"]
    h = _layer_norm(h + ffn + mlp["output"]["bias"], p["layer_0"]["mlp_norm"])
    head = p["mlm_head"]
    t = _layer_norm(_gelu(h @ head["transform"]["kernel"] + head["transform"]["bias"]), head["norm"])
    logits = t @ emb["word_embeddings"]["embedding"].T + head["output_bias"]
    pooled = np.tanh(h[:, 0] @ p["pooler"]["kernel"] + p["pooler"]["bias"])
    return {"hidden": h, "mlm_logits": logits, "pooled": pooled}


@pytest.mark.parametrize("position, embedding_size", [("learned", 0), ("rope", 24)])
def test_one_layer_post_norm_bert_matches_float64_numpy(position, embedding_size):
    cfg = TransformerConfig(**{**TINY, "num_layers": 1}, position=position, embedding_size=embedding_size)
    model = TransformerEncoder(cfg)
    segments, valid = _seq2seq((3, 4), (5, 2), 8)
    tokens = jax.random.randint(jax.random.PRNGKey(5), (2, 8), 0, 64)
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(1), tokens)["params"])
    rng = np.random.default_rng(0)  # LayerNorm scales and biases away from 1 and 0, so the test sees them
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + rng.normal(scale=0.3, size=x.shape).astype(np.float32)
        if "norm" in jax.tree_util.keystr(path) or "bias" in jax.tree_util.keystr(path) else x, params)
    mask = masks.mask_from_tokens("unilm", segment_ids=segments, padding_mask=valid)
    got = jax.jit(lambda p: model.apply({"params": p}, tokens, segment_ids=segments, attention_mask=mask))(params)
    want = _np_bert(params, cfg, np.asarray(tokens), np.asarray(segments), np.asarray(mask))
    for key in ("hidden", "mlm_logits", "pooled"):
        np.testing.assert_allclose(np.asarray(got[key]), want[key], rtol=1e-5, atol=1e-5, err_msg=key)
    assert np.abs(want["mlm_logits"]).max() > 1  # large enough that a wrong term would show


RULES = (("batch", "data"), ("heads", "model"), ("mlp", "model"), ("vocab", "model"),
         ("act_heads", "model"), ("act_mlp", "model"), ("act_vocab", "model"))


def test_sharded_over_data_and_model_axes_equals_unsharded():
    """Parameters and activations over a ('data', 'model') = (2, 4) mesh: heads, the FFN's hidden units and the
    vocabulary split four ways, the batch two ways (flax lm1b's logical_to_mesh_sharding recipe)."""
    cfg = TransformerConfig(**TINY, **VARIANTS["rope_post_factorised"])
    model = TransformerEncoder(cfg)
    segments, valid = _seq2seq((3, 4), (5, 4), 10)
    tokens = jax.random.randint(jax.random.PRNGKey(6), (2, 10), 0, 64)
    mask = masks.mask_from_tokens("unilm", segment_ids=segments, padding_mask=valid)
    apply = jax.jit(lambda p, t, s, m: model.apply({"params": p}, t, segment_ids=s, attention_mask=m))
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), tokens)["params"])
    want = jax.tree.map(np.asarray, apply(params, tokens, segments, mask))
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)["params"]
        sharded = jax.device_put(params, nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, RULES))
        batch = NamedSharding(mesh, P("data"))
        got = apply(sharded, *(jax.device_put(x, batch) for x in (tokens, segments, mask)))
    query = sharded["layer_0"]["attention"]["query"]["kernel"]
    assert query.sharding.spec == P(None, "model", None)  # [embed, heads, head_dim]: one head per device
    assert query.addressable_shards[0].data.shape == (32, 1, 8)
    assert sharded["layer_0"]["mlp"]["intermediate"]["kernel"].sharding.spec == P(None, "model")
    assert got["mlm_logits"].sharding.spec[0] == "data"
    for key in want:
        np.testing.assert_allclose(np.asarray(got[key]), want[key], rtol=1e-5, atol=1e-5, err_msg=key)
