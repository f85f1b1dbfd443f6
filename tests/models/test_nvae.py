"""models.nvae: Gaussian KLs, the discretised logistic mixture and power iteration against float64 NumPy/SciPy;
the model's outputs against the analytic KL, its parameterisations, batch statistics and sampling."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from scipy import special, stats

from models import nvae

TINY = dict(channels=8, latent_channels=4, num_mixtures=2, decoder_expansion=2)
LEVELS = 17
X = jnp.asarray(-1.0 + 2.0 * np.random.default_rng(0).integers(0, LEVELS, (6, 8, 8, 1)) / (LEVELS - 1), jnp.float32)


def _compile(fn, *args):
    # Optimisation level 0 compiles these small graphs several times faster.
    return jax.jit(fn).lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})


def _init(model, x=X):
    init = lambda k: nn.meta.unbox(model.init({"params": k, "sample": k}, x, train=False))  # noqa: E731
    key = jax.random.PRNGKey(0)
    return _compile(init, key)(key)


def _numpy_variables(model, seed=0):
    """Variables of the init's shapes drawn in NumPy as the initialisers draw them (kernels N(0, 1/fan_in),
    norms' and weight norms' scales 1, biases 0): unlike `init`, nothing to compile."""
    shapes = jax.eval_shape(lambda k: nn.meta.unbox(model.init({"params": k, "sample": k}, X, train=False)),
                            jax.random.PRNGKey(0))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name in ("g", "scale", "var"):
            return np.ones(leaf.shape, np.float32)
        if name in ("bias", "mean"):
            return np.zeros(leaf.shape, np.float32)
        fan_in = int(np.prod(leaf.shape[:-1])) if name != "h0" else 1
        return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def tiny():
    model = nvae.NVAE(nvae.NVAEConfig(**TINY))
    return model, _init(model)


# ------------------------------------------------------------------------------------------------ formulas


def test_normal_kl_residual_kl_and_log_prob_match_float64():
    rng = np.random.default_rng(1)
    mq, mp, lq, lp, z = rng.normal(size=(5, 50))
    want = lp - lq + (np.exp(2 * lq) + (mq - mp) ** 2) / (2 * np.exp(2 * lp)) - 0.5
    np.testing.assert_allclose(nvae.normal_kl(mq, lq, mp, lp), want, rtol=1e-5, atol=1e-6)
    dmu, ldsig = mq - mp, lq - lp
    eq2 = 0.5 * (dmu**2 / np.exp(2 * lp) + np.exp(2 * ldsig) - 1) - ldsig  # NVAE Eq. 2
    np.testing.assert_allclose(nvae.residual_normal_kl(dmu, ldsig, lp), eq2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(nvae.residual_normal_kl(dmu, ldsig, lp),
                               nvae.normal_kl(mp + dmu, lp + ldsig, mp, lp), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(nvae.normal_log_prob(z, mq, lq), stats.norm(mq, np.exp(lq)).logpdf(z), rtol=1e-5)
    # q = p to 1e-4 in log σ: the KL is ½Δμ²/σ² + O(1e-8), not lost to rounding of σ.
    assert float(nvae.residual_normal_kl(0.0, 1e-4, 0.0)) == pytest.approx(1e-8, rel=1e-3)


def _dmol_reference(x, logits, means, log_scales, levels):
    """float64 log P(x) from the logistic CDF, each bin as σ(a) − σ(b) or σ(−b) − σ(−a), whichever is smaller
    (no cancellation), the edge bins open."""
    h = 1.0 / (levels - 1)
    x = x[..., None]
    s = np.exp(log_scales)
    a = np.where(x > 1 - h, np.inf, (x + h - means) / s)
    b = np.where(x < -1 + h, -np.inf, (x - h - means) / s)
    mass = np.where(b > 0, special.expit(-b) - special.expit(-a), special.expit(a) - special.expit(b))
    with np.errstate(divide="ignore"):  # bins whose mass underflows float64 (the test masks them)
        return np.log(np.sum(special.softmax(logits, axis=-1) * mass, axis=-1))


@pytest.mark.parametrize("levels", [17, 256])
def test_discretized_logistic_mixture_sums_to_one_and_matches_float64(levels):
    rng = np.random.default_rng(levels)
    k, n = 3, 40
    logits, means = rng.normal(0, 2, (n, k)), rng.uniform(-1.3, 1.3, (n, k))
    log_scales = rng.uniform(-7, 1, (n, k))
    log_scales[:4] = -7.0  # very narrow components: far bins hold e^-1000-scale mass
    grid = -1.0 + 2.0 * np.arange(levels) / (levels - 1)
    xs = np.broadcast_to(grid[:, None], (levels, n))
    args = (logits[None], means[None], log_scales[None])
    log_prob = jax.jit(functools.partial(nvae.discretized_logistic_mixture_log_prob, levels=levels))
    got = log_prob(jnp.asarray(xs, jnp.float32), *(jnp.asarray(a, jnp.float32) for a in args))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(np.sum(np.exp(np.asarray(got, np.float64)), axis=0), 1.0, atol=1e-5)
    want = _dmol_reference(xs, *args, levels)
    mask = want > -700  # where float64 itself has the mass
    np.testing.assert_allclose(np.asarray(got)[mask], want[mask], rtol=2e-5, atol=2e-4)
    with jax.enable_x64(True):
        got64 = np.asarray(log_prob(xs, *args))
    np.testing.assert_allclose(np.sum(np.exp(got64), axis=0), 1.0, atol=1e-12)
    np.testing.assert_allclose(got64[mask], want[mask], rtol=1e-10, atol=1e-9)
    assert 0.5 < mask.mean() < 1.0  # both bins float64 resolves and far-tail bins it cannot (still finite here)
    grad = jax.jit(jax.grad(lambda ls: jnp.sum(log_prob(jnp.asarray(xs, jnp.float32), args[0], args[1], ls))))(
        jnp.asarray(args[2], jnp.float32))
    assert np.all(np.isfinite(grad))


def test_discretized_logistic_mixture_sample_and_mode_follow_the_probabilities():
    logits, means, log_scales = (jnp.array(a, jnp.float32) for a in ([0.5, -0.3, 0.0], [-0.9, 0.2, 0.95],
                                                                       [-2.5, -1.5, -3.0]))
    grid = -1.0 + 2.0 * np.arange(LEVELS) / (LEVELS - 1)
    probs = np.exp(_dmol_reference(grid, *(np.asarray(a, np.float64) for a in (logits, means, log_scales)), LEVELS))
    n = 40_000
    tile = lambda a: jnp.broadcast_to(a, (n, 3))  # noqa: E731
    draws = nvae.discretized_logistic_mixture_sample(jax.random.PRNGKey(0), tile(logits), tile(means),
                                                     tile(log_scales), levels=LEVELS)
    assert set(np.unique(np.asarray(draws))) <= set(grid.astype(np.float32))
    freq = np.array([np.mean(np.asarray(draws) == np.float32(v)) for v in grid])
    np.testing.assert_allclose(freq, probs, atol=4 * np.sqrt(0.25 / n))  # 4 standard errors
    mode = nvae.discretized_logistic_mixture_mode(logits, means, log_scales, levels=LEVELS)
    assert float(mode) == pytest.approx(grid[np.argmax(probs)])


def _kernel_matrix(kernel):
    return np.moveaxis(np.asarray(kernel, np.float64), -1, 0).reshape(kernel.shape[-1], -1)


def test_power_iteration_matches_svd_and_its_gradient_is_u_v():
    rng = np.random.default_rng(2)
    v, g = rng.normal(size=(3, 3, 4, 6)), rng.uniform(0.5, 2.0, 6)
    params = {"plain": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 4, 6)), jnp.float32)},
              "depthwise": {"kernel": jnp.asarray(rng.normal(size=(5, 5, 1, 12)), jnp.float32)},
              "wn": {"v": jnp.asarray(v, jnp.float32), "g": jnp.asarray(g, jnp.float32)},
              "se": {"kernel": jnp.ones((6, 4)), "bias": jnp.zeros(4)}}  # a dense kernel: not a conv
    effective = {"plain": params["plain"]["kernel"], "depthwise": params["depthwise"]["kernel"],
                 "wn": v * g / np.sqrt(np.sum(v**2, axis=(0, 1, 2)))}
    state = nvae.init_spectral_state(params, jax.random.PRNGKey(0))
    assert sorted(state) == sorted(effective)
    spectral_norms = jax.jit(nvae.spectral_norms, static_argnames="iterations")
    total, sigmas, new_state = spectral_norms(params, state, iterations=50)
    for name, kernel in effective.items():
        assert float(sigmas[name]) == pytest.approx(np.linalg.svd(_kernel_matrix(kernel))[1][0], rel=1e-4)
        assert float(jnp.linalg.norm(new_state[name])) == pytest.approx(1.0, abs=1e-5)
    assert float(total) == pytest.approx(sum(float(s) for s in sigmas.values()), rel=1e-6)
    # Persistent vectors: 25 steps, then 25 more from the returned state, are the 50 steps.
    _, _, half = spectral_norms(params, state, iterations=25)
    _, resumed, _ = spectral_norms(params, half, iterations=25)
    for name in effective:
        assert float(resumed[name]) == pytest.approx(float(sigmas[name]), rel=1e-6)
    # With u, v under stop_gradient, ∂σ/∂W = u₁v₁ᵀ (the derivative of the top singular value).
    plain_state = {"plain": state["plain"]}
    grad = jax.jit(jax.grad(lambda k: nvae.spectral_norms({"plain": {"kernel": k}}, plain_state, iterations=50)[0]))(
        params["plain"]["kernel"])
    u, _, vt = np.linalg.svd(_kernel_matrix(params["plain"]["kernel"]))
    np.testing.assert_allclose(_kernel_matrix(grad), np.outer(u[:, 0], vt[0]), atol=2e-4)


def test_power_iteration_matches_svd_on_an_nvae(tiny):
    _, variables = tiny
    params = variables["params"]
    kernels = {}  # the effective kernels in float64: g·v/‖v‖ per output channel, or the plain 4-d kernel
    flat = traverse_util.flatten_dict(params)
    for path, leaf in flat.items():
        parent, leaf = "/".join(path[:-1]), np.asarray(leaf, np.float64)
        if path[-1] == "v":
            g = np.asarray(flat[path[:-1] + ("g",)], np.float64)
            kernels[parent] = g * leaf / np.sqrt(np.sum(leaf**2, axis=(0, 1, 2)))
        elif path[-1] == "kernel" and leaf.ndim == 4:
            kernels[parent] = leaf
    assert {"encoder/stem", "decoder/output", "decoder/group_1/prior",
            "decoder/group_0/cell_0/depthwise"} <= set(kernels)
    state = nvae.init_spectral_state(params, jax.random.PRNGKey(1))
    assert sorted(state) == sorted(kernels)
    # At init the top singular values of the wide kernels (`[8, 9·32]`) lie within 0.5% of each other and
    # power iteration converges as (σ₂/σ₁)^2k, so a thousand steps here (in training the persistent u takes
    # one step per training step).
    _, sigmas, _ = _compile(lambda p, s: nvae.spectral_norms(p, s, iterations=1000), params, state)(params, state)
    for name, kernel in kernels.items():
        assert float(sigmas[name]) == pytest.approx(np.linalg.svd(_kernel_matrix(kernel))[1][0], rel=1e-4), name


# ------------------------------------------------------------------------------------------------- the model


def test_config_errors_name_the_key():
    cases = {"num_scales": dict(num_scales=4), "image_shape": dict(image_shape=(8, 8)),
             "bn_momentum": dict(bn_momentum=1.0), "levels": dict(levels=1), "dtype": dict(dtype="float8"),
             "residual_posterior": dict(residual_posterior=1), "channels": dict(channels=0)}
    for key, values in cases.items():
        with pytest.raises(ValueError, match=f"model.{key}"):
            nvae.NVAEConfig(**values).validate()
    with pytest.raises(ValueError, match="model.image_shape"):
        nvae.NVAEConfig().validate((16, 16, 1))
    with pytest.raises(ValueError, match="Unknown NVAE config keys"):
        nvae.NVAEConfig.from_dict({"chanels": 8})
    nvae.NVAEConfig(image_shape=(32, 32, 3), levels=256, num_preprocess=2, num_scales=3).validate((32, 32, 3))


@pytest.mark.parametrize("num_scales,groups", [(1, 1), (1, 4), (2, 1), (2, 2)])
def test_output_shapes_and_kl(num_scales, groups, tiny):
    config = nvae.NVAEConfig(**TINY, num_scales=num_scales, groups_per_scale=groups)
    model = nvae.NVAE(config)
    variables = tiny[1] if config == tiny[0].config else _numpy_variables(model)
    forward = lambda v, k: model.apply(v, X, train=False, rngs={"sample": k})  # noqa: E731
    out = _compile(forward, variables, jax.random.PRNGKey(0))(variables, jax.random.PRNGKey(0))
    batch, num_groups = X.shape[0], num_scales * groups
    means = out.pop("posterior_mean")
    assert {k: v.shape for k, v in out.items()} == {"log_px": (batch,), "kl": (batch, num_groups),
                                                   "log_q": (batch,), "log_p": (batch,)}
    assert [m.shape for m in means] == [(batch, d) for d in nvae.latent_dims_per_group(config)]
    assert np.all(np.asarray(out["kl"]) >= 0) and np.all(np.isfinite(out["log_px"] - out["kl"].sum(1)))
    assert np.all(np.asarray(out["log_px"]) < 0)
    assert len(nvae.latent_dims_per_group(config)) == num_groups


def test_sampled_log_densities_agree_with_the_analytic_kl(tiny):
    model, variables = tiny
    n = 512  # one image, n posterior draws (train=False: the rows are independent)
    x = jnp.broadcast_to(X[:1], (n,) + X.shape[1:])
    forward = lambda v, k: model.apply(v, x, train=False, rngs={"sample": k})  # noqa: E731
    out = _compile(forward, variables, jax.random.PRNGKey(3))(variables, jax.random.PRNGKey(3))
    kl = np.asarray(out["kl"], np.float64)
    assert np.ptp(kl[:, 0]) < 1e-3 * kl[0, 0]  # the top group's KL does not depend on z
    gap = np.asarray(out["log_q"] - out["log_p"], np.float64) - kl.sum(1)  # E[log q − log p | z_<i] = KL_i
    assert abs(gap.mean()) < 4 * gap.std() / np.sqrt(n)
    assert kl.sum(1).mean() > 10 * gap.std() / np.sqrt(n)  # the check has power: the KL is far from 0


def _posterior_is_bias(params, log_delta_sigma):
    """params whose every posterior conv outputs (0, log_delta_sigma): g = 0 zeroes the kernel."""
    def edit(path, leaf):
        names = [getattr(p, "key", None) for p in path]
        if "posterior" not in names:
            return leaf
        if names[-1] == "g":
            return jnp.zeros_like(leaf)
        half = leaf.shape[0] // 2
        return jnp.concatenate([jnp.zeros(half), jnp.full(half, log_delta_sigma)]) if names[-1] == "bias" else leaf
    return jax.tree_util.tree_map_with_path(edit, params)


def test_residual_and_direct_posteriors(tiny):
    _, variables = tiny
    c = 0.4
    params = _posterior_is_bias(variables["params"], c)
    c = float(nvae.soft_clamp(c))
    config = nvae.NVAEConfig(**TINY)
    dims = np.array(nvae.latent_dims_per_group(config))
    results = {}
    for residual in (True, False):
        model = nvae.NVAE(nvae.NVAEConfig(**TINY, residual_posterior=residual))
        run = lambda v, k, m=model: m.apply(v, X, train=False, rngs={"sample": k},  # noqa: E731
                                            capture_intermediates=lambda mdl, _: mdl.name == "prior")
        edited = {**variables, "params": params}
        results[residual] = _compile(run, edited, jax.random.PRNGKey(4))(edited, jax.random.PRNGKey(4))
    # Residual: q_i = N(μ_p, σ_p e^c), so KL_i = dims_i · (½(e^{2c} − 1) − c) whatever the prior.
    (out, _) = results[True]
    np.testing.assert_allclose(out["kl"], np.broadcast_to(dims * (0.5 * np.expm1(2 * c) - c), out["kl"].shape),
                               rtol=1e-5)
    # Direct: q_i = N(0, e^{2c}) against the prior read from its conv (the top group's prior is N(0, I) in both).
    out, state = results[False]
    np.testing.assert_allclose(out["kl"][:, 0], results[True][0]["kl"][:, 0], rtol=1e-5)
    for i in range(1, config.num_groups):
        prior = np.asarray(state["intermediates"]["decoder"][f"group_{i}"]["prior"]["__call__"][0], np.float64)
        mu_p, log_sigma_p = np.split(5 * np.tanh(prior / 5), 2, axis=-1)
        kl = log_sigma_p - c + (np.exp(2 * c) + mu_p**2) / (2 * np.exp(2 * log_sigma_p)) - 0.5
        np.testing.assert_allclose(out["kl"][:, i], kl.sum((1, 2, 3)), rtol=1e-4)
    assert float(jnp.min(jnp.abs(out["kl"][:, 1:] - results[True][0]["kl"][:, 1:]))) > 1e-2


def test_batch_stats_move_only_in_train_mode(tiny):
    model, variables = tiny
    key = jax.random.PRNGKey(5)

    def run(v, k, train):
        return model.apply(v, X, train=train, rngs={"sample": k}, mutable=["batch_stats", "intermediates"],
                           capture_intermediates=lambda mdl, _: mdl.name == "stem")[1]

    same = _compile(lambda v, k: run(v, k, False), variables, key)(variables, key)
    jax.tree.map(np.testing.assert_array_equal, same["batch_stats"], variables["batch_stats"])
    moved = _compile(lambda v, k: run(v, k, True), variables, key)(variables, key)
    stem = np.asarray(moved["intermediates"]["encoder"]["stem"]["__call__"][0], np.float64)
    norm = moved["batch_stats"]["encoder"]["pre_0_cell"]["norm_0"]
    # flax's convention, momentum 0.95: running = 0.95 · running + 0.05 · batch (from mean 0, var 1).
    np.testing.assert_allclose(norm["mean"], 0.05 * stem.mean((0, 1, 2)), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(norm["var"], 0.95 + 0.05 * stem.var((0, 1, 2)), rtol=1e-4)
    # Sampling in train mode readjusts the decoder's statistics and leaves the encoder's alone.
    sample = lambda v, k: model.apply(v, 16, train=True, method=nvae.NVAE.sample, rngs={"sample": k},  # noqa: E731
                                      mutable=["batch_stats"])[1]
    new, old = _compile(sample, variables, key)(variables, key)["batch_stats"], variables["batch_stats"]
    jax.tree.map(np.testing.assert_array_equal, new["encoder"], old["encoder"])
    assert not np.allclose(new["decoder"]["group_1"]["cell_0"]["norm_0"]["mean"],
                           old["decoder"]["group_1"]["cell_0"]["norm_0"]["mean"])


def test_sample_lies_on_the_grid_and_temperature_zero_is_deterministic(tiny):
    model, variables = tiny
    grid = set((-1.0 + 2.0 * np.arange(LEVELS) / (LEVELS - 1)).astype(np.float32))

    def compiled(pixels):
        fn = lambda v, k, t: model.apply(v, 8, method=nvae.NVAE.sample, temperature=t,  # noqa: E731
                                         pixels=pixels, rngs={"sample": k})
        compiled_fn = _compile(fn, variables, jax.random.PRNGKey(0), 1.0)
        return lambda seed, t: np.asarray(compiled_fn(variables, jax.random.PRNGKey(seed), t))

    draw, mode = compiled("sample"), compiled("mode")
    images = draw(0, 1.0)
    assert images.shape == (8, 8, 8, 1) and set(np.unique(images)) <= grid
    assert len(np.unique(images)) > 3
    # z = μ_p exactly at temperature 0, so the mode image does not depend on the key; at 1 it does.
    cold = [mode(seed, 0.0) for seed in (1, 2)]
    np.testing.assert_array_equal(cold[0], cold[1])
    assert set(np.unique(cold[0])) <= grid
    warm = [mode(seed, 1.0) for seed in (1, 2)]
    assert not np.array_equal(warm[0], warm[1])


def test_depthwise_conv_is_the_grouped_convolution():
    """The shifted-sum depthwise convolution equals lax's grouped one (feature_group_count = channels)."""
    rng = np.random.default_rng(0)
    x, kernel = rng.normal(size=(3, 4, 5, 6)).astype(np.float32), rng.normal(size=(5, 5, 1, 6)).astype(np.float32)
    expected = jax.lax.conv_general_dilated(x, kernel, (1, 1), [(2, 2)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            feature_group_count=6, precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(nvae.depthwise_conv(jnp.asarray(x), jnp.asarray(kernel)), expected, rtol=1e-5, atol=1e-5)
