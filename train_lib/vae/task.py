"""The 'vae' task: NVAE on images, trained and evaluated by the generic trainer.

Implements `train_lib.task.Task` with `models.nvae` (Vahdat & Kautz, "NVAE: A Deep Hierarchical Variational
Autoencoder", NeurIPS 2020, arXiv 2007.03898; post 7574, "强大的NVAE：以后再也不能说VAE生成的图像模糊了"):

- batches are {"images": `[B, H, W, C]` in [−1, 1] on the data's grey-level grid, "labels", "index"} (the
  labels and indices are unused); `data.dataset` 'digits' is scikit-learn's 8×8 digits (17 levels) with the
  diffusion family's fixed 1,437 / 360 split, 'cifar10' CIFAR-10's Python batches in `data.path` (256 levels),
  both from `train_lib.image_data`;
- the loss of an image is NVAE's objective: −log p(x|z) + β(t) Σ_g γ_g KL_g in nats, plus λ Σ_i σ_i (spectral
  regularisation, NVAE Eq. 4, λ = `vae.spectral_coeff`, σ_i the largest singular value of conv layer i by power
  iteration) averaged over the batch. β(t) is the KL warm-up, max(min((t − const)/warmup, 1), β_min) (NVAE
  §3.3 and its code's schedule: `vae.kl_const_steps`, `vae.kl_warmup_steps`, `vae.kl_min_coeff`); γ_g the KL
  balancing coefficients (NVAE App. A), used while β < 1: γ_g ∝ (mean over the batch of KL_g + 0.01) / α_g,
  normalised to mean 1 over the groups, α_g ∝ the group's latent dimensions over the number of groups at its
  scale, so a group whose KL is small for its size is pushed less and stays active;
- the non-gradient variables are the model state (`Task.init_model_state`): BatchNorm's running statistics
  ('batch_stats', updated by every training step with the batch's statistics, read at evaluation) and the
  power-iteration vectors of the spectral norms ('spectral'); both are checkpointed with the run;
- logged every step and at every evaluation: the negative ELBO in bits/dim (`nelbo_bpd`, with the analytic KL
  and β = 1) split into reconstruction and KL, the KL of every group (`kl_group_<g>` in nats per image, g = 0 the
  top of the hierarchy), β, and the sum of the spectral norms (`spectral_norm_sum`, logged also when λ = 0).

Bits per dimension are −log₂ P(x)/D for the probability of the image's bins, the convention of
`models.diffusion.likelihood` (bins x ± 1/(L−1), open at ±1), so NVAE and DDPM stand in one table.

`python -m train_lib.vae.evaluate --workdir=DIR` gives the importance-weighted bound (IWAE, Burda et al., arXiv
1509.00519) on the test split, active units per group, FCD/KID of samples at several temperatures after
readjusting BatchNorm's statistics to each (NVAE §5), and PNG grids.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models import nvae
from train_lib import config_lib, image_data
from train_lib.config_lib import ConfigError
from train_lib.task import TaskBase

IMAGE_SHAPES, LEVELS = image_data.IMAGE_SHAPES, image_data.LEVELS


@dataclasses.dataclass(frozen=True)
class VAESettings:
    """`config.vae`: the objective's schedule and regularisers."""

    kl_warmup_steps: int  # steps of β's linear rise to 1 (0: β = 1 from the start)
    kl_const_steps: int  # steps at β_min before the rise
    kl_min_coeff: float  # β_min
    kl_balance: bool  # NVAE's KL balancing while β < 1
    spectral_coeff: float  # λ of the spectral regulariser (0: off; NVAE's MNIST setting 1e-2)
    spectral_iterations: int  # power-iteration steps per training step


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    """`config.sample`: the defaults of `python -m train_lib.vae.evaluate` and of the end-of-run samples."""

    temperatures: tuple  # of the FCD/KID table (NVAE samples at 0.6–1.0)
    bn_readjust_steps: int  # sampling passes in training mode that move BN's statistics before sampling (0: none)
    bn_readjust_batch: int  # samples per readjusting pass
    report_samples: int  # drawn at the end of training (as text for digits; 0: none)
    report_temperature: float


def dataset_name(config) -> str:
    return image_data.check_dataset(config_lib.typed(config, "data.dataset", str),
                                    config_lib.typed(config, "data.path", str))


def kl_coefficient(step, settings: VAESettings):
    """β at optimizer step `step`: β_min for `kl_const_steps`, then linear to 1 over `kl_warmup_steps`."""
    if settings.kl_warmup_steps == 0:
        return jnp.ones((), jnp.float32)
    rise = (jnp.asarray(step, jnp.float32) - settings.kl_const_steps) / settings.kl_warmup_steps
    return jnp.maximum(jnp.minimum(rise, 1.0), settings.kl_min_coeff)


def balance_prior(model_config) -> np.ndarray:
    """α_g of KL balancing: the group's latent dimensions over the number of groups at its scale, over the
    smallest such value (NVAE App. A: each scale gets the same share, spread over its groups)."""
    dims = np.asarray(nvae.latent_dims_per_group(model_config), np.float64)
    alpha = dims / model_config.groups_per_scale
    return alpha / alpha.min()


def balanced_kl(kl: jax.Array, beta: jax.Array, alpha: np.ndarray, *, balance: bool) -> tuple[jax.Array, jax.Array]:
    """(per-example β Σ_g γ_g KL_g `[B]`, γ `[G]`) for per-group KLs `kl` `[B, G]` (γ ≡ 1 when not balancing
    or once β = 1). γ is a constant of the gradient (NVAE App. A)."""
    if not balance:
        return beta * kl.sum(-1), jnp.ones(kl.shape[-1], kl.dtype)
    size = jnp.mean(jnp.abs(kl), axis=0) + 0.01
    gamma = size / jnp.asarray(alpha, kl.dtype) * jnp.sum(size)
    gamma = jax.lax.stop_gradient(gamma / jnp.mean(gamma))
    gamma = jnp.where(beta < 1.0, gamma, jnp.ones_like(gamma))
    return beta * jnp.sum(kl * gamma, axis=-1), gamma


class VAETask(TaskBase):
    """NVAE (`models.nvae.NVAE`) with its warmed-up, balanced and spectrally regularised ELBO."""

    description = "a hierarchical VAE of images (NVAE)"
    commands = ("train_lib.vae.evaluate",)
    throughput_unit = "images"
    # BatchNorm's statistics and KL balancing's coefficients couple a batch's examples.
    loss_is_example_mean = False

    def __init__(self, config):
        super().__init__(config)
        self.dataset = dataset_name(config)
        self.data_path = config.data.path
        self.image_shape = IMAGE_SHAPES[self.dataset]
        self.levels = LEVELS[self.dataset]
        self.dims = math.prod(self.image_shape)
        try:
            values = config_lib.dataclass_values(nvae.NVAEConfig, config.model)
            for key in ("image_shape", "levels"):
                if key in values:
                    raise ValueError(f"'model.{key}' is set by data.dataset, not in the model config")
            self.model_config = nvae.NVAEConfig(**values, image_shape=self.image_shape, levels=self.levels)
            self.model_config.validate(self.image_shape)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config: {e}") from None
        self.compute_dtype = self.model_config.dtype
        self.settings = s = config_lib.read_typed_dataclass(VAESettings, config.vae, "vae")
        for key in ("kl_warmup_steps", "kl_const_steps"):
            if getattr(s, key) < 0:
                raise ConfigError(f"config: 'vae.{key}' must be non-negative, got {getattr(s, key)}")
        if not 0.0 < s.kl_min_coeff <= 1.0:
            raise ConfigError(f"config: 'vae.kl_min_coeff' must be in (0, 1], got {s.kl_min_coeff}")
        if s.spectral_coeff < 0 or s.spectral_iterations < 1:
            raise ConfigError(f"config: 'vae.spectral_coeff' ({s.spectral_coeff}) must be non-negative (0: off) and "
                              f"'vae.spectral_iterations' ({s.spectral_iterations}) at least 1")
        self.sample_settings = p = config_lib.read_dataclass(SampleSettings, config.sample, "sample")
        temperatures = p.temperatures
        if (isinstance(temperatures, str) or not isinstance(temperatures, (tuple, list)) or not temperatures
                or not all(isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0 for t in temperatures)):
            raise ConfigError(f"config: 'sample.temperatures' is {temperatures!r}; expected a tuple of positive "
                              "numbers, e.g. (1.0, 0.6)")
        for key in ("bn_readjust_steps", "report_samples"):
            value = getattr(p, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"config: 'sample.{key}' must be a non-negative integer, got {value!r}")
        if not isinstance(p.bn_readjust_batch, int) or p.bn_readjust_batch < 2:
            raise ConfigError(f"config: 'sample.bn_readjust_batch' must be an integer of at least 2 (batch "
                              f"statistics), got {p.bn_readjust_batch!r}")
        if not isinstance(p.report_temperature, (int, float)) or p.report_temperature <= 0:
            raise ConfigError(f"config: 'sample.report_temperature' must be positive, got {p.report_temperature!r}")
        self.model = nvae.NVAE(self.model_config)
        self.alpha = balance_prior(self.model_config)
        self.num_groups = len(self.alpha)
        self.has_final_report = p.report_samples > 0

    @functools.cached_property
    def data(self) -> image_data.ImageDataset:
        try:
            return image_data.load_image_dataset(self.dataset, self.data_path or None)
        except ValueError as e:
            raise ConfigError(f"config: 'data.path': {e}") from None

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        return {"images": jax.ShapeDtypeStruct((batch_size,) + self.image_shape, jnp.float32),
                "labels": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
                "index": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}

    # ----------------------------------------------------------------------------------------------
    # Variables: the parameters, and the model state (BN statistics, power-iteration vectors).
    # ----------------------------------------------------------------------------------------------
    def _init_variables(self, rng, batch):
        params_rng, sample_rng = jax.random.split(rng)
        return self.model.init({"params": params_rng, "sample": sample_rng}, batch["images"], train=False)

    def init_params(self, rng: jax.Array, batch) -> Any:
        return self._init_variables(rng, batch)["params"]

    def init_model_state(self, rng: jax.Array, batch) -> Any:
        variables = self._init_variables(rng, batch)
        spectral = nvae.init_spectral_state(variables["params"], jax.random.fold_in(rng, 1))
        return {"batch_stats": variables["batch_stats"], "spectral": spectral}

    def variables(self, params, model_state) -> dict[str, Any]:
        return {"params": params, "batch_stats": model_state["batch_stats"]}

    # ----------------------------------------------------------------------------------------------
    # The objective.
    # ----------------------------------------------------------------------------------------------
    def forward(self, params, model_state, images, key, *, train: bool):
        """(model outputs, new batch_stats) of one pass: BN on the batch's statistics when training."""
        variables = self.variables(params, model_state)
        if train:
            out, updates = self.model.apply(variables, images, train=True, rngs={"sample": key},
                                            mutable=["batch_stats"])
            return out, updates["batch_stats"]
        return self.model.apply(variables, images, train=False, rngs={"sample": key}), model_state["batch_stats"]

    def bits_per_dim(self, nats):
        return nats / (self.dims * math.log(2.0))

    def _metrics(self, out) -> dict[str, jax.Array]:
        """Per-example ELBO terms `[B]` (β = 1, analytic KL): bits/dim, and each group's KL in nats."""
        kl = out["kl"]
        recon = -out["log_px"]
        metrics = {"nelbo_bpd": self.bits_per_dim(recon + kl.sum(-1)), "recon_bpd": self.bits_per_dim(recon),
                   "kl_bpd": self.bits_per_dim(kl.sum(-1))}
        metrics.update({f"kl_group_{g}": kl[:, g] for g in range(kl.shape[1])})
        return metrics

    def objective(self, params, model_state, batch, rng, step, *, train: bool = True):
        """(loss, (metrics, new model state)): NVAE's objective at step `step` (module docstring)."""
        s = self.settings
        out, batch_stats = self.forward(params, model_state, batch["images"], rng, train=train)
        beta = kl_coefficient(step, s)
        weighted_kl, gamma = balanced_kl(out["kl"], beta, self.alpha, balance=s.kl_balance)
        per_example = -out["log_px"] + weighted_kl
        sigma_sum, _, spectral = nvae.spectral_norms(params, model_state["spectral"], iterations=s.spectral_iterations)
        loss = jnp.mean(per_example)
        if s.spectral_coeff > 0:
            loss = loss + s.spectral_coeff * sigma_sum
        metrics = {k: jnp.mean(v) for k, v in self._metrics(out).items()}
        metrics.update({"kl_coeff": beta, "spectral_norm_sum": sigma_sum, "kl_balance_min": jnp.min(gamma)})
        if not train:
            spectral = model_state["spectral"]
        new_state = {"batch_stats": batch_stats, "spectral": spectral}
        return loss, (jax.lax.stop_gradient(metrics), new_state)

    def stateful_value_and_grad(self, params, model_state, batch, rng, step):
        grad_fn = jax.value_and_grad(functools.partial(self.objective, train=True), has_aux=True)
        (loss, (metrics, new_state)), grads = grad_fn(params, model_state, batch, rng, step)
        return ((loss, metrics), grads), new_state

    def loss(self, params, batch, rng, *, train: bool = True):
        raise NotImplementedError("the vae task's loss needs its model state: the trainer calls "
                                  "stateful_value_and_grad (and objective(params, model_state, ...))")

    def model_flops_per_step(self) -> float:
        """3× the matmul and convolution FLOPs of the training forward pass (`train_lib.flops`)."""
        from train_lib import flops

        spec = self.batch_spec(self.batch_size)
        rng = jax.random.PRNGKey(0)
        params = jax.eval_shape(self.init_params, rng, spec)
        state = jax.eval_shape(self.init_model_state, rng, spec)
        forward = lambda p, m, b, r: self.forward(p, m, b["images"], r, train=True)  # noqa: E731
        return 3.0 * flops.count_matmul_flops(forward, params, state, spec, rng)

    # ----------------------------------------------------------------------------------------------
    # Evaluation.
    # ----------------------------------------------------------------------------------------------
    def eval_key(self, images: jax.Array) -> jax.Array:
        """A key that depends only on the batch's contents (and the seed): evaluation is repeatable."""
        levels = jnp.round((images + 1.0) * (self.levels - 1) / 2.0).astype(jnp.uint32).reshape(images.shape[0], -1)
        weights = jnp.arange(1, levels.shape[1] + 1, dtype=jnp.uint32)
        rows = jnp.arange(1, levels.shape[0] + 1, dtype=jnp.uint32)[:, None]
        return jax.random.fold_in(jax.random.PRNGKey(self.seed), jnp.sum(levels * weights * rows, dtype=jnp.uint32))

    def eval_sums(self, params, batch, *, model_state):
        """Sums of the ELBO terms (β = 1) over the batch, BN on its running statistics."""
        out, _ = self.forward(params, model_state, batch["images"], self.eval_key(batch["images"]), train=False)
        sums = {k: jnp.sum(v) for k, v in self._metrics(out).items()}
        sums["count"] = jnp.asarray(batch["images"].shape[0], jnp.float32)
        return sums

    def datasets(self, rows: tuple[int, int]):
        """(train: shuffled with `seed`, reshuffled every epoch, repeated; eval: the test split in order)."""
        data, batch = self.data, self.batch_size
        train, evaluation, num_eval = image_data.pipelines(data, batch_size=batch, eval_batches=self.eval_batches,
                                                           seed=self.seed, rows=rows)
        dims = nvae.latent_dims_per_group(self.model_config)
        description = (f"{data.name}: {len(data.train_images)} train, {len(data.test_images)} test images "
                       f"{'×'.join(map(str, data.image_shape))}, {data.levels} levels; evaluating on "
                       f"{num_eval * batch} test images; {len(dims)} latent groups of {', '.join(map(str, dims))} "
                       "dimensions (top first)")
        return train, evaluation, {"data": description, "data_fingerprint": image_data.fingerprint(data),
                                   "latent_dims": sum(dims)}

    # ----------------------------------------------------------------------------------------------
    # Sampling.
    # ----------------------------------------------------------------------------------------------
    def readjusted_batch_stats(self, params, model_state, key, *, temperature: float, steps: int, batch: int):
        """BatchNorm's statistics after `steps` sampling passes of `batch` samples at `temperature` in training
        mode (NVAE §5: the statistics of the decoder at the sampling temperature, not of the training data)."""
        sample_fn = jax.jit(functools.partial(self.model.apply, method=nvae.NVAE.sample, train=True,
                                              temperature=temperature, mutable=["batch_stats"]),
                            static_argnums=(1,))
        stats = model_state["batch_stats"]
        for i in range(steps):
            _, updates = sample_fn({"params": params, "batch_stats": stats}, batch,
                                   rngs={"sample": jax.random.fold_in(key, i)})
            stats = updates["batch_stats"]
        return {**model_state, "batch_stats": stats}

    def draw_samples(self, params, model_state, key, *, num: int, temperature: float, readjust_steps: int,
                     batch_size: int = 500) -> np.ndarray:
        """`num` images `[num, H, W, C]` at `temperature`, after `readjust_steps` passes of BN readjustment."""
        readjust_key, sample_key = jax.random.split(key)
        if readjust_steps:
            model_state = self.readjusted_batch_stats(params, model_state, readjust_key, temperature=temperature,
                                                      steps=readjust_steps,
                                                      batch=self.sample_settings.bn_readjust_batch)
        sample_fn = jax.jit(functools.partial(self.model.apply, method=nvae.NVAE.sample, train=False,
                                              temperature=temperature), static_argnums=(1,))
        size = min(num, batch_size)
        chunks = [np.asarray(sample_fn(self.variables(params, model_state), size,
                                       rngs={"sample": jax.random.fold_in(sample_key, i)}))
                  for i in range(-(-num // size))]
        return np.concatenate(chunks)[:num]

    def final_report(self, params, *, model_state) -> str:
        """`sample.report_samples` samples at `sample.report_temperature` (BN readjusted), as text for digits."""
        p = self.sample_settings
        images = self.draw_samples(params, model_state, jax.random.PRNGKey(self.seed), num=p.report_samples,
                                   temperature=p.report_temperature, readjust_steps=p.bn_readjust_steps)
        header = (f"{p.report_samples} samples at temperature {p.report_temperature:g} (BN readjusted over "
                  f"{p.bn_readjust_steps} passes)")
        if self.dataset != "digits":
            return (f"{header}: pixel mean {images.mean():.3f}, std {images.std():.3f}. IWAE, FCD and grids: "
                    "python -m train_lib.vae.evaluate --workdir=<workdir>")
        return f"{header}:\n{image_data.ascii_digits(images, self.levels)}"

