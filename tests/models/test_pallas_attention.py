"""The blockwise Pallas attention kernel (interpret mode on CPU) against the XLA normalisers, and its use in the GAU."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax.linen as nn

from models import attention, backend
from models.gau import GAUConfig, GAULanguageModel, attention_implementation
from models.pallas_attention import batch_sharded_attention, blockwise_attention
from tests.models.gau_fixtures import tiny_model


def _reference(q, k, v, *, normalizer, causal, key_valid):
    """The GAU's XLA path: a normaliser of models.attention on the masked float32 scores, then A V."""
    n = q.shape[1]
    mask = attention.attention_mask(jnp.arange(n), jnp.arange(n), causal=causal, key_valid=key_valid)
    scores = jnp.einsum("bqs,bks->bqk", q, k, preferred_element_type=jnp.float32)
    weights = attention.get_normalizer(normalizer)(scores, mask, key_dim=q.shape[-1], train_length=n)
    return jnp.einsum("bqk,bke->bqe", weights.astype(v.dtype), v)


def _inputs(n, *, s=8, e=16, seed=0, dtype=jnp.float32):
    """q, k scaled so attention is far from uniform; key_valid with left and right padding in row 1,
    so its first causal rows see no valid key at all (they must give zeros)."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(scale=2.0, size=(2, n, s)), dtype)
    k = jnp.asarray(rng.normal(scale=2.0, size=(2, n, s)), dtype)
    v = jnp.asarray(rng.normal(size=(2, n, e)), dtype)
    key_valid = np.ones((2, n), bool)
    key_valid[1, :5] = key_valid[1, n - 7:] = False
    return q, k, v, jnp.asarray(key_valid)


_CASES = [(normalizer, causal, padded) for normalizer in ("softmax", "softmax_plus")
          for causal in (False, True) for padded in (False, True)]


@pytest.mark.parametrize("normalizer,causal,padded", _CASES)
def test_forward_matches_xla_reference(normalizer, causal, padded):
    # n = 40 is no multiple of the blocks (padded to 64 inside); block_q ≠ block_k; e ≠ s.
    q, k, v, key_valid = _inputs(40)
    key_valid = key_valid if padded else None
    fn = jax.jit(lambda q, k, v, kv: blockwise_attention(q, k, v, normalizer=normalizer, causal=causal,
                                                         key_valid=kv, block_q=16, block_k=32))
    got = fn(q, k, v, key_valid)
    want = _reference(q, k, v, normalizer=normalizer, causal=causal, key_valid=key_valid)
    assert got.shape == (2, 40, 16) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    if padded and causal:  # rows 0..4 of sequence 1 see only padding: exactly zero, as in the reference
        assert np.all(np.asarray(got)[1, :5] == 0)


@pytest.mark.parametrize("normalizer,causal,padded", [
    ("softmax", True, True), ("softmax_plus", True, True), ("softmax_plus", False, True), ("softmax", False, False)])
def test_gradients_match_xla_reference(normalizer, causal, padded):
    # n = 72, block_q = 32 > block_k = 16: the causal loop bounds of both backward kernels are exercised.
    q, k, v, key_valid = _inputs(72, seed=1)
    key_valid = key_valid if padded else None
    weights = jax.random.normal(jax.random.PRNGKey(0), (2, 72, 16))  # a random linear functional of the output

    def loss(fn):
        return jax.jit(jax.value_and_grad(
            lambda q, k, v: jnp.sum(weights * fn(q, k, v, normalizer=normalizer, causal=causal, key_valid=key_valid)),
            argnums=(0, 1, 2)))

    kernel = lambda q, k, v, **kw: blockwise_attention(q, k, v, block_q=32, block_k=16, **kw)  # noqa: E731
    (got_value, got), (want_value, want) = loss(kernel)(q, k, v), loss(_reference)(q, k, v)
    np.testing.assert_allclose(float(got_value), float(want_value), rtol=1e-5)
    for name, g, w in zip("qkv", got, want):
        scale = float(jnp.max(jnp.abs(w)))
        assert scale > 0.1, name  # the gradient is not trivially zero
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5 * scale, err_msg=name)


def test_bfloat16_inputs_give_bfloat16_output_close_to_reference():
    q, k, v, key_valid = _inputs(40, dtype=jnp.bfloat16)
    got = jax.jit(lambda q, k, v: blockwise_attention(q, k, v, normalizer="softmax_plus", causal=True,
                                                      key_valid=key_valid, block_q=16, block_k=16))(q, k, v)
    want = _reference(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                      normalizer="softmax_plus", causal=True, key_valid=key_valid)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=0.1)


@pytest.mark.parametrize("normalizer,causal", [("softmax_plus", True), ("softmax", False)])
def test_gau_language_model_pallas_equals_xla(normalizer, causal):
    """Same parameters, same logits and parameter gradients with attention_impl='pallas' (interpreted on CPU)."""
    xla_model, params = tiny_model(normalizer=normalizer, causal=causal, num_layers=1)
    pallas_model = GAULanguageModel(GAUConfig(**{**vars(xla_model.config), "attention_impl": "pallas"}))
    assert attention_implementation(pallas_model.config) == "pallas"
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 20), 0, 256)
    padding = jnp.arange(20)[None, :] < jnp.array([[20], [13]])
    targets = jax.random.normal(jax.random.PRNGKey(2), (2, 20, 256))

    def loss_and_grads(model):
        def loss(p):
            logits = model.apply({"params": p}, tokens, padding_mask=padding)
            return jnp.sum(targets * logits), logits
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    forward = jax.make_jaxpr(lambda p: pallas_model.apply({"params": p}, tokens, padding_mask=padding))(params)
    assert "pallas_call" in str(forward)  # the kernel really runs, not the XLA path
    (_, got_logits), got = loss_and_grads(pallas_model)
    (_, want_logits), want = loss_and_grads(xla_model)
    np.testing.assert_allclose(np.asarray(got_logits), np.asarray(want_logits), rtol=1e-5, atol=1e-5)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves(want)):
        scale = float(jnp.max(jnp.abs(w)))
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5 * max(scale, 1e-3),
                                   err_msg=jax.tree_util.keystr(path))


def test_auto_is_xla_on_cpu_and_pallas_rejects_other_normalizers():
    assert jax.default_backend() == "cpu"
    for normalizer in ("softmax", "softmax_plus", "relu2"):
        assert attention_implementation(GAUConfig(normalizer=normalizer, attention_impl="auto")) == "xla"
    assert attention_implementation(GAUConfig(attention_impl="xla")) == "xla"
    assert attention_implementation(GAUConfig(attention_impl="pallas")) == "pallas"
    assert attention_implementation(GAUConfig(attention_impl="pallas"), decode=True) == "xla"  # the KV cache path
    bad = GAUConfig(normalizer="relu2", attention_impl="pallas", num_layers=1, embed_dim=16, key_dim=8)
    message = r"model.attention_impl='pallas' supports the normalisers \['softmax', 'softmax_plus'\].*'relu2'"
    with pytest.raises(ValueError, match=message):
        attention_implementation(bad)
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(GAULanguageModel(bad).init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="residual_scores"):
        attention_implementation(GAUConfig(attention_impl="pallas", residual_scores=True))
    with pytest.raises(ValueError, match="blockwise_attention supports"):
        blockwise_attention(*_inputs(8)[:3], normalizer="l2", causal=True)


def test_auto_follows_the_compile_target():
    """Compiling for a TPU (`models.backend.compiling_for`, what `train_lib.pods` does) traces the program a TPU
    would run: 'auto' takes the kernel, and the kernel is compiled rather than interpreted."""
    cfg = GAUConfig(attention_impl="auto")
    with backend.compiling_for("tpu"):
        assert backend.current() == "tpu"
        assert attention_implementation(cfg) == "pallas"
        assert attention_implementation(cfg, decode=True) == "xla"
        assert attention_implementation(GAUConfig(attention_impl="auto", normalizer="relu2")) == "xla"
    assert backend.current() == "cpu" and attention_implementation(cfg) == "xla"
    with pytest.raises(ValueError, match="platform must be one of"):
        with backend.compiling_for("TPU"):
            pass


def test_batch_sharded_kernel_equals_unsharded():
    """Under a data × fsdp mesh the kernel runs per device on its rows (shard_map), forward and backward,
    with the same result as on the whole batch; without a mesh it is the plain kernel."""
    rng = np.random.default_rng(3)
    q, k = (jnp.asarray(rng.normal(scale=2.0, size=(8, 24, 8)), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.normal(size=(8, 24, 16)), jnp.float32)
    key_valid = jnp.asarray(rng.random((8, 24)) > 0.2)
    kwargs = dict(normalizer="softmax_plus", causal=True, block_q=16, block_k=16)

    def loss(fn):
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) ** 2), argnums=(0, 1, 2)))

    want = loss(lambda q, k, v: blockwise_attention(q, k, v, key_valid=key_valid, **kwargs))(q, k, v)
    mesh = jax.make_mesh((4, 2, 1), ("data", "fsdp", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    rules = (("batch", ("data", "fsdp")),)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        sharded = lambda q, k, v: batch_sharded_attention(q, k, v, batch_axes=("data", "fsdp"),  # noqa: E731
                                                          key_valid=key_valid, **kwargs)
        assert "shard_map" in str(jax.make_jaxpr(sharded)(q, k, v))
        got = loss(sharded)(q, k, v)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
    plain = batch_sharded_attention(q, k, v, batch_axes=("data", "fsdp"), **kwargs)  # no mesh: the kernel itself
    np.testing.assert_allclose(np.asarray(plain), np.asarray(blockwise_attention(q, k, v, **kwargs)), atol=1e-6)


def test_task_config_validates_attention_impl():
    from tests.train_lib.conftest import make_config
    from train_lib.lm import task as tasks
    assert tasks.model_config(make_config()).attention_impl in ("xla", "auto")
    with pytest.raises(tasks.ConfigError, match="'model.attention_impl' is 'triton'"):
        tasks.model_config(make_config(model__attention_impl="triton"))
    with pytest.raises(tasks.ConfigError, match="model.attention_impl='pallas'.*'relu2'"):
        tasks.model_config(make_config(model__attention_impl="pallas", model__normalizer="relu2"))
    assert tasks.model_config(make_config(model__attention_impl="pallas")).attention_impl == "pallas"
