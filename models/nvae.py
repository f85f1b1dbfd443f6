r"""NVAE, a deep hierarchical VAE (Vahdat & Kautz, "NVAE: A Deep Hierarchical Variational Autoencoder",
NeurIPS 2020, arXiv 2007.03898; post 7574, https://kexue.fm/archives/7574), in linen, NHWC.

Bottom-up encoder (Fig. 2): stem conv3×3 → `num_preprocess` × (encoder cell, stride-2 down-sampling) → per
scale, fine to coarse, `groups_per_scale` groups of `cells_per_group` encoder cells, each group's output kept.
Top-down decoder: a learned constant `h` at the coarsest scale; for latent group i, coarse to fine,

    p(z_i | z_<i) = N(μ_p, σ_p) from ELU → conv(h)     (group 0: N(0, I)),
    q(z_i | z_<i, x) = N(μ_p + Δμ, σ_p·Δσ)             (residual normal, §3.2; or N(μ_q, σ_q) directly)

with (Δμ, log Δσ) from ELU → conv(concat(h, e_i)), e_i the encoder feature of the matching group (group i
reads the encoder's (G−1−i)-th group output; group 0 reads e_0 alone); z_i enters h by concat → conv1×1, then
`cells_per_group` decoder cells. Channels double at every down-sampling (`channels` at the stem) and halve at
every up-sampling (nearest ×2 then conv3×3; down-sampling is a stride-2 conv3×3: plain convs rather than
NVAE's residual sampling cells). `num_preprocess` × (up-sampling, decoder cell) mirror the preprocessing,
then ELU → conv3×3 gives the decoder p(x|z): per pixel and channel a mixture of `num_mixtures` discretised
logistics (channels are modelled independently, each with its own mixture, unlike PixelCNN++'s coupled RGB).

Cells (Fig. 3), each x + residual_scale · cell(x) (NVAE adds 0.1 · cell(x)):
  encoder: BN → Swish → conv3×3 → BN → Swish → conv3×3 → SE;
  decoder: BN → conv1×1 (E·C) → BN → Swish → depthwise conv5×5 → BN → Swish → conv1×1 (C) → BN → SE;
SE is squeeze-and-excitation with a max(C/16, 4) bottleneck. Every conv is weight-normalised (kernel =
g · v/‖v‖ per output channel, g = 1 at init, no data-dependent init). μ and log σ of the prior and of the
posterior's parts pass NVAE's soft clamp 5·tanh(·/5); log scales of the pixel logistics are clipped at −7.

`spectral_norms` is the spectral regularisation of §3.3 (Eq. 4, L_SR = λ Σᵢ s⁽ⁱ⁾) by power iteration with
persistent vectors (Miyato et al., arXiv 1802.05957). Parameters carry logical axis names as the U-Net's do.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from models.layers import partitioned

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_CONV_NAMES = ("conv_h", "conv_w", "conv_in", "conv_out")
_ACTIVATION_NAMES = ("batch", "height", "width", "channels")
PIXEL_OUTPUTS = ("sample", "mode")
_SOFT_CLAMP = 5.0
_MIN_LOG_SCALE = -7.0


@dataclasses.dataclass(frozen=True)
class NVAEConfig:
    """Size of the NVAE (the `model.*` block of an experiment config); defaults suit 8×8 digits."""

    image_shape: tuple[int, int, int] = (8, 8, 1)  # [H, W, C]
    levels: int = 17  # grey levels: pixels lie on −1 + 2k/(levels − 1)
    channels: int = 32  # stem width; doubles at every down-sampling
    num_preprocess: int = 1  # stride-2 stages before the first latent scale (mirrored after the last)
    num_scales: int = 2
    groups_per_scale: int = 2
    latent_channels: int = 20
    cells_per_group: int = 1
    residual_posterior: bool = True  # q = N(μ_p + Δμ, σ_p·Δσ) (§3.2); False: q = N(μ_q, σ_q)
    decoder_expansion: int = 3  # E of the decoder cell (the paper uses 6)
    squeeze_excitation: bool = True
    weight_norm: bool = True
    bn_momentum: float = 0.95  # flax convention: running = m·running + (1 − m)·batch
    bn_epsilon: float = 1e-5
    num_mixtures: int = 3
    residual_scale: float = 0.1
    dtype: str = "float32"  # compute dtype; parameters and densities are float32

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "NVAEConfig":
        """A validated config from a dict (e.g. an ml_collections block); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"Unknown NVAE config keys {unknown}; valid keys are {sorted(names)}.")
        config = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
        config.validate()
        return config

    def validate(self, image_shape: Sequence[int] | None = None) -> None:
        """Raise ValueError naming the key if the config (and an `[H, W, C]` input shape) cannot work."""
        positive = ("levels", "channels", "num_scales", "groups_per_scale", "latent_channels", "cells_per_group",
                    "decoder_expansion", "num_mixtures")
        for key in positive + ("num_preprocess",):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if key in positive else 0):
                kind = "a positive" if key in positive else "a non-negative"
                raise ValueError(f"model.{key}={value!r} must be {kind} integer.")
        if self.levels < 2:
            raise ValueError(f"model.levels={self.levels} must be >= 2 (17 for digits, 256 for 8-bit images).")
        for key in ("residual_posterior", "squeeze_excitation", "weight_norm"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"model.{key}={getattr(self, key)!r} must be True or False.")
        if not 0.0 <= self.bn_momentum < 1.0:
            raise ValueError(f"model.bn_momentum={self.bn_momentum} must be in [0, 1) (flax convention; 0.95).")
        for key in ("bn_epsilon", "residual_scale"):
            if not getattr(self, key) > 0:
                raise ValueError(f"model.{key}={getattr(self, key)} must be positive.")
        if self.dtype not in _DTYPES:
            raise ValueError(f"model.dtype={self.dtype!r}; choose one of {sorted(_DTYPES)}.")
        shape = tuple(self.image_shape)
        if len(shape) != 3 or not all(isinstance(n, int) and n > 0 for n in shape):
            raise ValueError(f"model.image_shape={self.image_shape!r} must be three positive integers [H, W, C].")
        factor = 2 ** (self.num_preprocess + self.num_scales - 1)
        if shape[0] % factor or shape[1] % factor:
            raise ValueError(f"model.image_shape {shape[0]}×{shape[1]} is not divisible by 2^(model.num_preprocess + "
                             f"model.num_scales − 1) = {factor}; use fewer scales or preprocessing stages.")
        if image_shape is not None and tuple(image_shape) != shape:
            raise ValueError(f"Images of shape {tuple(image_shape)} do not match model.image_shape={shape}.")

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def num_groups(self) -> int:
        return self.num_scales * self.groups_per_scale


def latent_dims_per_group(config: NVAEConfig) -> tuple[int, ...]:
    """Latent dimensions of each group, top (coarsest, sampled first) to bottom, for KL balancing.

    >>> latent_dims_per_group(NVAEConfig())
    (80, 80, 320, 320)
    """
    height, width = config.image_shape[:2]
    dims = []
    for scale in reversed(range(config.num_scales)):
        factor = 2 ** (config.num_preprocess + scale)
        dims += [config.latent_channels * (height // factor) * (width // factor)] * config.groups_per_scale
    return tuple(dims)


# ---------------------------------------------------------------------------------------------- densities


def soft_clamp(x, bound: float = _SOFT_CLAMP):
    """bound · tanh(x / bound): NVAE's clamp of μ and log σ, the identity near 0 and smooth everywhere."""
    return bound * jnp.tanh(x / bound)


def normal_kl(mu_q, log_sigma_q, mu_p, log_sigma_p):
    r"""Elementwise KL(N(μ_q, σ_q²) ‖ N(μ_p, σ_p²)) in nats:

    .. math:: \log\frac{\sigma_p}{\sigma_q} + \frac{\sigma_q^2 + (\mu_q - \mu_p)^2}{2\sigma_p^2} - \frac12 .
    """
    return residual_normal_kl(mu_q - mu_p, log_sigma_q - log_sigma_p, log_sigma_p)


def residual_normal_kl(delta_mu, log_delta_sigma, log_sigma_p):
    r"""KL(N(μ_p + Δμ, (σ_p Δσ)²) ‖ N(μ_p, σ_p²)) elementwise, NVAE's Eq. 2 (it does not depend on μ_p):

    .. math:: \frac12\Bigl(\frac{\Delta\mu^2}{\sigma_p^2} + \Delta\sigma^2 - 1\Bigr) - \log\Delta\sigma .

    Δσ² − 1 − 2 log Δσ is formed with expm1, so q = p gives 0 to rounding of log Δσ, not of Δσ.

    >>> float(residual_normal_kl(0.0, 0.0, 1.3))
    0.0
    """
    ratio = jnp.square(delta_mu * jnp.exp(-log_sigma_p))
    return 0.5 * (ratio + jnp.expm1(2.0 * log_delta_sigma)) - log_delta_sigma


def normal_log_prob(z, mu, log_sigma):
    """Elementwise log N(z; μ, σ²) = −½((z − μ)/σ)² − log σ − ½ log 2π."""
    return -0.5 * jnp.square((z - mu) * jnp.exp(-log_sigma)) - log_sigma - 0.5 * math.log(2.0 * math.pi)


def _log_one_minus_exp_neg(d, log_d):
    """log(1 − e^(−d)) for d = exp(log_d) > 0, also where d underflows (then ≈ log d − d/2)."""
    small = log_d < -9.0
    safe_d = jnp.where(small, 1.0, d)  # keeps the unused branch's gradient finite
    return jnp.where(small, log_d - 0.5 * d, jnp.log(-jnp.expm1(-safe_d)))


def discretized_logistic_mixture_log_prob(x, logits, means, log_scales, *, levels: int):
    r"""Per-pixel log P(x) of a mixture of logistics integrated over x's bin, in nats.

    Bins as `models.diffusion.likelihood.discretized_gaussian_log_likelihood`: x on −1 + 2k/(levels − 1), bin
    x ± h with h = 1/(levels − 1), the bins at −1 and +1 open to ∓∞ (PixelCNN++, Salimans et al., arXiv
    1701.05517, §2.1). A middle bin uses σ(a) − σ(b) = σ(a) σ(−b) (1 − e^(b−a)), a − b = 2h/s, so

    .. math:: \log P_k = \log\sigma(a) + \log\sigma(-b) + \log(1 - e^{-2h/s}),

    which is exact and finite in both tails (no midpoint fallback needed).
    Args: x `[...]`; logits, means, log_scales `[..., K]` (K components). Returns `[...]`.
    """
    half_width = 1.0 / (levels - 1)
    x = jnp.asarray(x)[..., None]
    inv_scale = jnp.exp(-log_scales)
    upper = (x + half_width - means) * inv_scale
    lower = (x - half_width - means) * inv_scale
    log_cdf_upper = jax.nn.log_sigmoid(upper)  # open bin at −1: P = σ(upper)
    log_sf_lower = jax.nn.log_sigmoid(-lower)  # open bin at +1: P = 1 − σ(lower)
    log_width = math.log(2.0 * half_width) - log_scales
    middle = log_cdf_upper + log_sf_lower + _log_one_minus_exp_neg(2.0 * half_width * inv_scale, log_width)
    log_bin = jnp.where(x < -1.0 + half_width, log_cdf_upper, jnp.where(x > 1.0 - half_width, log_sf_lower, middle))
    return jax.nn.logsumexp(jax.nn.log_softmax(logits, axis=-1) + log_bin, axis=-1)


def _to_grid(y, levels: int):
    """The grid value −1 + 2k/(levels − 1) whose bin holds y (the edge bins open)."""
    k = jnp.clip(jnp.round((y + 1.0) * (levels - 1) / 2.0), 0, levels - 1)
    return -1.0 + 2.0 * k / (levels - 1)


def discretized_logistic_mixture_sample(key, logits, means, log_scales, *, levels: int):
    """A draw `[...]` from the mixture of `discretized_logistic_mixture_log_prob` (params `[..., K]`): a component
    from softmax(logits), a logistic draw μ + s·logit(u), then the grid value of its bin (exact but for u kept
    in [10⁻⁶, 1 − 10⁻⁶], as in PixelCNN++: logistic draws beyond μ ± 13.8 s are clipped there)."""
    component_key, logistic_key = jax.random.split(key)
    k = jax.random.categorical(component_key, logits, axis=-1)[..., None]
    mean, log_scale = (jnp.take_along_axis(a, k, axis=-1)[..., 0] for a in (means, log_scales))
    u = jax.random.uniform(logistic_key, mean.shape, jnp.float32, 1e-6, 1.0 - 1e-6)
    return _to_grid(mean + jnp.exp(log_scale) * (jnp.log(u) - jnp.log1p(-u)), levels)


def discretized_logistic_mixture_mode(logits, means, log_scales, *, levels: int):
    """The grid value `[...]` of highest probability under the mixture (one level at a time: memory of one)."""
    grid = -1.0 + 2.0 * jnp.arange(levels, dtype=jnp.float32) / (levels - 1)
    log_probs = jax.lax.map(lambda v: discretized_logistic_mixture_log_prob(
        jnp.full(means.shape[:-1], v), logits, means, log_scales, levels=levels), grid)
    return grid[jnp.argmax(log_probs, axis=0)]


# ------------------------------------------------------------------------------------------------- layers


def weight_normalized_kernel(v, g):
    """g · v / ‖v‖ per output channel of a conv kernel `[kh, kw, in, out]` (Salimans & Kingma, arXiv 1602.07868)."""
    return v * g * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(v), axis=(0, 1, 2)), 1e-24))


def depthwise_conv(x, kernel):
    """The depthwise convolution of x `[B, H, W, C]` with kernel `[k, k, 1, C]` (odd k, 'same' zero padding,
    stride 1) as the sum of the k² shifted copies of x times each tap: the operator `lax.conv_general_dilated`
    computes with `feature_group_count=C`, written so that XLA:CPU, whose grouped convolution is slow,
    compiles it to fused elementwise loops."""
    size = kernel.shape[0]
    pad = size // 2
    height, width = x.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    taps = [padded[:, i:i + height, j:j + width, :] * kernel[i, j, 0] for i in range(size) for j in range(size)]
    return functools.reduce(jnp.add, taps)


class Conv(nn.Module):
    """A `kernel × kernel` conv with symmetric padding kernel//2, weight-normalised when `weight_norm`
    (params `v`, `g`; else `kernel`); `groups` is the feature-group count (= channels: depthwise)."""

    features: int
    kernel: int = 3
    strides: int = 1
    groups: int = 1
    use_bias: bool = True
    weight_norm: bool = True
    names: tuple[str | None, ...] = _CONV_NAMES
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        shape = (self.kernel, self.kernel, x.shape[-1] // self.groups, self.features)
        init = nn.initializers.lecun_normal()
        if self.weight_norm:
            v = self.param("v", partitioned(init, self.names), shape)
            g = self.param("g", partitioned(nn.initializers.ones, self.names[-1:]), (self.features,))
            kernel = weight_normalized_kernel(v, g)
        else:
            kernel = self.param("kernel", partitioned(init, self.names), shape)
        pad = self.kernel // 2
        if self.groups == x.shape[-1] == self.features and self.strides == 1:
            y = depthwise_conv(x.astype(self.dtype), kernel.astype(self.dtype))
        else:
            y = jax.lax.conv_general_dilated(x.astype(self.dtype), kernel.astype(self.dtype), (self.strides,) * 2,
                                             [(pad, pad)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                             feature_group_count=self.groups)
        if self.use_bias:
            y = y + self.param("bias", partitioned(nn.initializers.zeros, self.names[-1:]), (self.features,))
        return y.astype(self.dtype)


class _Layers:
    """Conv / norm factories sharing the config's dtype, weight norm and BN settings."""

    def __init__(self, config: NVAEConfig, train: bool):
        self.config, self.train = config, train

    def conv(self, features, kernel=3, *, name, **kwargs):
        return Conv(features, kernel, weight_norm=self.config.weight_norm, dtype=self.config.compute_dtype,
                    name=name, **kwargs)

    def norm(self, name):
        cfg = self.config
        return nn.BatchNorm(use_running_average=not self.train, momentum=cfg.bn_momentum, epsilon=cfg.bn_epsilon,
                            dtype=cfg.compute_dtype, scale_init=partitioned(nn.initializers.ones, ("norm",)),
                            bias_init=partitioned(nn.initializers.zeros, ("norm",)), name=name)


class SqueezeExcitation(nn.Module):
    """x · sigmoid(Dense(ReLU(Dense(mean_hw x)))) with a max(C/16, 4) bottleneck (Hu et al., arXiv 1709.01507)."""

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        dense = lambda n, axes, name: nn.Dense(n, dtype=x.dtype, name=name,  # noqa: E731
                                               kernel_init=partitioned(nn.initializers.lecun_normal(), axes),
                                               bias_init=partitioned(nn.initializers.zeros, axes[1:]))
        s = nn.relu(dense(max(channels // 16, 4), ("embed", "mlp"), "squeeze")(jnp.mean(x, axis=(1, 2))))
        return x * nn.sigmoid(dense(channels, ("mlp", "embed"), "excite")(s))[:, None, None, :]


class EncoderCell(nn.Module):
    """Fig. 3b: x + r · SE(conv3×3(Swish(BN(conv3×3(Swish(BN(x))))))), r = `residual_scale`."""

    config: NVAEConfig

    @nn.compact
    def __call__(self, x, *, train: bool):
        cfg, layers = self.config, _Layers(self.config, train)
        channels = x.shape[-1]
        h = layers.conv(channels, use_bias=False, name="conv_0")(nn.swish(layers.norm("norm_0")(x)))
        h = layers.conv(channels, name="conv_1")(nn.swish(layers.norm("norm_1")(h)))
        if cfg.squeeze_excitation:
            h = SqueezeExcitation(name="se")(h)
        return nn.with_logical_constraint(x + cfg.residual_scale * h, _ACTIVATION_NAMES)


class DecoderCell(nn.Module):
    """Fig. 3a: x + r · SE(BN(conv1×1(Swish(BN(dwconv5×5(Swish(BN(conv1×1_E(BN(x)))))))))."""

    config: NVAEConfig

    @nn.compact
    def __call__(self, x, *, train: bool):
        cfg, layers = self.config, _Layers(self.config, train)
        channels, wide = x.shape[-1], cfg.decoder_expansion * x.shape[-1]
        h = layers.conv(wide, 1, use_bias=False, name="expand")(layers.norm("norm_0")(x))
        h = nn.swish(layers.norm("norm_1")(h))
        h = layers.conv(wide, 5, groups=wide, use_bias=False, names=("conv_h", "conv_w", None, "conv_out"),
                        name="depthwise")(h)
        h = layers.conv(channels, 1, use_bias=False, name="project")(nn.swish(layers.norm("norm_2")(h)))
        h = layers.norm("norm_3")(h)
        if cfg.squeeze_excitation:
            h = SqueezeExcitation(name="se")(h)
        return nn.with_logical_constraint(x + cfg.residual_scale * h, _ACTIVATION_NAMES)


def _upsample(x):
    batch, height, width, channels = x.shape
    return jax.image.resize(x, (batch, 2 * height, 2 * width, channels), "nearest")


# ------------------------------------------------------------------------------------------------- towers


class Encoder(nn.Module):
    """Bottom-up tower: images `[B, H, W, C]` → the output of every latent group, bottom (finest) first."""

    config: NVAEConfig

    @nn.compact
    def __call__(self, x, *, train: bool):
        cfg, layers = self.config, _Layers(self.config, train)
        h = layers.conv(cfg.channels, names=("conv_h", "conv_w", "image_channels", "conv_out"), name="stem")(
            x.astype(cfg.compute_dtype))
        for stage in range(cfg.num_preprocess):
            h = EncoderCell(cfg, name=f"pre_{stage}_cell")(h, train=train)
            h = layers.conv(2 * h.shape[-1], strides=2, name=f"pre_{stage}_down")(h)
        features = []
        for scale in range(cfg.num_scales):
            if scale:
                h = layers.conv(2 * h.shape[-1], strides=2, name=f"down_{scale}")(h)
            for group in range(cfg.groups_per_scale):
                for cell in range(cfg.cells_per_group):
                    h = EncoderCell(cfg, name=f"scale_{scale}_group_{group}_cell_{cell}")(h, train=train)
                features.append(h)
        return features


class LatentGroup(nn.Module):
    """One latent group of the top-down pass: prior, posterior (when given an encoder feature), z, cells.

    Returns the new h and, given a feature, per-example `kl`, `log_q`, `log_p` `[B]` (summed over dims).
    z = μ + temperature·σ·ε, with (μ, σ) the posterior's given a feature, else the prior's; `log_q` and
    `log_p` are the untempered densities at that z.
    """

    config: NVAEConfig
    first: bool  # the top group: prior N(0, I), posterior from the feature alone

    @nn.compact
    def __call__(self, h, feature, *, train: bool, temperature: float):
        cfg, layers = self.config, _Layers(self.config, train)
        latent_shape = h.shape[:3] + (cfg.latent_channels,)
        if self.first:
            mu_p = log_sigma_p = jnp.zeros(latent_shape, jnp.float32)
        else:
            prior = layers.conv(2 * cfg.latent_channels, name="prior")(nn.elu(h))
            mu_p, log_sigma_p = jnp.split(soft_clamp(prior.astype(jnp.float32)), 2, axis=-1)
        stats = None
        if feature is None:
            mu, log_sigma = mu_p, log_sigma_p
        else:
            inputs = feature if self.first else jnp.concatenate([h, feature], axis=-1)
            posterior = layers.conv(2 * cfg.latent_channels, name="posterior")(nn.elu(inputs))
            a, b = jnp.split(soft_clamp(posterior.astype(jnp.float32)), 2, axis=-1)
            if cfg.residual_posterior:  # (a, b) = (Δμ, log Δσ)
                mu, log_sigma, kl = mu_p + a, log_sigma_p + b, residual_normal_kl(a, b, log_sigma_p)
            else:  # (a, b) = (μ_q, log σ_q)
                mu, log_sigma, kl = a, b, normal_kl(a, b, mu_p, log_sigma_p)
        eps = jax.random.normal(self.make_rng("sample"), latent_shape, jnp.float32)
        z = mu + temperature * jnp.exp(log_sigma) * eps
        if feature is not None:
            total = lambda a: jnp.sum(a, axis=(1, 2, 3))  # noqa: E731
            stats = dict(kl=total(kl), log_q=total(normal_log_prob(z, mu, log_sigma)),
                         log_p=total(normal_log_prob(z, mu_p, log_sigma_p)), posterior_mean=mu.reshape(mu.shape[0], -1))
        h = layers.conv(h.shape[-1], 1, name="combine")(jnp.concatenate([h, z.astype(h.dtype)], axis=-1))
        for cell in range(cfg.cells_per_group):
            h = DecoderCell(cfg, name=f"cell_{cell}")(h, train=train)
        return h, stats


class Decoder(nn.Module):
    """Top-down tower: encoder features (top group first) or None (sample the prior) → the mixture
    parameters (logits, means, log_scales), each `[B, H, W, C, K]`, and each group's stats (or Nones)."""

    config: NVAEConfig

    @nn.compact
    def __call__(self, features, batch: int, *, train: bool, temperature: float):
        cfg, layers = self.config, _Layers(self.config, train)
        height, width, image_channels = cfg.image_shape
        factor = 2 ** (cfg.num_preprocess + cfg.num_scales - 1)
        top = (1, height // factor, width // factor, cfg.channels * factor)
        h0 = self.param("h0", partitioned(nn.initializers.normal(1.0), (None, None, None, "conv_out")), top)
        h = jnp.broadcast_to(h0.astype(cfg.compute_dtype), (batch,) + top[1:])
        stats = []
        for scale in range(cfg.num_scales):
            if scale:
                h = layers.conv(h.shape[-1] // 2, name=f"up_{scale}")(_upsample(h))
            for group in range(cfg.groups_per_scale):
                i = scale * cfg.groups_per_scale + group
                h, group_stats = LatentGroup(cfg, first=i == 0, name=f"group_{i}")(
                    h, None if features is None else features[i], train=train, temperature=temperature)
                stats.append(group_stats)
        for stage in range(cfg.num_preprocess):
            h = layers.conv(h.shape[-1] // 2, name=f"post_{stage}_up")(_upsample(h))
            h = DecoderCell(cfg, name=f"post_{stage}_cell")(h, train=train)
        k = cfg.num_mixtures
        out = layers.conv(3 * k * image_channels, names=("conv_h", "conv_w", "conv_in", "image_channels"),
                          name="output")(nn.elu(h))
        out = out.astype(jnp.float32).reshape(batch, height, width, image_channels, 3, k)
        return (out[..., 0, :], out[..., 1, :], jnp.maximum(out[..., 2, :], _MIN_LOG_SCALE)), stats


class NVAE(nn.Module):
    """The NVAE of `config`. RNG stream 'sample'; BatchNorm statistics in the mutable 'batch_stats' collection
    (train=True: the batch's statistics, updating the running ones; train=False: the running ones)."""

    config: NVAEConfig

    def setup(self):
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)

    def __call__(self, x, *, train: bool, temperature: float = 1.0) -> dict[str, jax.Array]:
        """Encode and decode images x `[B, H, W, C]` (on the `levels` grid in [−1, 1]).

        Returns: 'log_px' `[B]` log p(x|z) in nats summed over pixels; 'kl' `[B, G]` the analytic
          KL(q(z_i|·) ‖ p(z_i|z_<i)) of each group, top (coarsest) first, summed over its dims; 'log_q',
          'log_p' `[B]` log q(z|x) and log p(z) at the drawn z (the importance-weighted bound's terms; with
          temperature ≠ 1, z = μ_q + temperature·σ_q·ε and they are no longer an unbiased bound);
          'posterior_mean' one `[B, dims_g]` per group, q's mean (given the drawn ancestors), for active units.
        """
        self.config.validate(x.shape[1:])
        features = self.encoder(x, train=train)[::-1]  # the encoder's last group is the decoder's first
        (logits, means, log_scales), stats = self.decoder(features, x.shape[0], train=train, temperature=temperature)
        log_px = discretized_logistic_mixture_log_prob(x.astype(jnp.float32), logits, means, log_scales,
                                                       levels=self.config.levels)
        return dict(log_px=jnp.sum(log_px, axis=(1, 2, 3)),
                    kl=jnp.stack([s["kl"] for s in stats], axis=1),
                    log_q=sum(s["log_q"] for s in stats), log_p=sum(s["log_p"] for s in stats),
                    posterior_mean=tuple(s["posterior_mean"] for s in stats))

    def sample(self, num: int, *, train: bool = False, temperature: float = 1.0, pixels: str = "sample"):
        """`num` images `[num, H, W, C]` on the `levels` grid in [−1, 1]: z_i = μ_p + temperature·σ_p·ε, then
        a draw from p(x|z) (`pixels='sample'`) or its per-pixel mode ('mode': deterministic given z). Needs
        rngs={'sample': key} even at temperature 0 (ε is drawn, then scaled by 0).

        train=True normalises with the sampled batch's statistics and, applied with
        mutable=['batch_stats'], moves the decoder's running statistics towards them (NVAE's "BN statistics
        readjusted" before sampling at low temperature).
        """
        if pixels not in PIXEL_OUTPUTS:
            raise ValueError(f"NVAE.sample: pixels={pixels!r}; expected one of {list(PIXEL_OUTPUTS)}.")
        (logits, means, log_scales), _ = self.decoder(None, num, train=train, temperature=temperature)
        if pixels == "mode":
            return discretized_logistic_mixture_mode(logits, means, log_scales, levels=self.config.levels)
        return discretized_logistic_mixture_sample(self.make_rng("sample"), logits, means, log_scales,
                                                   levels=self.config.levels)


# --------------------------------------------------------------------------------- spectral regularisation


def conv_kernels(params) -> dict[str, jax.Array]:
    """The effective kernel `[kh, kw, in/groups, out]` of every conv in `params` (the 'params' collection),
    keyed by the conv's '/'-joined path: g·v/‖v‖ of a weight-normalised conv (leaves 'v', 'g'), else its
    4-d 'kernel'. Dense layers (squeeze-excitation) are not convs and are left out, as in NVAE."""
    flat = traverse_util.flatten_dict(nn.meta.unbox(params))
    kernels = {}
    for path, leaf in flat.items():
        parent = path[:-1]
        if path[-1] == "v" and leaf.ndim == 4 and parent + ("g",) in flat:
            kernels["/".join(parent)] = weight_normalized_kernel(leaf, flat[parent + ("g",)])
        elif path[-1] == "kernel" and leaf.ndim == 4:
            kernels["/".join(parent)] = leaf
    return kernels


def _as_matrix(kernel):
    """A kernel `[kh, kw, i, out]` as the matrix `[out, kh·kw·i]` (NVAE's; for a depthwise conv, i = 1, so
    each output channel's own 5×5 filter is a row: not the conv's operator norm, but what NVAE bounds)."""
    return jnp.moveaxis(kernel, -1, 0).reshape(kernel.shape[-1], -1).astype(jnp.float32)


def _unit(x):
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x), 1e-24))


def init_spectral_state(params, key) -> dict[str, jax.Array]:
    """A random unit vector u `[out]` for every conv of `params`, keyed as `conv_kernels`."""
    sizes = {name: kernel.shape[-1] for name, kernel in jax.eval_shape(conv_kernels, params).items()}
    names = sorted(sizes)
    # One draw, normalised per segment and split: a handful of ops to compile, not a few per kernel.
    segments = np.repeat(np.arange(len(names)), [sizes[name] for name in names])
    draws = jax.random.normal(key, segments.shape, jnp.float32)
    norms = jax.ops.segment_sum(jnp.square(draws), segments, num_segments=len(names))
    units = draws * jax.lax.rsqrt(jnp.maximum(norms, 1e-24))[segments]
    return dict(zip(names, jnp.split(units, np.cumsum([sizes[name] for name in names])[:-1]), strict=True))


def spectral_norms(params, state, *, iterations: int = 1):
    """Largest singular values s⁽ⁱ⁾ of the convs' kernel matrices, for L_SR = λ Σᵢ s⁽ⁱ⁾ (NVAE Eq. 4).

    From the stored u, `iterations` power-iteration steps v ← Wᵀu/‖Wᵀu‖, u ← Wv/‖Wv‖, then s = uᵀWv with u, v
    under stop_gradient, so ∂s/∂W = u vᵀ. Kernels whose matrices have one shape iterate together (stacked, as
    NVAE batches them). Returns (Σᵢ s⁽ⁱ⁾, {name: s⁽ⁱ⁾}, the new state {name: u}).
    """
    if iterations < 1:
        raise ValueError(f"spectral_norms: iterations must be >= 1, got {iterations}.")
    highest = jax.lax.Precision.HIGHEST
    matrices = {name: _as_matrix(kernel) for name, kernel in conv_kernels(params).items()}
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for name, w in matrices.items():
        by_shape.setdefault(w.shape, []).append(name)
    sigmas, new_state = {}, {}
    for names in by_shape.values():
        w = jnp.stack([matrices[name] for name in names])  # [n, out, in]
        w_fixed = jax.lax.stop_gradient(w)

        def step(_, uv, w_fixed=w_fixed):
            v = jax.vmap(_unit)(jnp.einsum("no,noi->ni", uv[0], w_fixed, precision=highest))
            return jax.vmap(_unit)(jnp.einsum("noi,ni->no", w_fixed, v, precision=highest)), v

        u0 = jnp.stack([state[name] for name in names])
        u, v = jax.lax.fori_loop(0, iterations, step, (u0, jnp.zeros(w.shape[::2], jnp.float32)))
        sigma = jnp.einsum("no,noi,ni->n", u, w, v, precision=highest)
        for i, name in enumerate(names):
            sigmas[name], new_state[name] = sigma[i], u[i]
    return sum(sigmas.values()), sigmas, new_state
