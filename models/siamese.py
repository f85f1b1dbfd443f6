r"""Siamese networks for self-supervised learning without negatives (SimSiam, BYOL), and collapse diagnostics.

The online network is encoder → projector → predictor, as in SimSiam (Chen & He, arXiv 2011.10566, §3) and BYOL
(Grill et al., arXiv 2006.07733, §3.1), sized for 8×8 images: the encoder is an MLP whose output `h` is the
representation a linear probe reads; the projector is Dense–BN–ReLU–Dense (its output `z` is what the loss
compares); the predictor is SimSiam's bottleneck Dense–BN–ReLU–Dense (`d → d/4 → d`). Batch normalisation here
always uses the statistics of the batch it is given (`BatchStatsNorm`: training-mode BN, no running averages):
only the projector and predictor have it, and the probe reads the encoder, which has none, so a representation
never depends on its batch. Under `jit` with a sharded batch the means are over the global batch (synchronised
BN, as SimSiam trains).

`closed_form_predictor` is the "strong predictor" of the collapse study: the linear map that predicts the
targets best on the batch itself, solved exactly at every step instead of learnt by gradient steps (post 7980
argues that non-collapse comes from the optimiser's dynamics; DirectPred, Tian et al., arXiv 2102.06810, sets
the predictor from the representations' correlation in closed form).

Collapse diagnostics (computed on `[N, d]` outputs):
- `normalized_std`: the std over examples of the ℓ2-normalised outputs, averaged over dimensions. It is 0 for
  collapsed outputs and ≈ 1/√d for outputs spread isotropically (SimSiam §4.1, Fig. 2 middle).
- `effective_rank`: exp of the entropy of the normalised singular values of the (uncentred) outputs (Roy &
  Vetterli, EUSIPCO 2007; RankMe, Garrido et al., arXiv 2210.02885): 1 for outputs collapsed to a point (or to
  a line through the origin), d for d equal singular values; low values between are dimensional collapse.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.layers import partitioned

PREDICTORS = ("mlp", "none", "closed_form")


@dataclasses.dataclass(frozen=True)
class SiameseConfig:
    """The online network. `predictor`: 'mlp' (learnt), 'none' (p = z) or 'closed_form' (solved per batch)."""

    hidden: int = 256  # encoder width = representation size
    encoder_layers: int = 2
    projector_hidden: int = 256
    projection_dim: int = 64  # d, the size of z and p
    predictor: str = "mlp"
    predictor_hidden: int = 16  # SimSiam's bottleneck, d/4
    projector_output_norm: bool = False  # BN on z (SimSiam's ResNet projector has one; it hides collapse here)

    def validate(self) -> None:
        if self.predictor not in PREDICTORS:
            raise ValueError(f"'model.predictor' is {self.predictor!r}; expected one of {list(PREDICTORS)}")
        for name in ("hidden", "encoder_layers", "projector_hidden", "projection_dim", "predictor_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"'model.{name}' must be a positive integer, got {value!r}")
        if not isinstance(self.projector_output_norm, bool):
            raise ValueError(f"'model.projector_output_norm' must be True or False, got {self.projector_output_norm!r}")


def _dense(features: int, axes: tuple[str, str], name: str) -> nn.Dense:
    return nn.Dense(features, kernel_init=partitioned(nn.initializers.lecun_normal(), axes),
                    bias_init=partitioned(nn.initializers.zeros, axes[1:]), name=name)


class BatchStatsNorm(nn.Module):
    """Batch normalisation with the batch's own mean and variance over axis 0, then a learnt scale and bias
    (Ioffe & Szegedy, arXiv 1502.03167, Alg. 1: training mode, always)."""

    axis_name: str = "mlp"
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", partitioned(nn.initializers.ones, (self.axis_name,)), (x.shape[-1],))
        bias = self.param("bias", partitioned(nn.initializers.zeros, (self.axis_name,)), (x.shape[-1],))
        mean = jnp.mean(x, axis=0)
        var = jnp.mean(jnp.square(x - mean), axis=0)
        return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


def _layer_axis(i: int) -> str:
    """The logical name of encoder layer i's outputs: 'mlp' and 'embed' alternate (Megatron-style), so
    consecutive kernels are split on different mesh axes."""
    return "mlp" if i % 2 == 0 else "embed"


class Encoder(nn.Module):
    """Flattened image → `encoder_layers` × (Dense, ReLU): the representation h `[B, hidden]`."""

    config: SiameseConfig

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = images.reshape(images.shape[0], -1)
        for i in range(self.config.encoder_layers):
            axes = ("pixels" if i == 0 else _layer_axis(i - 1), _layer_axis(i))
            x = nn.relu(_dense(self.config.hidden, axes, f"dense_{i}")(x))
        return x


class Projector(nn.Module):
    config: SiameseConfig

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        c = self.config
        axis = _layer_axis(c.encoder_layers)  # the other name than the encoder's output
        x = _dense(c.projector_hidden, (_layer_axis(c.encoder_layers - 1), axis), "dense_0")(h)
        x = nn.relu(BatchStatsNorm(axis_name=axis, name="norm_0")(x))
        z = _dense(c.projection_dim, (axis, "projection"), "dense_1")(x)
        return BatchStatsNorm(axis_name="projection", name="norm_1")(z) if c.projector_output_norm else z


class Predictor(nn.Module):
    config: SiameseConfig

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        c = self.config
        x = nn.relu(BatchStatsNorm(name="norm_0")(_dense(c.predictor_hidden, ("projection", "mlp"), "dense_0")(z)))
        return _dense(c.projection_dim, ("mlp", "projection"), "dense_1")(x)


class SiameseNetwork(nn.Module):
    """`(h, z, p)` of images `[B, H, W, C]`; p is None unless `config.predictor == 'mlp'` (the caller forms
    the prediction of the other predictors). `encode` gives h alone."""

    config: SiameseConfig

    def setup(self):
        self.encoder = Encoder(self.config)
        self.projector = Projector(self.config)
        if self.config.predictor == "mlp":
            self.predictor = Predictor(self.config)

    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        h = self.encoder(images)
        z = self.projector(h)
        return h, z, self.predictor(z) if self.config.predictor == "mlp" else None

    def encode(self, images: jax.Array) -> jax.Array:
        return self.encoder(images)


def l2_normalize(x: jax.Array, epsilon: float = 1e-12) -> jax.Array:
    """x / max(‖x‖, ε) along the last axis, with a finite gradient at x = 0."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), epsilon**2))


def closed_form_predictor(inputs: Any, targets: Any, *, ridge: float) -> jax.Array:
    r"""The ridge-regression map W `[d, d]` from the ℓ2-normalised `inputs` to the ℓ2-normalised `targets`:

    .. math:: W = \bigl(\tfrac1N A^\top A + \lambda I\bigr)^{-1} \tfrac1N A^\top B,
              \quad A = \bar{\text{inputs}},\ B = \bar{\text{targets}},

    the minimiser of :math:`\tfrac1N\lVert AW - B\rVert_F^2 + \lambda\lVert W\rVert_F^2`, returned under
    `stop_gradient`: the predictor is solved, not differentiated through. Predictions are `l2_normalize(z) @ W`.
    """
    a, b = l2_normalize(jnp.asarray(inputs, jnp.float32)), l2_normalize(jnp.asarray(targets, jnp.float32))
    highest = jax.lax.Precision.HIGHEST
    n, d = a.shape
    gram = jnp.matmul(a.T, a, precision=highest) / n + ridge * jnp.eye(d, dtype=a.dtype)
    w = jax.scipy.linalg.solve(gram, jnp.matmul(a.T, b, precision=highest) / n, assume_a="pos")
    return jax.lax.stop_gradient(w)


def normalized_std(outputs: Any) -> jax.Array:
    """Mean over dimensions of the std over examples of the ℓ2-normalised `outputs` `[N, d]` (≈ 1/√d: spread;
    0: collapsed)."""
    return jnp.mean(jnp.std(l2_normalize(jnp.asarray(outputs, jnp.float32)), axis=0))


def effective_rank(outputs: Any, epsilon: float = 1e-12) -> jax.Array:
    r"""exp(−Σ pᵢ log pᵢ), pᵢ = σᵢ / Σσ, over the singular values σ of `outputs` `[N, d]` (uncentred)."""
    x = jnp.asarray(outputs, jnp.float32)
    sigma = jnp.linalg.svd(x, compute_uv=False)
    p = sigma / jnp.maximum(jnp.sum(sigma), epsilon)
    return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.maximum(p, epsilon)), 0.0)))
