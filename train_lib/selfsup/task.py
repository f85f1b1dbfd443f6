"""The 'siamese' task: SimSiam and BYOL on images, trained and evaluated by the generic trainer.

Implements `train_lib.task.Task` with `models.siamese` and `losses.simsiam_loss`:

- batches are {"images": `[B, H, W, C]` in [−1, 1], "labels": `[B]` (unused in training), "index": `[B]` the
  example's index in its split}; `data.dataset` is 'digits' (scikit-learn's 8×8 digits, the diffusion
  family's fixed 1,437 / 360 split, `train_lib.image_data`);
- each step draws two views of every image (`train_lib.selfsup.augment`, from the step key and the index) and
  minimises ½D(p₁, z₂′) + ½D(p₂, z₁′), D the negative cosine, p the online predictor's output and z′ the
  targets: the online projections themselves (`siamese.target_decay` = 0, SimSiam) or those of an EMA copy of
  the online network (τ = `target_decay` > 0, BYOL), under a stop-gradient unless `siamese.stop_gradient` is
  False (SimSiam's collapsing ablation; refused with an EMA target, which is never trained);
- `model.predictor`: 'mlp' (learnt), 'none' (p = z) or 'closed_form' (the ridge-regression map from z to z′
  solved on each batch, `models.siamese.closed_form_predictor`, ridge `siamese.closed_form_ridge`);
- the collapse diagnostics are metrics of every logged step and every evaluation: `output_std` (std of the
  ℓ2-normalised z over the batch, averaged over dimensions; 1/√d is logged at the start as `output_std_healthy`),
  `output_rank` and `representation_rank` (effective ranks of z and of the encoder output h);
- evaluation on the test split reports the loss and the diagnostics (means over the eval batches, views from a
  fixed key), and the final report the linear-probe and k-NN test accuracies of the encoder's
  representation (`train_lib.selfsup.probe`, also a CLI for any checkpoint).

The EMA target lives in the parameters (`params['target']`, checkpointed and sharded like the online network)
and receives zero gradients; `post_update` replaces it after each optimizer step by
τ·target + (1 − τ)·online (BYOL, arXiv 2006.07733, Eq. 1), so the optimizer's weight decay never touches it.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import losses
from models import siamese
from train_lib import config_lib, image_data
from train_lib.config_lib import ConfigError
from train_lib.selfsup import augment as augment_lib
from train_lib.task import TaskBase

IMAGE_SHAPES = {"digits": (8, 8, 1)}


@dataclasses.dataclass(frozen=True)
class SiameseSettings:
    """`config.siamese`: what makes SimSiam, BYOL or an ablation of them."""

    stop_gradient: bool
    target_decay: float  # τ of the EMA target; 0: the online network is its own target
    closed_form_ridge: float  # λ of model.predictor='closed_form'


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
    """`config.probe`: the end-of-run evaluation of the representation."""

    knn_k: int
    final_report: bool  # probe and k-NN at the end of training


class SiameseTask(TaskBase):
    """SimSiam / BYOL (`models.siamese.SiameseNetwork`) with the symmetric negative-cosine loss."""

    description = "a self-supervised image encoder (SimSiam/BYOL)"
    commands = ("train_lib.selfsup.probe",)
    throughput_unit = "images"
    loss_is_example_mean = False  # batch normalisation and the closed-form predictor couple a batch's examples

    def __init__(self, config):
        super().__init__(config)
        self.dataset = config_lib.typed(config, "data.dataset", str)
        if self.dataset not in IMAGE_SHAPES:
            raise ConfigError(f"config: 'data.dataset' is {self.dataset!r}; expected one of {sorted(IMAGE_SHAPES)}")
        self.image_shape = IMAGE_SHAPES[self.dataset]
        self.augment = config_lib.read_typed_dataclass(augment_lib.AugmentSettings, config.augment, "augment")
        try:
            self.model_config = siamese.SiameseConfig(**config_lib.dataclass_values(siamese.SiameseConfig,
                                                                                   config.model))
            self.model_config.validate()
            self.augment.validate(self.image_shape)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config: {e}") from None
        self.settings = s = config_lib.read_typed_dataclass(SiameseSettings, config.siamese, "siamese")
        self.probe = config_lib.read_typed_dataclass(ProbeSettings, config.probe, "probe")
        if not 0.0 <= s.target_decay < 1.0:
            raise ConfigError(f"config: 'siamese.target_decay' must be in [0, 1) (0: no EMA target, SimSiam), "
                              f"got {s.target_decay}")
        if s.target_decay > 0 and not s.stop_gradient:
            raise ConfigError("config: 'siamese.stop_gradient'=False needs siamese.target_decay=0: an EMA target "
                              "is never trained, so no gradient can flow into it")
        if s.closed_form_ridge <= 0:
            raise ConfigError(f"config: 'siamese.closed_form_ridge' must be positive, got {s.closed_form_ridge}")
        if self.probe.knn_k < 1:
            raise ConfigError(f"config: 'probe.knn_k' must be a positive integer, got {self.probe.knn_k}")
        self.model = siamese.SiameseNetwork(self.model_config)
        self.has_target = s.target_decay > 0
        self.has_final_report = self.probe.final_report

    @functools.cached_property
    def data(self) -> image_data.ImageDataset:
        return image_data.load_image_dataset(self.dataset)

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        return {"images": jax.ShapeDtypeStruct((batch_size,) + self.image_shape, jnp.float32),
                "labels": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
                "index": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}

    def init_params(self, rng: jax.Array, batch) -> Any:
        online = self.model.init(rng, batch["images"])["params"]
        if not self.has_target:
            return {"online": online}
        return {"online": online, "target": jax.tree.map(jnp.copy, online)}  # BYOL starts the target equal

    def post_update(self, before: Any, after: Any, step: jax.Array) -> Any:
        """The EMA target τ·target + (1 − τ)·online, from the target before the step and the online network
        after it."""
        del step
        if not self.has_target:
            return after
        tau = self.settings.target_decay
        target = jax.tree.map(lambda t, o: tau * t + (1.0 - tau) * o, before["target"], after["online"])
        return {**after, "target": target}

    def _forward(self, params, batch, key):
        """(loss per example, metrics) of the two views drawn from `key`."""
        images, index = batch["images"], batch["index"]
        key_1, key_2 = jax.random.split(key)
        x1 = augment_lib.augment_batch(key_1, images, index, self.augment)
        x2 = augment_lib.augment_batch(key_2, images, index, self.augment)
        online = {"params": params["online"]}
        h1, z1, p1 = self.model.apply(online, x1)
        _, z2, p2 = self.model.apply(online, x2)
        if self.has_target:
            target = {"params": jax.lax.stop_gradient(params["target"])}
            t1, t2 = self.model.apply(target, x1)[1], self.model.apply(target, x2)[1]
        else:
            t1, t2 = z1, z2
        predictor = self.model_config.predictor
        if predictor == "none":
            p1, p2 = z1, z2
        elif predictor == "closed_form":
            w = siamese.closed_form_predictor(jnp.concatenate([z1, z2]), jnp.concatenate([t2, t1]),
                                              ridge=self.settings.closed_form_ridge)
            p1, p2 = siamese.l2_normalize(z1) @ w, siamese.l2_normalize(z2) @ w
        per_example = losses.simsiam_loss(p1, p2, t1, t2, stop_gradient=self.settings.stop_gradient)
        metrics = {"output_std": siamese.normalized_std(z1), "output_rank": siamese.effective_rank(z1),
                   "representation_rank": siamese.effective_rank(h1)}
        return per_example, jax.lax.stop_gradient(metrics)

    def loss(self, params, batch, rng, *, train: bool = True):
        del train
        per_example, metrics = self._forward(params, batch, rng)
        return jnp.mean(per_example), metrics

    def eval_sums(self, params, batch):
        per_example, metrics = self._forward(params, batch, jax.random.PRNGKey(self.seed))
        count = jnp.asarray(per_example.shape[0], jnp.float32)
        return {"loss": jnp.sum(per_example), **{k: v * count for k, v in metrics.items()}, "count": count}

    def datasets(self, rows: tuple[int, int]):
        """(train: shuffled with `seed`, reshuffled every epoch, repeated; eval: the test split in order)."""
        data, batch = self.data, self.batch_size
        train, evaluation, num_eval = image_data.pipelines(data, batch_size=batch, eval_batches=self.eval_batches,
                                                           seed=self.seed, rows=rows)
        d = self.model_config.projection_dim
        description = (f"{data.name}: {len(data.train_images)} train, {len(data.test_images)} test images, two views "
                       f"each; evaluating on {num_eval * batch} test images")
        return train, evaluation, {"data": description, "output_std_healthy": 1.0 / float(np.sqrt(d))}

    def final_report(self, params) -> str:
        """Linear-probe and k-NN test accuracy of the encoder's representation (`train_lib.selfsup.probe`)."""
        from train_lib.selfsup import probe

        return probe.format_results(probe.evaluate(self, params))
