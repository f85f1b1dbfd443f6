"""Gaussian diffusion: schedules, the generalised sampler, exact NLL and the training loss.

Pure functions over a `Schedule` pytree; the network is any `model_fn(params, x, t, labels=...)`
(e.g. `functools.partial(models.unet.UNet(...).apply, train=False)`).

- `schedules`: β/ᾱ schedules by name and respacing to a K-step sub-sequence.
- `prediction`: ε-, x₀- and v-prediction, converted to (ε̂, x̂₀) in one place.
- `samplers`: DDPM (σ² = β or β̃), DDIM(η), Analytic-DPM/DDIM, DDIM encoding, the Γ estimator.
- `likelihood`: the KL decomposition of the NLL in bits/dim with a discretised Gaussian decoder.
- `training`: the denoising loss with "simple" or "elbo" weighting.
"""
