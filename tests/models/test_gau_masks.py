"""GAU layers and the GAU language model under explicit attention masks (models.masks): UniLM and UniAE.

GAU-α with the UniLM mask is the seq2seq model of Su, https://kexue.fm/archives/9052 (UniLM: Dong et al.,
arXiv 1905.03197; https://kexue.fm/archives/6933; UniAE: https://kexue.fm/archives/8475). References: a
float64 NumPy GAU layer written from the formulas (gau_references' normalisers, one row at a time, so each
row's visible-key count comes from its own mask row), perturbation identities and the full forward pass.
"""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import layers, masks
from models.gau import GAUConfig, GAULanguageModel, GatedAttentionUnit, attention_implementation, stack_layer_params
from tests.models import gau_references as ref
from tests.models.gau_fixtures import tiny_model

# GAU-α (post 9052): post-norm, scale-free RMSNorm, no biases, depth-scaled init, softmax_plus, bidirectional.
GAU_ALPHA = dict(norm_position="post", norm="rmsnorm_noscale", use_bias=False, kernel_init="gau_alpha",
                 normalizer="softmax_plus")
VARIANTS = {"pre_norm": dict(normalizer="softmax"), "gau_alpha": GAU_ALPHA}


def _seq2seq(source, target, padding=(0, 0), batch=2):
    """Segment ids `[batch, n]` (source 0, target 1, padding 0) and padding mask; row b has source[b] tokens,
    target[b] and padding[b]."""
    n = source[0] + target[0] + padding[0]
    segments, valid = np.zeros((batch, n), np.int32), np.zeros((batch, n), bool)
    for b in range(batch):
        segments[b, source[b]:source[b] + target[b]] = 1
        valid[b, :source[b] + target[b]] = True
    return segments, valid


def _np_rope(x, positions, base=10000.0):
    """Float64 RoPE, half-split pairing: (x_i, x_{i+d/2}) rotated by m·θ_i."""
    d = x.shape[-1]
    angles = positions[:, None].astype(np.float64) * base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([x1 * np.cos(angles) - x2 * np.sin(angles), x2 * np.cos(angles) + x1 * np.sin(angles)], -1)


def _np_gau_layer(p, x, mask, normalizer, key_dim):
    """One pre-norm GAU layer in float64 (arXiv 2202.10447; post 8934): returns (output, attention weights)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    silu = lambda t: t / (1 + np.exp(-t))  # noqa: E731
    h = x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + 1e-6) * p["norm"]["scale"]
    uv = silu(np.einsum("bnd,dte->bnte", h, p["uv"]["kernel"]) + p["uv"]["bias"])
    u, v = uv[..., 0, :], uv[..., 1, :]
    z = silu(h @ p["z"]["kernel"] + p["z"]["bias"])
    gamma, beta = p["qk_scale_offset"]["gamma"], p["qk_scale_offset"]["beta"]
    positions = np.arange(x.shape[1])
    q, k = _np_rope(z * gamma[0] + beta[0], positions), _np_rope(z * gamma[1] + beta[1], positions)
    scores = np.einsum("bqs,bks->bqk", q, k)
    weights = ref.normalize(normalizer, scores, mask, key_dim=key_dim)
    return x + (u * (weights @ v)) @ p["out"]["kernel"] + p["out"]["bias"], weights, scores


def _with_row_count(normalizer, scores, mask, count, key_dim):
    """softmax_plus or relu2 weights over the visible keys of `mask`, but with l = `count` `[batch]` in every
    row: what a layer that took its counts from another mask (the whole sequence's) would compute."""
    z = scores / np.sqrt(key_dim)
    count = count[:, None, None].astype(np.float64)
    if normalizer == "relu2":
        return np.where(mask, np.maximum(z, 0) ** 2 / count, 0.0)
    z = np.where(mask, z * np.log(np.maximum(count, 16)) / np.log(512), -np.inf)
    return np.exp(z - z.max(-1, keepdims=True)) / np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)


@pytest.mark.parametrize("normalizer", ["softmax", "softmax_plus", "relu2", "relu2_paper"])
def test_gau_layer_under_a_unilm_mask_matches_float64_numpy(normalizer):
    """Rows of 12 source + 14 target (and 10 + 12 + 4 padding) tokens: every row sees a different number of
    keys (12 for the source, 13 … 26 for the targets), which softmax_plus's log l (l > 16) and relu2's 1/l
    must follow; relu2_paper divides every row by the unpadded length. Padding comes as key_valid."""
    cfg = GAUConfig(num_layers=1, embed_dim=16, key_dim=8, normalizer=normalizer, causal=False)
    segments, valid = _seq2seq((12, 10), (14, 12), (0, 4))
    mask = np.asarray(masks.mask_from_tokens("unilm", segment_ids=jnp.asarray(segments)))  # padding: key_valid
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 26, 16))
    layer = GatedAttentionUnit(cfg)
    rope = layers.rope_tables(np.arange(26), 8)
    shapes = jax.eval_shape(layer.init, jax.random.PRNGKey(0), jnp.zeros((2, 26, 16)), rope, np.arange(26))
    params = jax.tree.map(lambda s: rng.normal(scale=0.5, size=s.shape).astype(np.float32), nn.unbox(shapes["params"]))
    params["qk_scale_offset"]["gamma"] = (2.0 + rng.normal(size=(2, 8))).astype(np.float32)  # far from uniform
    (got, _), state = layer.apply({"params": params}, jnp.asarray(x, jnp.float32), rope, np.arange(26),
                                  jnp.asarray(valid), None, None, jnp.asarray(mask), mutable=["intermediates"])
    visible = mask & valid[:, None]
    want, want_weights, scores = _np_gau_layer(params, x.astype(np.float32).astype(np.float64), visible,
                                               normalizer, 8)
    weights = np.asarray(state["intermediates"]["attention_weights"][0])
    np.testing.assert_allclose(weights, want_weights, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
    assert np.all(weights[~visible] == 0)
    if normalizer in ("softmax_plus", "relu2"):  # the per-row count matters: the whole sequence's would not do
        wrong = _with_row_count(normalizer, scores, visible, valid.sum(-1), 8)
        assert not np.allclose(weights, wrong, rtol=1e-2, atol=1e-4)


@functools.partial(jax.jit, static_argnames=("model", "kind"))
def _jitted_apply(model, params, tokens, segments, valid, kind):
    mask = masks.mask_from_tokens(kind, segment_ids=segments, padding_mask=valid)
    return model.apply({"params": params}, tokens, segment_ids=segments, padding_mask=valid, attention_mask=mask)


def _apply(model, params, tokens, segments, valid, kind):
    """Logits `[batch, n, vocab]` (NumPy) under the `kind` mask of these segments and padding."""
    return np.asarray(_jitted_apply(model, params, tokens, jnp.asarray(segments), jnp.asarray(valid), kind))


def _changed(tokens, column):
    return tokens.at[:, column].set((tokens[:, column] + 37) % 256)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_unilm_sources_ignore_targets_and_targets_ignore_later_targets(variant):
    model, params = tiny_model(causal=False, type_vocab_size=2, **VARIANTS[variant])
    segments, valid = _seq2seq((4, 4), (5, 3), (0, 2))
    tokens = jax.random.randint(jax.random.PRNGKey(1), segments.shape, 0, 256)
    base = _apply(model, params, tokens, segments, valid, "unilm")
    for j in (4, 6, 8):  # a target token of both rows (row 1's position 8 is padding)
        out = _apply(model, params, _changed(tokens, j), segments, valid, "unilm")
        np.testing.assert_array_equal(out[:, :j], base[:, :j])  # sources and earlier targets: bit for bit
        if j < 8:
            assert not np.allclose(out[:, j + 1:], base[:, j + 1:], atol=1e-4)  # later targets see it
    out = _apply(model, params, _changed(tokens, 1), segments, valid, "unilm")
    assert not np.allclose(out[:, 0], base[:, 0], atol=1e-4)  # the source is bidirectional
    assert not np.allclose(out[0, 4:], base[0, 4:], atol=1e-4)  # and every target sees it


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_uniae_segments_never_see_each_other(variant):
    model, params = tiny_model(causal=False, type_vocab_size=2, **VARIANTS[variant])
    segments, valid = _seq2seq((4, 5), (5, 4))
    tokens = jax.random.randint(jax.random.PRNGKey(2), segments.shape, 0, 256)
    base = _apply(model, params, tokens, segments, valid, "uniae")
    target = _apply(model, params, _changed(tokens, 5), segments, valid, "uniae")  # a target in both rows
    np.testing.assert_array_equal(target[:, :5], base[:, :5])  # the sources and row 0's earlier target
    assert not np.allclose(target[:, 6:], base[:, 6:], atol=1e-4)  # later targets see it
    source = _apply(model, params, _changed(tokens, 2), segments, valid, "uniae")
    np.testing.assert_array_equal(source[0, 4:], base[0, 4:])  # no target sees the source
    np.testing.assert_array_equal(source[1, 5:], base[1, 5:])
    assert not np.allclose(source[:, 0], base[:, 0], atol=1e-4)


@pytest.mark.parametrize("normalizer, variant", [("softmax", "pre_norm"), ("softmax_plus", "gau_alpha"),
                                                 ("relu2", "pre_norm"), ("relu2_paper", "pre_norm")])
def test_kv_cache_decoding_with_explicit_masks_equals_the_full_forward(normalizer, variant):
    """The source in one call, then one target token at a time, each with its mask against the whole cache
    (make_mask; unwritten slots invalid, their segment ids unknown: zeros). relu2_paper's n is the cache length
    in decoding and the unpadded length in the full pass, equal here (no padding, the cache fits exactly)."""
    overrides = {**VARIANTS[variant], "normalizer": normalizer}
    model, params = tiny_model(causal=False, type_vocab_size=2, **overrides)
    segments, _ = _seq2seq((5, 5), (6, 6))
    n, source = segments.shape[1], 5
    tokens = jax.random.randint(jax.random.PRNGKey(3), segments.shape, 0, 256)
    full = _apply(model, params, tokens, segments, np.ones_like(segments, bool), "unilm")
    from train_lib.lm.decoding import init_cache
    segments = jnp.asarray(segments)
    counts, positions = masks.segment_counts(segments), jnp.broadcast_to(jnp.arange(n), (2, n))

    @jax.jit
    def step(cache, start, chunk, chunk_segments):
        query = start + jnp.arange(chunk.shape[1])
        written = jnp.broadcast_to(jnp.arange(n) < start + chunk.shape[1], (2, n))
        mask = masks.make_mask("unilm", query_segments=chunk_segments, query_counts=jnp.take(counts, query, axis=1),
                               query_positions=jnp.broadcast_to(query, chunk.shape),
                               key_segments=jnp.where(written, segments, 0), key_counts=jnp.where(written, counts, 0),
                               key_positions=positions, key_valid=written)
        logits, variables = model.apply({"params": params, "cache": cache}, chunk, decode=True,
                                        segment_ids=chunk_segments, attention_mask=mask, mutable=["cache"])
        return variables["cache"], logits

    cache, pieces = init_cache(model, 2, n), []
    for start, stop in [(0, source)] + [(t, t + 1) for t in range(source, n)]:
        cache, logits = step(cache, start, tokens[:, start:stop], segments[:, start:stop])
        pieces.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=1e-5, atol=1e-5)
    earlier = _apply(model, params, _changed(tokens, source), segments, np.ones((2, n), bool), "unilm")
    assert np.abs(earlier[:, -1] - full[:, -1]).max() > 1e-3  # the cache carries information


def test_scanned_layers_equal_the_unrolled_stack_under_a_mask():
    model, params = tiny_model(causal=False, type_vocab_size=2, **GAU_ALPHA)
    scanned = GAULanguageModel(dataclasses.replace(model.config, scan_layers=True))
    segments, valid = _seq2seq((4, 3), (5, 4), (0, 2))
    tokens = jax.random.randint(jax.random.PRNGKey(4), segments.shape, 0, 256)
    want = _apply(model, params, tokens, segments, valid, "unilm")
    got = _apply(scanned, stack_layer_params(params, 2), tokens, segments, valid, "unilm")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    bidirectional = _apply(model, params, tokens, segments, valid, "bidirectional")
    assert not np.allclose(got, bidirectional, atol=1e-3)  # the mask reached the scanned layers


@functools.partial(jax.jit, static_argnames="model")
def _logits(model, params, tokens, segment_ids=None):
    return model.apply({"params": params}, tokens, segment_ids=segment_ids)


def test_segment_embeddings_are_added_and_absent_by_default():
    model, params = tiny_model(causal=False, type_vocab_size=2)
    table = params["segment_embed"]["embedding"]
    assert table.shape == (2, 32) and "segment_embed" not in tiny_model(causal=False)[1]
    tokens = jnp.arange(8)[None] * 5
    plain = GAULanguageModel(dataclasses.replace(model.config, type_vocab_size=0))
    rest = {k: v for k, v in params.items() if k != "segment_embed"}
    zeroed = {**params, "segment_embed": {"embedding": jnp.zeros_like(table)}}
    np.testing.assert_array_equal(np.asarray(_logits(model, zeroed, tokens)), np.asarray(_logits(plain, rest, tokens)))
    ones = jnp.ones_like(tokens)
    shifted = {**rest, "embed": {"embedding": params["embed"]["embedding"] + table[1]}}  # E_tok[x] + E_seg[1]
    np.testing.assert_allclose(np.asarray(_logits(model, params, tokens, ones)),
                               np.asarray(_logits(plain, shifted, tokens)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="segment_ids but model.type_vocab_size is 0"):
        jax.eval_shape(lambda: plain.apply({"params": rest}, tokens, segment_ids=ones))


def test_layers_that_cannot_take_explicit_masks_say_so():
    mask = masks.mask_from_tokens("unilm", segment_ids=jnp.array([[0, 0, 1, 1]]))
    tokens = jnp.zeros((1, 4), jnp.int32)
    for attention, message in (("flash", "model.attention='flash' cannot take an explicit attention_mask"),
                               ("performer", "model.attention='performer' cannot take an explicit attention_mask")):
        model = GAULanguageModel(GAUConfig(num_layers=1, embed_dim=16, key_dim=8, attention=attention, chunk_size=2))
        with pytest.raises(ValueError, match=message):
            jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens, attention_mask=mask))
    pallas = GAULanguageModel(GAUConfig(num_layers=1, embed_dim=16, key_dim=8, attention_impl="pallas"))
    with pytest.raises(ValueError, match="attention_impl='pallas' cannot take an explicit attention_mask.*'xla'"):
        jax.eval_shape(lambda: pallas.init(jax.random.PRNGKey(0), tokens, attention_mask=mask))
    assert attention_implementation(GAUConfig(attention_impl="auto"), explicit_mask=True) == "xla"
    gau = GAULanguageModel(GAUConfig(num_layers=1, embed_dim=16, key_dim=8))
    with pytest.raises(ValueError, match=r"attention_mask must be \[batch, n, n_keys\] with n_keys=4"):
        jax.eval_shape(lambda: gau.init(jax.random.PRNGKey(0), tokens, attention_mask=mask[:, :, :3]))
