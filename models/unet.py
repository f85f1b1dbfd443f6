"""The DDPM U-Net in linen, NHWC, with optional class conditioning through conditional GroupNorm.

Architecture of Ho et al., *Denoising Diffusion Probabilistic Models* (arXiv 2006.11239, App. B): a
3×3 input conv; per resolution level `num_res_blocks` ResBlocks (GroupNorm → SiLU → conv, plus the
time embedding, → GroupNorm → SiLU → dropout → conv) with self-attention where the feature map's
height is in `attention_resolutions`, then a stride-2 conv; a middle ResBlock–attention–ResBlock; the
mirrored up path with skip connections and nearest-neighbour upsampling; GroupNorm → SiLU → a
zero-initialised 3×3 output conv (so the network outputs exactly 0 at initialisation). The time
embedding is sinusoidal (Transformer-style) followed by a 2-layer MLP of width 4·base_channels.
CIFAR-10 in the paper: 128 channels, mults (1, 2, 2, 2), 2 ResBlocks, attention at 16×16, dropout 0.1.

Class conditioning (num_classes > 0) follows *基于Conditional Layer Normalization的条件文本生成*
(https://kexue.fm/archives/7124): every GroupNorm in a ResBlock and the output norm gets
γ = γ₀ + W_γ c, β = β₀ + W_β c, with W zero-initialised and c = SiLU(class embedding + time
embedding). Label `num_classes` is the "no class" token used when `labels` is None.

Parameters carry logical axis names for the trainer's rules: conv kernels
("conv_h", "conv_w", "conv_in", "conv_out"), dense kernels ("embed", "mlp"), biases ("conv_out",) or
("mlp",), norms ("norm",), the class table ("classes", "embed"); activations are constrained to
("batch", "height", "width", "channels"). The image's own channel axis (1 or 3: the input conv's
in-axis, the output conv's out-axis and bias) is "image_channels", so rules may shard "conv_in" and
"conv_out" without asking a mesh axis to split 1 or 3 channels. Model code names no mesh axis.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers as shared_layers

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_CONV_NAMES = ("conv_h", "conv_w", "conv_in", "conv_out")
_INPUT_CONV_NAMES = ("conv_h", "conv_w", "image_channels", "conv_out")
_OUTPUT_CONV_NAMES = ("conv_h", "conv_w", "conv_in", "image_channels")
_ACTIVATION_NAMES = ("batch", "height", "width", "channels")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Size of the U-Net (the `model.*` block of an experiment config)."""

    base_channels: int = 128
    channel_mults: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    num_classes: int = 0  # 0: unconditional
    num_groups: int = 32
    num_heads: int = 1
    out_channels: int | None = None  # None: as many as the input
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "UNetConfig":
        """A config from a dict (e.g. an ml_collections block); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"Unknown U-Net config keys {unknown}; valid keys are {sorted(names)}.")
        fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        config = cls(**fixed)
        config.validate()
        return config

    def validate(self, image_shape: Sequence[int] | None = None) -> None:
        """Raise ValueError naming the key if the config (and an `[H, W, C]` image shape) cannot work."""
        for key in ("dtype", "param_dtype"):
            if getattr(self, key) not in _DTYPES:
                raise ValueError(f"model.{key}={getattr(self, key)!r}; choose one of {sorted(_DTYPES)}.")
        widths = {self.base_channels} | {self.base_channels * m for m in self.channel_mults}
        if any(w % self.num_groups for w in widths):
            raise ValueError(f"model.num_groups={self.num_groups} must divide every level's width {sorted(widths)}.")
        if any(w % self.num_heads for w in widths):
            raise ValueError(f"model.num_heads={self.num_heads} must divide every level's width {sorted(widths)}.")
        if image_shape is None:
            return
        height, width = image_shape[0], image_shape[1]
        factor = 2 ** (len(self.channel_mults) - 1)
        if height % factor or width % factor:
            raise ValueError(f"Image {height}×{width} is not divisible by 2^(len(model.channel_mults)-1) = {factor}.")
        heights = {height // 2**i for i in range(len(self.channel_mults))}
        missing = sorted(set(self.attention_resolutions) - heights)
        if missing:
            raise ValueError(f"model.attention_resolutions {missing} are not feature-map heights of a "
                             f"{height}×{width} input; available: {sorted(heights)}.")

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def parameter_dtype(self):
        return _DTYPES[self.param_dtype]


UNET_PRESETS: dict[str, UNetConfig] = {
    "digits": UNetConfig(base_channels=64, channel_mults=(1, 2, 2), num_res_blocks=2,
                         attention_resolutions=(4,), dropout=0.1),
    "cifar10_ddpm": UNetConfig(base_channels=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2,
                               attention_resolutions=(16,), dropout=0.1),
}


def _init(init, names):
    return nn.with_logical_partitioning(init, names)


def timestep_embedding(t: jnp.ndarray, dim: int, max_period: float = 10000.0) -> jnp.ndarray:
    """Sinusoidal embedding `[B, dim]` of timesteps `t` `[B]`: [sin(t ωₖ), cos(t ωₖ)], ωₖ = P^(−k/(dim/2−1))."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / max(half - 1, 1))
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class _Layers:
    """Conv / dense / norm factories sharing the config's dtypes and logical names."""

    def __init__(self, config: UNetConfig):
        self.config = config

    def conv(self, features, *, strides=1, kernel=3, zero=False, name=None, names=_CONV_NAMES):
        kernel_init = nn.initializers.zeros_init() if zero else nn.initializers.lecun_normal()
        return nn.Conv(features, (kernel, kernel), strides=strides, padding="SAME", name=name,
                       dtype=self.config.compute_dtype, param_dtype=self.config.parameter_dtype,
                       kernel_init=_init(kernel_init, names),
                       bias_init=_init(nn.initializers.zeros_init(), names[-1:]))

    def dense(self, features, *, zero=False, name=None):
        kernel_init = nn.initializers.zeros_init() if zero else nn.initializers.lecun_normal()
        return nn.Dense(features, name=name, dtype=self.config.compute_dtype,
                        param_dtype=self.config.parameter_dtype,
                        kernel_init=_init(kernel_init, ("embed", "mlp")),
                        bias_init=_init(nn.initializers.zeros_init(), ("mlp",)))


class ConditionalGroupNorm(nn.Module):
    """GroupNorm whose scale and shift are γ₀ + W_γ c and β₀ + W_β c (W zero-init; post 7124).

    x `[B, H, W, C]`, cond `[B, E]` or None (then it is plain GroupNorm with learned γ₀, β₀).
    """

    config: UNetConfig

    @nn.compact
    def __call__(self, x, cond=None):
        cfg = self.config
        h = nn.GroupNorm(num_groups=cfg.num_groups, use_scale=False, use_bias=False, dtype=cfg.compute_dtype,
                         param_dtype=cfg.parameter_dtype)(x)
        channels = x.shape[-1]
        gamma = self.param("scale", _init(nn.initializers.ones_init(), ("norm",)), (channels,), cfg.parameter_dtype)
        beta = self.param("bias", _init(nn.initializers.zeros_init(), ("norm",)), (channels,), cfg.parameter_dtype)
        gamma, beta = gamma.astype(h.dtype), beta.astype(h.dtype)
        if cond is not None:
            delta = _Layers(cfg).dense(2 * channels, zero=True, name="cond")(nn.silu(cond))
            d_gamma, d_beta = jnp.split(delta[:, None, None, :].astype(h.dtype), 2, axis=-1)
            gamma, beta = gamma + d_gamma, beta + d_beta
        return h * gamma + beta


class ResBlock(nn.Module):
    """DDPM residual block `[B, H, W, C_in] -> [B, H, W, features]`, time-conditioned (and class via norms)."""

    config: UNetConfig
    features: int

    @nn.compact
    def __call__(self, x, temb, cond, *, train: bool):
        layers = _Layers(self.config)
        h = nn.silu(ConditionalGroupNorm(self.config, name="norm1")(x, cond))
        h = layers.conv(self.features, name="conv1")(h)
        h = h + layers.dense(self.features, name="temb")(nn.silu(temb))[:, None, None, :]
        h = nn.silu(ConditionalGroupNorm(self.config, name="norm2")(h, cond))
        h = shared_layers.Dropout(self.config.dropout, deterministic=not train)(h)
        h = layers.conv(self.features, zero=True, name="conv2")(h)
        if x.shape[-1] != self.features:
            x = layers.conv(self.features, kernel=1, name="shortcut")(x)
        return x + h


class _QKVProjection(nn.Module):
    """The attention's q, k, v projection `[B, L, C] -> 3 × [heads, B, L, C/heads]`.

    Its parameters are a dense layer's (`kernel` `[C, 3C]`, output channels ordered (q|k|v, head, dim),
    and `bias` `[3C]`), but it multiplies them as `[C, 3, heads, dim]` so that q, k and v come out
    split along the leading axis. The backward pass then stacks their gradients along that axis, a
    contiguous copy, instead of padding and adding slices of the channel axis and transposing the
    result for the kernel's gradient, which on a 2-core CPU took about 4% of the `unet_peer` train step.
    """

    config: UNetConfig
    heads: int

    @nn.compact
    def __call__(self, h):
        cfg = self.config
        channels = h.shape[-1]
        dim = channels // self.heads
        kernel = self.param("kernel", _init(nn.initializers.lecun_normal(), ("embed", "mlp")),
                            (channels, 3 * channels), cfg.parameter_dtype)
        bias = self.param("bias", _init(nn.initializers.zeros_init(), ("mlp",)), (3 * channels,),
                          cfg.parameter_dtype)
        kernel = kernel.astype(cfg.compute_dtype).reshape(channels, 3, self.heads, dim)
        qkv = jnp.einsum("blc,cthd->thbld", h.astype(cfg.compute_dtype), kernel)
        qkv = qkv + bias.astype(cfg.compute_dtype).reshape(3, self.heads, 1, 1, dim)
        return qkv[0], qkv[1], qkv[2]


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H·W positions with a residual, zero-init output projection.

    softmax(q kᵀ / √dim) v per head, the softmax in float32.
    """

    config: UNetConfig

    @nn.compact
    def __call__(self, x):
        cfg, layers = self.config, _Layers(self.config)
        batch, height, width, channels = x.shape
        heads = cfg.num_heads
        h = nn.GroupNorm(num_groups=cfg.num_groups, dtype=cfg.compute_dtype, param_dtype=cfg.parameter_dtype,
                         scale_init=_init(nn.initializers.ones_init(), ("norm",)),
                         bias_init=_init(nn.initializers.zeros_init(), ("norm",)))(x)
        q, k, v = _QKVProjection(cfg, heads, name="qkv")(h.reshape(batch, height * width, channels))
        scores = jnp.einsum("hbqd,hbkd->hbqk", q, k) * (channels // heads) ** -0.5
        weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("hbqk,hbkd->bqhd", weights, v).reshape(batch, height, width, channels)
        out = layers.dense(channels, zero=True, name="proj")(out)
        return x + out


class UNet(nn.Module):
    """ε/x₀/v network `(x [B, H, W, C], t [B]) -> [B, H, W, out_channels]` (float32 output)."""

    config: UNetConfig

    @nn.compact
    def __call__(self, x, t, *, labels=None, train: bool):
        cfg, layers = self.config, _Layers(self.config)
        cfg.validate(x.shape[1:])
        ch = cfg.base_channels
        temb = timestep_embedding(t, ch)
        temb = layers.dense(4 * ch, name="temb_in")(temb)
        temb = layers.dense(4 * ch, name="temb_out")(nn.silu(temb))
        cond = None
        if cfg.num_classes > 0:
            if labels is None:
                labels = jnp.full((x.shape[0],), cfg.num_classes, jnp.int32)
            table = nn.Embed(cfg.num_classes + 1, 4 * ch, dtype=cfg.compute_dtype, param_dtype=cfg.parameter_dtype,
                             embedding_init=_init(nn.initializers.normal(1.0), ("classes", "embed")),
                             name="class_embed")
            cond = temb + table(labels)

        def constrain(h):
            return nn.with_logical_constraint(h, _ACTIVATION_NAMES)

        def res_and_attn(h, features, height, name):
            h = ResBlock(cfg, features, name=f"{name}_res")(h, temb, cond, train=train)
            if height in cfg.attention_resolutions:
                h = AttentionBlock(cfg, name=f"{name}_attn")(h)
            return h

        h = layers.conv(ch, name="conv_in", names=_INPUT_CONV_NAMES)(x.astype(cfg.compute_dtype))
        skips, height = [h], x.shape[1]
        for level, mult in enumerate(cfg.channel_mults):
            for block in range(cfg.num_res_blocks):
                h = res_and_attn(h, ch * mult, height, f"down{level}_{block}")
                skips.append(h)
            if level < len(cfg.channel_mults) - 1:
                h = constrain(layers.conv(h.shape[-1], strides=2, name=f"down{level}_downsample")(h))
                skips.append(h)
                height //= 2
        h = ResBlock(cfg, h.shape[-1], name="mid_res1")(h, temb, cond, train=train)
        h = AttentionBlock(cfg, name="mid_attn")(h)
        h = ResBlock(cfg, h.shape[-1], name="mid_res2")(h, temb, cond, train=train)
        for level, mult in reversed(list(enumerate(cfg.channel_mults))):
            for block in range(cfg.num_res_blocks + 1):
                h = res_and_attn(jnp.concatenate([h, skips.pop()], axis=-1), ch * mult, height, f"up{level}_{block}")
            if level > 0:
                h = jax.image.resize(h, (h.shape[0], 2 * h.shape[1], 2 * h.shape[2], h.shape[3]), "nearest")
                h = constrain(layers.conv(h.shape[-1], name=f"up{level}_upsample")(h))
                height *= 2
        h = nn.silu(ConditionalGroupNorm(cfg, name="norm_out")(h, cond))
        out = layers.conv(cfg.out_channels or x.shape[-1], zero=True, name="conv_out", names=_OUTPUT_CONV_NAMES)(h)
        return out.astype(jnp.float32)


def build_unet(config: dict[str, Any] | UNetConfig | str) -> UNet:
    """A `UNet` from a config dict, a `UNetConfig`, or a preset name in `UNET_PRESETS`."""
    if isinstance(config, str):
        if config not in UNET_PRESETS:
            raise ValueError(f"Unknown U-Net preset {config!r}; choose one of {sorted(UNET_PRESETS)}.")
        config = UNET_PRESETS[config]
    elif not isinstance(config, UNetConfig):
        config = UNetConfig.from_dict(dict(config))
    config.validate()
    return UNet(config)
