"""Slow: a small U-Net trained briefly on digits, scored with every piece of the library.

Checks the Analytic-DPM claim on a real (if small) model: with Γ estimated from training data, the
K-step NLL bound of Analytic-DDPM is below DDPM's β̃ and β at K = 10 (Bao et al., arXiv 2201.06503,
Table 1), and samples are far closer to the test digits than noise is. About 5 minutes on 2 busy CPU
cores; one run gave 4.83 (Analytic-DDPM), 5.41 (β), 259 (β̃) bits/dim, FCD 17.4 (floor 2.0, noise 508).

The train step is a jitted Python loop, not a `lax.scan`: XLA:CPU runs convolution gradients inside a
while loop ~20× slower than the same step at top level.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from models import unet
from models.diffusion import likelihood, samplers, schedules, training
from train_lib import image_data
from train_lib import sample_quality

CONFIG = dict(base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(4,), dropout=0.0,
              num_groups=8)
TRAIN_STEPS = 1500


@pytest.mark.slow
def test_trained_digits_model_end_to_end(tmp_path):
    data = image_data.load_digits()
    model = unet.build_unet(CONFIG)
    full = schedules.make_schedule("linear", 1000)
    rng = jax.random.PRNGKey(0)
    variables = nn.meta.unbox(jax.jit(lambda k: model.init({"params": k}, data.train_images[:2],
                                                           jnp.ones((2,), jnp.int32), train=False))(rng))
    tx = optax.adam(1e-3)
    train_apply = functools.partial(model.apply, train=True)

    images = jnp.asarray(data.train_images)

    @jax.jit
    def train_step(state, key):
        params, opt_state = state
        k_batch, k_loss = jax.random.split(key)
        batch = images[jax.random.randint(k_batch, (64,), 0, images.shape[0])]
        grads = jax.grad(lambda p: jnp.mean(training.diffusion_loss(train_apply, p, batch, k_loss, schedule=full)))(
            params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    state = (variables, tx.init(variables))
    for i in range(TRAIN_STEPS):
        state = train_step(state, jax.random.fold_in(rng, i))
    params = state[0]

    eval_fn = functools.partial(model.apply, train=False)
    k10 = schedules.respace(full, 10)
    batches = np.asarray(data.train_images[:1024]).reshape(4, 256, 8, 8, 1)
    gamma = samplers.estimate_gamma(eval_fn, params, iter(batches), jax.random.PRNGKey(1), schedule=k10)
    assert np.all(gamma > 0) and np.all(gamma < 1.2)
    nll = {m: float(np.mean(likelihood.nll_bits_per_dim(eval_fn, params, data.test_images[:256], jax.random.PRNGKey(2),
                                                        schedule=k10, method=m, gamma=gamma, levels=17)["total"]))
           for m in ("analytic_ddpm", "ddpm_beta_tilde", "ddpm_beta")}
    assert nll["analytic_ddpm"] < nll["ddpm_beta_tilde"] and nll["analytic_ddpm"] < nll["ddpm_beta"], nll

    k50 = schedules.respace(full, 50)
    gamma50 = samplers.estimate_gamma(eval_fn, params, iter(batches), jax.random.PRNGKey(3), schedule=k50)
    samples = samplers.sample(eval_fn, params, jax.random.PRNGKey(4), schedule=k50, shape=(360, 8, 8, 1),
                              method="analytic_ddpm", gamma=gamma50, clip_x0=True)
    sample_quality.save_image_grid(samples[:64], str(tmp_path / "samples.png"), scale=4)
    quality = sample_quality.digits_sample_quality(str(tmp_path / "cache"))
    noise = np.random.default_rng(0).uniform(-1, 1, (360, 8, 8, 1))
    scores = quality.evaluate(samples)
    print(f"NLL bits/dim at K=10: {nll}; sample quality at K=50: {scores}")  # shown with `pytest -s`
    assert scores["fcd"] < 0.25 * quality.evaluate(noise)["fcd"], scores
