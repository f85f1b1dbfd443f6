"""Building blocks shared by the models: initialisers, norms, scale-offset, rotary positions and dropout.

Parameters carry *logical* axis names (`nn.with_logical_partitioning`); the training config maps
them to mesh axes, so no model code names a mesh axis.
"""
from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Initializer = Callable[..., jax.Array]

# Post 8990 (https://kexue.fm/archives/8990): N(0, 0.02²) weights keep a residual GAU close to
# the identity at initialisation, which is what lets deep GAU stacks train without warm-up tricks.
DEFAULT_KERNEL_INIT = nn.initializers.normal(stddev=0.02)


def partitioned(init: Initializer, names: Sequence[str | None]) -> Initializer:
    """`init` whose parameter is annotated with logical axis `names`."""
    return nn.with_logical_partitioning(init, tuple(names))


class Projection(nn.Module):
    """`x W + b` with a kernel of shape `[in, *features]` whose axes have logical names.

    Like `nn.DenseGeneral`, but the kernel is created in its final shape, so its logical
    partitioning applies to the real array (DenseGeneral creates a flat kernel and reshapes it).

    Args: x `[..., in]`. Returns `[..., *features]`.
    """

    features: tuple[int, ...]
    kernel_axes: tuple[str | None, ...]
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: Initializer = DEFAULT_KERNEL_INIT

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (x.shape[-1],) + tuple(self.features)
        kernel = self.param("kernel", partitioned(self.kernel_init, self.kernel_axes), shape, self.param_dtype)
        letters = "abcdefgh"[:len(self.features)]
        y = jnp.einsum(f"...z,z{letters}->...{letters}", x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", partitioned(nn.initializers.zeros, self.kernel_axes[1:]),
                              tuple(self.features), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class RMSNorm(nn.Module):
    """Root-mean-square norm, `x / rms(x) * scale` (scale optional: GAU-α uses none)."""

    epsilon: float = 1e-6
    use_scale: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        if self.use_scale:
            scale = self.param("scale", partitioned(nn.initializers.ones, ("norm",)), (x.shape[-1],),
                               self.param_dtype)
            y = y * scale
        return y.astype(self.dtype)


class ScaleNorm(nn.Module):
    """ScaleNorm (Nguyen & Salazar 2019; used by FLASH): `g · x / ‖x‖` with one learned scalar g = √d init."""

    epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        g = self.param("scale", partitioned(nn.initializers.constant(x.shape[-1] ** 0.5), ()), (),
                       self.param_dtype)
        norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True))
        return (g * x32 / jnp.maximum(norm, self.epsilon)).astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm computed in float32, with logically named scale and bias."""

    epsilon: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.LayerNorm(epsilon=self.epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                            scale_init=partitioned(nn.initializers.ones, ("norm",)),
                            bias_init=partitioned(nn.initializers.zeros, ("norm",)))(x)


class ScalelessRMSNorm(RMSNorm):
    """`x / rms(x)` with no learned scale or offset: GAU-α's Post-Norm (https://kexue.fm/archives/9052)."""

    use_scale: bool = False


NORMS: dict[str, type[nn.Module]] = {"rmsnorm": RMSNorm, "rmsnorm_noscale": ScalelessRMSNorm,
                                     "layernorm": LayerNorm, "scalenorm": ScaleNorm}


# 1 / (std of a standard normal truncated to [−2, 2]): scaling by it makes the truncated draw's std exact.
_TRUNCATED_NORMAL_STD_CORRECTION = 1.13684723


def depth_scaled_truncated_normal(num_layers: int, *, fan_in_axis: int = 0) -> Initializer:
    """GAU-α's initialiser: truncated normal (±2σ) with std `1.13684723/√fan_in · L^{-1/3}`.

    The 1.13684723 undoes the truncation's shrinkage, so the drawn weights have std exactly
    `L^{-1/3}/√fan_in`: variance 1/fan_in keeps activations' scale, and L^{-1/3} keeps a deep
    Post-Norm stack trainable (https://kexue.fm/archives/8990, https://kexue.fm/archives/9052).
    `fan_in_axis`: 0 for `Projection` kernels `[in, *out]`; −1 for an embedding table `[vocab, d]`,
    whose rows are the d-dimensional inputs of the first layer.
    """
    def init(key, shape, dtype=jnp.float32):
        std = _TRUNCATED_NORMAL_STD_CORRECTION / shape[fan_in_axis] ** 0.5 * num_layers ** (-1.0 / 3.0)
        return (jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32) * std).astype(dtype)
    return init


def paper_normal(num_layers: int, *, fan_in_axis: int = 0) -> Initializer:
    """N(0, 0.02²) whatever the depth or fan-in (the paper's code; `DEFAULT_KERNEL_INIT`)."""
    del num_layers, fan_in_axis
    return DEFAULT_KERNEL_INIT


# Kernel initialisers by name (`model.kernel_init`); each is called as `factory(L, fan_in_axis=...)`.
KERNEL_INITS: dict[str, Callable[..., Initializer]] = {"normal": paper_normal,
                                                        "gau_alpha": depth_scaled_truncated_normal}


class ScaleOffset(nn.Module):
    """`num` per-dimension scale-offsets of one shared input: `z ⊙ γ_h + β_h`, h = 1..num.

    GAU derives Q and K (num=2) and FLASH Q_quad, K_quad, Q_lin, K_lin (num=4) from one Z this way
    (Hua et al. 2022, arXiv 2202.10447, Sec. 2). β = 0 at init; γ's init is `SCALE_INITS[name]`:
    'normal' (N(0, 0.02²), the paper's code) or 'ones' (bert4keras' ScaleOffset, GAU-α).

    Why it matters: with γ ~ 0.02, Q·K ≈ 1e-5 at init. Softmax is then uniform and learns at once,
    but relu² sits at its saddle — relu²(x) has zero slope at x = 0, and Q·K is bilinear — so a
    relu² model (and FLASH's linear part) gets no gradient to its queries and keys and never
    learns to attend. The paper escapes through its relative-position bias inside the relu²; with
    RoPE there is no such term, so relu² models here start from γ = 1.

    Args: z `[..., s]`. Returns a tuple of `num` arrays `[..., s]`. They are computed one by one rather
    than as one stacked `[num, ..., s]` array: the backward pass then sums γ_h ⊙ ∂out_h over h in one
    elementwise fusion instead of a reduction over a leading axis, which XLA:CPU runs several times
    slower.
    """

    num: int
    use_bias: bool = True
    scale_init: Initializer = DEFAULT_KERNEL_INIT
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> tuple[jax.Array, ...]:
        s = z.shape[-1]
        gamma = self.param("gamma", partitioned(self.scale_init, (None, "qk")), (self.num, s), self.param_dtype)
        beta = (self.param("beta", partitioned(nn.initializers.zeros, (None, "qk")), (self.num, s), self.param_dtype)
                if self.use_bias else None)
        outs = []
        for h in range(self.num):
            out = z * gamma[h].astype(z.dtype)
            outs.append(out if beta is None else out + beta[h].astype(z.dtype))
        return tuple(outs)


SCALE_INITS: dict[str, Initializer] = {"normal": DEFAULT_KERNEL_INIT, "ones": nn.initializers.ones}


def rope_tables(positions: jax.Array | np.ndarray, dim: int, *,
                base: float = 10000.0) -> tuple[jax.Array, jax.Array]:
    """Rotary-position sin and cos tables, computed once per forward pass and shared by all layers.

    Angles `m · θ_i` with `θ_i = base^{-2i/dim}` are computed in float32: bfloat16 cannot hold
    positions above 256 exactly (Su et al., RoFormer, arXiv 2104.09864; https://kexue.fm/archives/8265).
    Positions given as a NumPy array (the usual 0 … n−1 of a forward pass) give NumPy tables, which
    become constants of the compiled program: traced tables would be fused into, and their sin/cos
    recomputed by, every one of the dozens of ops that read them (forward and backward, every layer).

    Args: positions `[..., n]` (integers, global positions). Returns (sin, cos), each `[..., n, dim/2]` float32.
    """
    if dim % 2:
        raise ValueError(f"rotary dimension must be even, got {dim}")
    xp = np if isinstance(positions, np.ndarray) else jnp
    inv_freq = (base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)).astype(np.float32)
    angles = positions.astype(xp.float32)[..., None] * inv_freq
    return xp.sin(angles), xp.cos(angles)


def maybe_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array] | None) -> jax.Array:
    """`apply_rope(x, *rope)`, or x unchanged when the model uses no rotary positions (rope is None)."""
    return x if rope is None else apply_rope(x, *rope)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """Rotate pairs `(x_i, x_{i+dim/2})` by the tabulated angles; `(R_m q)ᵀ(R_n k) = qᵀ R_{n−m} k`.

    The half-split pairing (rather than adjacent pairs) is the same rotation up to a fixed permutation
    of dimensions, and needs no interleaving reshape. Computed in float32, returned in x's dtype.

    Args: x `[..., n, dim]`; sin, cos `[n, dim/2]` or broadcastable to x's leading axes.
    """
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def threefry2x32(key: tuple[jax.Array, jax.Array], x1: jax.Array, x2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The Threefry-2x32 block cipher (20 rounds), unrolled, elementwise over uint32 counters `x1, x2`.

    The same function as JAX's `threefry_2x32` (Salmon et al. 2011, "Parallel random numbers: as easy as
    1, 2, 3", SC'11; the test checks them bit for bit). JAX lowers its own to a rolled 5-step `while`
    loop on the CPU, which XLA runs op by op; written out like this it is one elementwise fusion, and
    XLA fuses it into whatever consumes the bits (dropout's mask). Returns two uint32 arrays.
    """
    k1, k2 = (jnp.asarray(k, jnp.uint32) for k in key)
    ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
    rotations = ((13, 15, 26, 6), (17, 29, 16, 24))
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for i in range(5):
        for r in rotations[i % 2]:
            x1 = x1 + x2
            x2 = ((x2 << np.uint32(r)) | (x2 >> np.uint32(32 - r))) ^ x1
        x1, x2 = x1 + ks[(i + 1) % 3], x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x1, x2


def dropout_keep_mask(rng: jax.Array, shape: Sequence[int], rate: float) -> tuple[jax.Array, float]:
    """A Bernoulli(1 − rate) keep mask of `shape` and the exact keep probability.

    Element (i, j) — i its index along the first axis, j its row-major index within the others — keeps
    iff the first word of Threefry-2x32 under `rng` at counter (j, i) is at least round(rate · 2³²).
    The mask depends only on the key and the element's position, not on how the array is sharded, and
    is one elementwise fusion (see `threefry2x32`) that XLA fuses into its consumer. Any JAX key works
    (typed or raw uint32, any PRNG implementation).
    """
    shape = tuple(int(n) for n in shape)
    inner = int(np.prod(shape[1:], dtype=np.int64))
    if inner >= 2**32 or (shape and shape[0] >= 2**32):
        raise ValueError(f"dropout_keep_mask: shape {shape} has ≥ 2³² elements after its first axis (or along "
                         f"it); reshape so that both the first axis and the rest have fewer")
    data = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
    if data.shape != (2,) or data.dtype != jnp.uint32:  # another PRNG implementation: draw a Threefry key
        data = jax.random.bits(rng, (2,), jnp.uint32)
    if not shape:
        inner_index, outer_index = jnp.zeros((), jnp.uint32), jnp.zeros((), jnp.uint32)
    else:
        inner_index = jnp.broadcast_to(jax.lax.iota(jnp.uint32, inner).reshape(shape[1:]), shape)
        outer_index = jax.lax.broadcasted_iota(jnp.uint32, shape, 0)
    words, _ = threefry2x32((data[0], data[1]), inner_index, outer_index)
    threshold = min(int(round(rate * 2.0**32)), 2**32 - 1)
    return words >= np.uint32(threshold), 1.0 - threshold / 2.0**32


class Dropout(nn.Module):
    """Inverted dropout, `x ⊙ m / p` with m ~ Bernoulli(p), p = 1 − rate (the exact p of the mask).

    A drop-in for `nn.Dropout` (same arguments, the 'dropout' RNG stream) whose mask costs one fused
    elementwise pass (`dropout_keep_mask`) instead of JAX's rolled Threefry loop: on a 2-core CPU,
    turning dropout off made the `ddpm_digits.py:unet_peer` train step 8% faster with nn.Dropout and
    0.6–1.5% faster with this one (`python -m train_lib.benchmark
    --config=experiments/ddpm_digits.py:unet_peer --steps=40 --ab='model.dropout=0.0'`; README "Performance").
    """

    rate: float
    deterministic: bool | None = None
    rng_collection: str = "dropout"

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool | None = None) -> jax.Array:
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"Dropout: rate must be in [0, 1], got {self.rate}")
        if deterministic or self.rate == 0.0:
            return x
        if self.rate == 1.0:
            return jnp.zeros_like(x)
        keep, keep_prob = dropout_keep_mask(self.make_rng(self.rng_collection), x.shape, self.rate)
        return jnp.where(keep, x / jnp.asarray(keep_prob, x.dtype), jnp.zeros_like(x))


class ConditionalShift(nn.Module):
    """Conditional Layer Normalization's conditional part (post 7124, https://kexue.fm/archives/7124):

        CLN(x, c) = x̂ ⊙ (γ + W_γ c) + (β + W_β c) = Norm(x) + x̂ ⊙ W_γ c + W_β c

    with x̂ the norm's normalised input: (x − μ) / σ for 'layernorm', x / rms(x) for the RMS norms and ScaleNorm
    (ScaleNorm's g · x / ‖x‖ is g/√d · x / rms(x)), whose γ is then 1 (GAU-α's scaleless norm) or its own scale.
    This module returns the last two terms, added to an ordinary norm's output, so the norm keeps its
    parameters' names (a pretrained checkpoint loads unchanged) and, with W_γ, W_β zero-initialised, the
    conditional model computes exactly what the unconditional one does until it trains.

    Args: x `[batch, n, d]`; condition `[batch, k]`. Returns `[batch, n, d]`.
    """

    epsilon: float = 1e-12
    dtype: jnp.dtype = jnp.float32
    norm: str = "layernorm"  # a key of NORMS: how x̂ is formed

    @nn.compact
    def __call__(self, x: jax.Array, condition: jax.Array) -> jax.Array:
        if self.norm not in NORMS:
            raise ValueError(f"ConditionalShift: norm is {self.norm!r}; expected one of {sorted(NORMS)}")
        d = x.shape[-1]
        x32 = x.astype(jnp.float32)
        if self.norm == "layernorm":
            x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        x_hat = (x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)).astype(
            self.dtype)
        project = lambda name: Projection((d,), (None, "embed"), use_bias=False, dtype=self.dtype,  # noqa: E731
                                          kernel_init=nn.initializers.zeros, name=name)(condition)[:, None, :]
        return x_hat * project("scale") + project("bias")
