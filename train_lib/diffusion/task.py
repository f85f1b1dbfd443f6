"""The 'diffusion' task: a U-Net denoiser on images, trained and evaluated by the generic trainer.

Implements `train_lib.task.Task` with the library in `models/diffusion`:

- batches are {"images": `[B, H, W, C]` float32 in [−1, 1] on the data's grey-level grid, "labels": `[B]`
  int32, "index": `[B]` the example's index in its split (unused here)}; `data.dataset` 'digits' is
  scikit-learn's 8×8 digits (17 levels), 'cifar10' CIFAR-10's Python pickle batches in the directory
  `data.path` (256 levels), both read by `train_lib.image_data`;
- the loss is `models.diffusion.training.diffusion_loss` (ε-, x₀- or v-prediction, "simple" or "elbo"
  weighting, t uniform over the full schedule), with optional random horizontal flips and, for a
  class-conditional U-Net (`model.num_classes > 0`), optional label dropout to the "no class" token;
- evaluation on the test split reports the same loss and the K-step NLL bound in bits/dim
  (`diffusion.eval_nll_steps`, sampler `diffusion.eval_nll_method`, with its prior, diffusion and
  reconstruction terms), both on noise drawn from a key fixed by each batch's contents, so every
  evaluation of a checkpoint is the same;
- the final report draws a few samples and prints them (as text, for digits).

Sampling, FCD/KID and the full NLL and sample-quality table are `python -m train_lib.diffusion.sample`,
whose defaults are the run's `sample.*` keys (`SampleSettings`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import unet as unet_lib
from models.diffusion import likelihood, prediction, samplers, schedules, training
from train_lib import config_lib, flops, image_data
from train_lib.config_lib import ConfigError
from train_lib.task import TaskBase

IMAGE_SHAPES, LEVELS = image_data.IMAGE_SHAPES, image_data.LEVELS
# Samplers whose NLL needs nothing but the network: the analytic ones need Γ (train_lib.diffusion.sample
# estimates and caches it) and DDIM's needs η > 0.
EVAL_NLL_METHODS = ("ddpm_beta", "ddpm_beta_tilde")


def dataset_name(config) -> str:
    """`data.dataset` ('digits', bundled with scikit-learn, or 'cifar10', read from the directory `data.path`);
    a config without the key means 'digits' for `data.path` '' and 'cifar10' otherwise."""
    path = config.data.path
    return image_data.check_dataset(config.data.get("dataset", "") or ("cifar10" if path else "digits"), path)


def unet_config(config, image_shape: tuple[int, int, int]) -> unet_lib.UNetConfig:
    """The `UNetConfig` of `config.model`, validated against the image shape. Only UNetConfig's fields
    are read, so another `model.*` key is left unread (and the trainer refuses it)."""
    try:
        cfg = unet_lib.UNetConfig.from_dict(config_lib.dataclass_values(unet_lib.UNetConfig, config.model))
        cfg.validate(image_shape)
    except ValueError as e:
        raise ConfigError(f"config: {e}") from None
    return cfg


def _check(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"config: '{key}' is {value!r}; expected one of {sorted(choices)}")


@dataclasses.dataclass(frozen=True)
class DiffusionSettings:
    """`config.diffusion`: the forward process and what the network learns."""

    schedule: str  # a key of models.diffusion.schedules.BETA_SCHEDULES
    num_timesteps: int  # T
    prediction: str  # 'eps', 'x0' or 'v'
    weighting: str  # 'simple' or 'elbo'
    label_dropout: float  # conditional models: P(label → "no class") in training
    eval_nll_steps: int  # K of the NLL bound at each evaluation (0: off)
    eval_nll_method: str  # EVAL_NLL_METHODS


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    """`config.sample`: the defaults of `python -m train_lib.diffusion.sample` and of the end-of-run samples.

    `eps_from_clipped_x0` and `second_last_sigma_pixels` are the two conventions on which implementations
    differ (see models.diffusion.samplers.sample); keys an older config lacks take these defaults.
    """

    sampler: str
    steps: int
    eta: float
    spacing: str
    clip_x0: bool
    report_samples: int  # drawn at the end of training (as text for digits; 0: none)
    gamma_images: int  # training images for Analytic-DPM's Γ
    eps_from_clipped_x0: bool = True
    second_last_sigma_pixels: float = 0.0


def validate_diffusion_config(d: DiffusionSettings, s: SampleSettings, num_classes: int) -> None:
    """Choices and ranges of `config.diffusion` and `config.sample`, checked before anything compiles."""
    _check("diffusion.schedule", d.schedule, schedules.BETA_SCHEDULES)
    _check("diffusion.prediction", d.prediction, prediction.PREDICTIONS)
    _check("diffusion.weighting", d.weighting, training.WEIGHTINGS)
    _check("diffusion.eval_nll_method", d.eval_nll_method, EVAL_NLL_METHODS)
    _check("sample.sampler", s.sampler, samplers.SAMPLERS)
    _check("sample.spacing", s.spacing, schedules.SPACINGS)
    if d.num_timesteps < 2:
        raise ConfigError(f"config: 'diffusion.num_timesteps' must be at least 2, got {d.num_timesteps}")
    if not 0 <= d.eval_nll_steps <= d.num_timesteps:
        raise ConfigError(f"config: 'diffusion.eval_nll_steps' must be in 0..{d.num_timesteps} (0 skips the NLL), "
                          f"got {d.eval_nll_steps}")
    if s.report_samples < 0:
        raise ConfigError(f"config: 'sample.report_samples' must be non-negative (0: none), got {s.report_samples}")
    if not 1 <= s.steps <= d.num_timesteps:
        raise ConfigError(f"config: 'sample.steps' must be in 1..{d.num_timesteps}, got {s.steps}")
    if s.eta < 0 or s.gamma_images <= 0 or s.second_last_sigma_pixels < 0:
        raise ConfigError(f"config: 'sample.eta' ({s.eta}) and 'sample.second_last_sigma_pixels' "
                          f"({s.second_last_sigma_pixels}) must be non-negative, 'sample.gamma_images' "
                          f"({s.gamma_images}) positive")
    if not 0.0 <= d.label_dropout < 1.0:
        raise ConfigError(f"config: 'diffusion.label_dropout' must be in [0, 1), got {d.label_dropout}")
    if d.label_dropout > 0 and num_classes == 0:
        raise ConfigError("config: 'diffusion.label_dropout' > 0 needs a class-conditional model "
                          "(model.num_classes > 0)")


def denoise(model: nn.Module, params, x, t, labels=None):
    """The network as the diffusion library calls it: `(params, x [B,H,W,C], t [B]) -> output`, no dropout."""
    return model.apply({"params": params}, x, t, labels=labels, train=False)


class DiffusionTask(TaskBase):
    """Denoising diffusion on images with the DDPM U-Net (`models.unet`)."""

    description = "a diffusion model of images (a U-Net denoiser)"
    commands = ("train_lib.diffusion.sample",)
    throughput_unit = "images"
    # XLA:CPU keeps YNNPACK for the matmuls only: the U-Net step is ~30% faster (train_lib.xla_flags).
    xla_cpu_flags = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}

    def __init__(self, config):
        super().__init__(config)
        self.dataset = dataset_name(config)
        self.data_path = config.data.path
        self.random_flip = config.data.random_flip
        self.image_shape = IMAGE_SHAPES[self.dataset]
        self.levels = LEVELS[self.dataset]
        self.unet_config = unet_config(config, self.image_shape)
        self.compute_dtype = self.unet_config.dtype
        self.model = unet_lib.UNet(self.unet_config)
        self.num_classes = self.unet_config.num_classes
        self.diffusion = d = config_lib.read_dataclass(DiffusionSettings, config.diffusion, "diffusion")
        self.sample_settings = config_lib.read_dataclass(SampleSettings, config.sample, "sample")
        validate_diffusion_config(d, self.sample_settings, self.num_classes)
        self.prediction, self.weighting = d.prediction, d.weighting
        self.schedule = schedules.make_schedule(d.schedule, d.num_timesteps)
        self.eval_schedule = schedules.respace(self.schedule, d.eval_nll_steps) if d.eval_nll_steps else None
        # One object for the library's static `model_fn` argument: every call shares its compilations.
        self.denoiser = functools.partial(denoise, self.model)

    @property
    def has_final_report(self) -> bool:
        return self.sample_settings.report_samples > 0

    @functools.cached_property
    def data(self) -> image_data.ImageDataset:
        """The train and test images, read on first use (restoring a checkpoint does not need them)."""
        try:
            return image_data.load_image_dataset(self.dataset, self.data_path or None)
        except ValueError as e:
            raise ConfigError(f"config: 'data.path': {e}") from None

    def labels_for_model(self, labels):
        """The labels the U-Net sees: None for an unconditional model."""
        return labels if self.num_classes > 0 else None

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        return {"images": jax.ShapeDtypeStruct((batch_size,) + self.image_shape, jnp.float32),
                "labels": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
                "index": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}

    def forward_flops(self, batch_size: int) -> float:
        """FLOPs of one U-Net evaluation on `batch_size` images (one sampling step). The training step's
        count is TaskBase's, 3× the loss's: the loss evaluates the U-Net once."""
        spec = self.batch_spec(batch_size)
        params = jax.eval_shape(self.init_params, jax.random.PRNGKey(0), spec)
        t = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
        labels = spec["labels"] if self.num_classes > 0 else None
        return flops.count_matmul_flops(lambda p, x, t, y: denoise(self.model, nn.unbox(p), x, t, y),
                                        params, spec["images"], t, labels)

    def init_params(self, rng: jax.Array, batch: dict[str, jax.Array]) -> Any:
        t = jnp.ones(batch["labels"].shape, jnp.int32)
        return self.model.init({"params": rng}, batch["images"], t, labels=self.labels_for_model(batch["labels"]),
                               train=False)["params"]

    def loss(self, params, batch, rng, *, train: bool = True):
        flip_rng, label_rng, loss_rng = jax.random.split(rng, 3)
        images, labels = batch["images"], batch["labels"]
        batch_size = images.shape[0]
        if train and self.random_flip:
            flip = jax.random.bernoulli(flip_rng, 0.5, (batch_size, 1, 1, 1))
            images = jnp.where(flip, images[:, :, ::-1], images)
        if train and self.num_classes > 0 and self.diffusion.label_dropout > 0:
            dropped = jax.random.bernoulli(label_rng, self.diffusion.label_dropout, (batch_size,))
            labels = jnp.where(dropped, self.num_classes, labels)
        apply_fn = functools.partial(self.model.apply, train=train)
        per_example = training.diffusion_loss(apply_fn, {"params": params}, images, loss_rng, schedule=self.schedule,
                                              prediction=self.prediction, weighting=self.weighting,
                                              labels=self.labels_for_model(labels))
        return jnp.mean(per_example), {}

    def eval_key(self, images: jax.Array) -> jax.Array:
        """A key that depends only on the batch's contents (and the seed): evaluation is repeatable."""
        levels = jnp.round((images + 1.0) * (self.levels - 1) / 2.0).astype(jnp.uint32).reshape(images.shape[0], -1)
        weights = jnp.arange(1, levels.shape[1] + 1, dtype=jnp.uint32)
        rows = jnp.arange(1, levels.shape[0] + 1, dtype=jnp.uint32)[:, None]
        digest = jnp.sum(levels * weights * rows, dtype=jnp.uint32)
        return jax.random.fold_in(jax.random.PRNGKey(self.seed), digest)

    def eval_sums(self, params, batch):
        images, labels = batch["images"], self.labels_for_model(batch["labels"])
        loss_rng, nll_rng = jax.random.split(self.eval_key(images))
        apply_fn = functools.partial(self.model.apply, train=False)
        per_example = training.diffusion_loss(apply_fn, {"params": params}, images, loss_rng, schedule=self.schedule,
                                              prediction=self.prediction, weighting=self.weighting, labels=labels)
        sums = {"loss": jnp.sum(per_example), "count": jnp.asarray(images.shape[0], jnp.float32)}
        if self.eval_schedule is not None:
            nll = likelihood.nll_bits_per_dim(self.denoiser, params, images, nll_rng, schedule=self.eval_schedule,
                                              method=self.diffusion.eval_nll_method, labels=labels,
                                              levels=self.levels, prediction=self.prediction)
            sums.update({f"bpd_{k}": jnp.sum(nll[k]) for k in ("total", "prior", "diffusion", "reconstruction")})
        return sums

    def summarize_eval(self, sums: dict[str, float]) -> dict[str, float]:
        results = {"loss": sums["loss"] / sums["count"]}
        if "bpd_total" in sums:
            k = self.diffusion.eval_nll_steps
            results[f"bits_per_dim_k{k}"] = sums["bpd_total"] / sums["count"]
            for term in ("prior", "diffusion", "reconstruction"):
                results[f"bits_per_dim_k{k}_{term}"] = sums[f"bpd_{term}"] / sums["count"]
        return results

    def datasets(self, rows: tuple[int, int]):
        """(train: shuffled with `seed`, reshuffled every epoch, repeated; eval: the test split in order)."""
        data, batch = self.data, self.batch_size
        train, evaluation, num_eval = image_data.pipelines(data, batch_size=batch, eval_batches=self.eval_batches,
                                                           seed=self.seed, rows=rows)
        description = (f"{data.name}: {len(data.train_images)} train, {len(data.test_images)} test images "
                       f"{'×'.join(map(str, data.image_shape))}, {data.levels} levels; evaluating on "
                       f"{num_eval * batch} test images")
        return train, evaluation, {"data": description, "data_fingerprint": image_data.fingerprint(data),
                                   "train_images": len(data.train_images), "test_images": len(data.test_images)}

    def sample_labels(self, num: int, class_label: int | None = None) -> jax.Array | None:
        """Labels for `num` samples: None (unconditional model), all `class_label`, or 0, 1, …, cycling."""
        if self.num_classes == 0:
            return None
        if class_label is not None:
            return jnp.full((num,), class_label, jnp.int32)
        return jnp.arange(num, dtype=jnp.int32) % self.num_classes

    def benchmark_extras(self, params, *, peak_flops: float, repeats: int, sample_steps: int,
                         sample_batch: int) -> dict[str, Any]:
        """The sampler step: one U-Net evaluation on `sample_batch` images inside the jitted `lax.scan`
        sampler (DDPM σ² = β̃, `sample_steps` steps, median over max(3, repeats // 2) runs)."""
        import time

        if sample_steps <= 0:
            return {}
        schedule = schedules.respace(self.schedule, sample_steps, "even")
        shape = (sample_batch,) + self.image_shape
        labels = self.sample_labels(sample_batch)

        def run(seed):
            return samplers.sample(self.denoiser, params, jax.random.PRNGKey(seed), schedule=schedule, shape=shape,
                                   method="ddpm_beta_tilde", labels=labels, prediction=self.prediction, clip_x0=True)

        jax.block_until_ready(run(0))
        times = []
        for i in range(max(3, repeats // 2)):
            start = time.perf_counter()
            jax.block_until_ready(run(i + 1))
            times.append((time.perf_counter() - start) / sample_steps)
        step_s = float(np.median(times))
        return {"sample_batch_size": sample_batch, "sample_step_ms": 1e3 * step_s,
                "sample_images_per_sec": sample_batch / step_s,
                "sample_mfu": flops.mfu(self.forward_flops(sample_batch), step_s, peak_flops)}

    def benchmark_rows(self, result: dict[str, Any]) -> list[tuple[str, str]]:
        if "sample_step_ms" not in result:
            return []
        return [("sampler step", f"{result['sample_step_ms']:.1f} ms for {result['sample_batch_size']} images "
                                 f"({result['sample_images_per_sec']:,.0f} images/s, "
                                 f"MFU {100 * result['sample_mfu']:.1f}%)")]

    def final_report(self, params) -> str:
        """`sample.report_samples` DDIM samples (sample.steps steps, η = 0), drawn as text for digits."""
        s = self.sample_settings
        shown = s.report_samples
        if shown <= 0:
            return ""
        schedule = schedules.respace(self.schedule, s.steps, s.spacing)
        images = samplers.sample(self.denoiser, params, jax.random.PRNGKey(self.seed), schedule=schedule,
                                 shape=(shown,) + self.image_shape, method="ddim", eta=0.0,
                                 labels=self.sample_labels(shown), prediction=self.prediction, clip_x0=s.clip_x0,
                                 eps_from_clipped_x0=s.eps_from_clipped_x0)
        images = np.asarray(jax.device_get(images))
        header = f"{shown} samples (DDIM η=0, {s.steps} steps{', classes 0-9' if self.num_classes else ''})"
        if self.dataset != "digits":
            return (f"{header}: pixel mean {images.mean():.3f}, std {images.std():.3f}. Grids and FCD/NLL tables: "
                    "python -m train_lib.diffusion.sample --workdir=<workdir>")
        return f"{header}:\n{image_data.ascii_digits(images, self.levels)}"
