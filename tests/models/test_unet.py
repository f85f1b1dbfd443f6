"""U-Net: shapes, exact-zero output at init, conditioning, attention placement, sharding names, size."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from models import unet

TINY = dict(base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(4,), dropout=0.1,
            num_classes=10, num_groups=8)
X = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 1)), jnp.float32)
T = jnp.array([1, 10, 500, 1000], jnp.int32)
LABELS = jnp.array([0, 1, 2, 3], jnp.int32)


def _compile(fn, *args):
    # Optimisation level 0 compiles the many random initialisers ~3x faster; these graphs are tiny.
    return jax.jit(fn).lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})


def _init_shapes(model, x):
    return jax.eval_shape(lambda k: model.init({"params": k}, x, T[: x.shape[0]], train=False),
                          jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def tiny():
    model = unet.build_unet(TINY)
    key = jax.random.PRNGKey(0)
    variables = nn.meta.unbox(_compile(lambda k: model.init({"params": k}, X, T, labels=LABELS, train=False), key)(key))
    flat, unravel = ravel_pytree(variables)
    perturbed = unravel(flat + 0.05 * jax.random.normal(jax.random.PRNGKey(1), flat.shape))
    def train_apply(v, x, t, labels, key):
        return model.apply(v, x, t, labels=labels, train=True, rngs={"dropout": key})

    apply = _compile(train_apply, variables, X, T, LABELS, key)
    eval_fn = jax.jit(lambda v, x, t, labels: model.apply(v, x, t, labels=labels, train=False))
    return model, variables, perturbed, apply, eval_fn


def test_output_shape_and_exact_zero_at_init(tiny):
    _, variables, _, _, apply_eval = tiny
    out = apply_eval(variables, X, T, LABELS)
    assert out.shape == X.shape and out.dtype == jnp.float32
    np.testing.assert_array_equal(out, 0.0)


def test_class_and_time_conditioning_change_the_output(tiny):
    _, _, perturbed, _, apply_eval = tiny
    base = apply_eval(perturbed, X, T, LABELS)
    assert float(jnp.max(jnp.abs(base))) > 1e-3
    other_class = apply_eval(perturbed, X, T, (LABELS + 5) % 10)
    other_time = apply_eval(perturbed, X, T[::-1], LABELS)
    assert float(jnp.min(jnp.max(jnp.abs(other_class - base), axis=(1, 2, 3)))) > 1e-4  # every example
    assert float(jnp.min(jnp.max(jnp.abs(other_time - base), axis=(1, 2, 3)))) > 1e-4
    # Same class, same time: the same output for the same input, whatever the other rows hold.
    np.testing.assert_allclose(apply_eval(perturbed, X[:2], T[:2], LABELS[:2]), base[:2], atol=1e-5)


def test_dropout_only_in_training(tiny):
    _, _, perturbed, apply, apply_eval = tiny
    a = apply(perturbed, X, T, LABELS, jax.random.PRNGKey(2))
    b = apply(perturbed, X, T, LABELS, jax.random.PRNGKey(3))
    assert float(jnp.max(jnp.abs(a - b))) > 1e-5
    np.testing.assert_array_equal(apply_eval(perturbed, X, T, LABELS), apply_eval(perturbed, X, T, LABELS))


@pytest.mark.parametrize("heads", [1, 2])
def test_attention_block_matches_a_float64_reference(heads):
    """x + proj(softmax(q kᵀ/√d) v) per head, q|k|v = GroupNorm(x) W_qkv + b (Ho et al. 2020, App. B)."""
    config = unet.UNetConfig(**{**TINY, "num_heads": heads})
    block = unet.AttentionBlock(config)
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 16))
    params = nn.meta.unbox(block.init(jax.random.PRNGKey(1), x))
    flat, unravel = ravel_pytree(params)
    params = unravel(flat + 0.3 * jax.random.normal(jax.random.PRNGKey(2), flat.shape))  # proj is zero at init
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
    xs = np.asarray(x, np.float64).reshape(3, 16, 8, 2)  # 8 groups of 2 channels
    h = (xs - xs.mean(axis=(1, 3), keepdims=True)) / np.sqrt(xs.var(axis=(1, 3), keepdims=True) + 1e-6)
    h = h.reshape(3, 16, 16) * p["GroupNorm_0"]["scale"] + p["GroupNorm_0"]["bias"]
    qkv = (h @ p["qkv"]["kernel"] + p["qkv"]["bias"]).reshape(3, 16, 3, heads, 16 // heads)
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # [batch, head, position, dim]
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(16 // heads)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = (weights @ v).transpose(0, 2, 1, 3).reshape(3, 16, 16)
    expected = np.asarray(x, np.float64).reshape(3, 16, 16) + out @ p["proj"]["kernel"] + p["proj"]["bias"]
    np.testing.assert_allclose(block.apply(params, x), expected.reshape(3, 4, 4, 16), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("resolutions,expected", [((4,), {"down1_0_attn", "up1_0_attn", "up1_1_attn"}),
                                                  ((8,), {"down0_0_attn", "up0_0_attn", "up0_1_attn"}),
                                                  ((), set())])
def test_attention_only_at_the_configured_resolutions(resolutions, expected):
    model = unet.build_unet({**TINY, "attention_resolutions": resolutions})
    names = set(_init_shapes(model, X)["params"])
    assert {n for n in names if n.endswith("_attn")} == expected | {"mid_attn"}


def test_parameters_carry_logical_axis_names():
    shapes = _init_shapes(unet.build_unet(TINY), X)
    boxes = jax.tree_util.tree_leaves(shapes, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert boxes and all(isinstance(b, nn.LogicallyPartitioned) and len(b.names) == b.value.ndim for b in boxes)
    specs = nn.get_partition_spec(shapes)["params"]
    assert tuple(specs["down0_0_res"]["conv1"]["kernel"]) == ("conv_h", "conv_w", "conv_in", "conv_out")
    # The image's 1 or 3 channels get their own name, so rules can shard conv_in/conv_out everywhere else.
    assert tuple(specs["conv_in"]["kernel"]) == ("conv_h", "conv_w", "image_channels", "conv_out")
    assert tuple(specs["conv_out"]["kernel"]) == ("conv_h", "conv_w", "conv_in", "image_channels")
    assert tuple(specs["conv_out"]["bias"]) == ("image_channels",)
    assert tuple(specs["temb_in"]["kernel"]) == ("embed", "mlp")
    assert tuple(specs["class_embed"]["embedding"]) == ("classes", "embed")


def test_ddpm_cifar10_preset_has_the_papers_size():
    # Ho et al. (arXiv 2006.11239, App. B): the CIFAR-10 model has 35.7M parameters.
    shapes = _init_shapes(unet.build_unet("cifar10_ddpm"), jnp.zeros((1, 32, 32, 3)))
    count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nn.meta.unbox(shapes)))
    assert abs(count / 35.7e6 - 1) < 0.005
    out = jax.eval_shape(lambda v: unet.build_unet("cifar10_ddpm").apply(v, jnp.zeros((2, 32, 32, 3)),
                                                                        jnp.ones((2,), jnp.int32), train=False),
                         shapes)
    assert out.shape == (2, 32, 32, 3)


def test_bfloat16_compute_keeps_float32_params_and_output():
    model = unet.build_unet({**TINY, "dtype": "bfloat16"})
    shapes = _init_shapes(model, X)
    assert {x.dtype for x in jax.tree_util.tree_leaves(nn.meta.unbox(shapes))} == {jnp.dtype(jnp.float32)}
    out = jax.eval_shape(lambda v: model.apply(v, X, T, train=False), shapes)
    assert out.dtype == jnp.float32


@pytest.mark.parametrize("change,message", [({"attention_resolutions": (16,)}, "attention_resolutions"),
                                            ({"num_groups": 7}, "num_groups"),
                                            ({"channel_mults": (1, 2, 2, 2, 2)}, "not divisible"),
                                            ({"dtype": "float64"}, "dtype"),
                                            ({"widht": 3}, "Unknown U-Net config keys")])
def test_config_errors_name_the_key(change, message):
    with pytest.raises(ValueError, match=message):
        _init_shapes(unet.build_unet({**TINY, **change}), X)
