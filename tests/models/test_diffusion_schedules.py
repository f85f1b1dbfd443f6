"""Schedules against float64 NumPy written from the papers' definitions, independently of the module."""
import numpy as np
import pytest

from models.diffusion import schedules

T = 1000


def _cumprod_loop(alphas):
    out, acc = [], 1.0
    for a in alphas:
        acc *= a
        out.append(acc)
    return np.array(out)


def test_linear_alpha_bar_matches_ho():
    betas = [1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)]
    expected = _cumprod_loop([1.0 - b for b in betas])
    np.testing.assert_allclose(schedules.make_schedule("linear", T).alpha_bar, expected, rtol=2e-6)


def test_cosine_alpha_bar_is_f_over_f0_and_beta_is_clipped():
    s = schedules.make_schedule("cosine", T)
    t = np.arange(1, T + 1)
    f = lambda u: np.cos((u / T + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    unclipped = slice(0, T - 5)  # β hits 0.999 only in the last few steps
    np.testing.assert_allclose(s.alpha_bar[unclipped], (f(t) / f(0))[unclipped], rtol=1e-5, atol=1e-7)
    assert np.max(s.beta) == pytest.approx(0.999, rel=1e-6)
    assert np.all(np.asarray(s.beta) <= 0.999 + 1e-7)


def test_kexue_linear_matches_post_9119_notation():
    # Post 9119 (Su's notation): α_t = sqrt(1 - 0.02 t / T), ᾱ_t = Π α_s; Ho's ᾱ is its square.
    alpha_su = np.sqrt(1.0 - 0.02 * np.arange(1, T + 1) / T)
    bar_alpha_su = np.cumprod(alpha_su)
    np.testing.assert_allclose(schedules.make_schedule("kexue_linear", T).alpha_bar, bar_alpha_su**2, rtol=2e-6)


def _bayes_posterior(ab, abp):
    """q(x_{t-1}|x_t, x0) by completing the square: precision = α/β + 1/(1-ᾱ')."""
    alpha = ab / abp
    beta = 1.0 - alpha
    var = 1.0 / (alpha / beta + 1.0 / (1.0 - abp))
    return var * np.sqrt(abp) / (1.0 - abp), var * np.sqrt(alpha) / beta, var


@pytest.mark.parametrize("name", sorted(schedules.BETA_SCHEDULES))
@pytest.mark.parametrize("num_steps,spacing", [(T, "even"), (10, "even"), (25, "quadratic")])
def test_posterior_coefficients_match_bayes_rule(name, num_steps, spacing):
    s = schedules.respace(schedules.make_schedule(name, T), num_steps, spacing)
    full = np.cumprod(1.0 - schedules.BETA_SCHEDULES[name](T))
    steps = np.asarray(s.timesteps)
    ab = full[steps - 1]
    abp = np.concatenate([[1.0], ab[:-1]])
    np.testing.assert_allclose(s.alpha_bar, ab, rtol=1e-6)
    np.testing.assert_allclose(s.alpha, ab / abp, rtol=1e-6)
    c0, ct, var = _bayes_posterior(ab[1:], abp[1:])
    np.testing.assert_allclose(s.posterior_mean_coef_x0[1:], c0, rtol=1e-5)
    np.testing.assert_allclose(s.posterior_mean_coef_xt[1:], ct, rtol=1e-5)
    np.testing.assert_allclose(s.beta_tilde[1:], var, rtol=1e-5)
    # At the first step x0 is the target itself: the posterior is a point mass at x0.
    assert float(s.posterior_mean_coef_x0[0]) == pytest.approx(1.0, abs=1e-6)
    assert float(s.posterior_mean_coef_xt[0]) == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(s.snr, ab / (1.0 - ab), rtol=1e-5)
    beta_tilde_2 = (1.0 - full[1] / full[0]) * (1.0 - full[0]) / (1.0 - full[1])
    np.testing.assert_allclose(s.log_beta_tilde_clipped[0], np.log(beta_tilde_2), rtol=1e-5)
    np.testing.assert_allclose(s.log_beta_tilde_clipped[1:], np.log(var), rtol=1e-4, atol=1e-5)


def test_respaced_steps_compose_to_the_full_process():
    s = schedules.respace(schedules.make_schedule("linear", T), 17, "quadratic")
    # The product of the respaced step α's is ᾱ at the last step: the marginals are unchanged.
    assert float(np.prod(np.asarray(s.alpha, np.float64))) == pytest.approx(float(s.alpha_bar[-1]), rel=1e-4)


def test_spacings():
    even = schedules.even_timesteps(T, 10)
    assert even[0] == 1 and even[-1] == T and len(set(even)) == 10
    np.testing.assert_array_equal(schedules.even_timesteps(T, T), np.arange(1, T + 1))
    quad = schedules.quadratic_timesteps(T, 50)
    assert quad[0] == 1 and quad[-1] == T and np.all(np.diff(quad) > 0)
    assert np.diff(quad)[0] < np.diff(quad)[-1]  # dense near t = 1
    np.testing.assert_array_equal(schedules.quadratic_timesteps(T, T), np.arange(1, T + 1))
    np.testing.assert_array_equal(schedules.respace(schedules.make_schedule("linear", T), T).timesteps,
                                  np.arange(1, T + 1))


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="Unknown noise schedule"):
        schedules.make_schedule("sigmoid", T)
    with pytest.raises(ValueError, match="num_steps"):
        schedules.respace(schedules.make_schedule("linear", 10), 11)
    with pytest.raises(ValueError, match="spacing"):
        schedules.respace(schedules.make_schedule("linear", 10), 5, "log")
    with pytest.raises(ValueError, match="increase strictly"):
        schedules.schedule_at("linear", 10, [1, 3, 3])
