"""Diffusion tests: every expectation comes from an independent float64 numpy computation."""

import math

import jax

jax.config.update("jax_default_matmul_precision", "highest")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from dydit_jax.diffusion import (  # noqa: E402
    GaussianDiffusion,
    check_sampler,
    classifier_free_guidance,
    create_diffusion,
    discretized_gaussian_log_likelihood,
    guidance_steps,
    mean_flat,
    normal_kl,
    parse_cfg_interval,
    sample_loop,
    space_timesteps,
)

LN2 = math.log(2.0)


# ----------------------------------------------------------------------------- numpy references
def np_abar(t_total: int = 1000) -> np.ndarray:
    return np.cumprod(1.0 - np.linspace(1e-4, 0.02, t_total, dtype=np.float64))


def np_tables(betas: np.ndarray) -> dict[str, np.ndarray]:
    """Textbook DDPM quantities, written out independently of the module."""
    abar = np.cumprod(1.0 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    clipped = post_var.copy()
    clipped[0] = post_var[1]
    return {
        "betas": betas,
        "abar": abar,
        "abar_prev": abar_prev,
        "post_var": post_var,
        "post_logvar": np.log(clipped),
        "c1": np.sqrt(abar_prev) * betas / (1.0 - abar),
        "c2": np.sqrt(1.0 - betas) * (1.0 - abar_prev) / (1.0 - abar),
    }


def bcast(v: np.ndarray) -> np.ndarray:
    return v[:, None, None, None]


def np_cdf(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def np_disc_loglik(x: np.ndarray, mean: np.ndarray, log_scale: np.ndarray) -> np.ndarray:
    sd = np.exp(log_scale)
    upper = np_cdf((x - mean + 1.0 / 255.0) / sd)
    lower = np_cdf((x - mean - 1.0 / 255.0) / sd)
    mid = np.log(np.maximum(upper - lower, 1e-12))
    low_edge = np.log(np.maximum(upper, 1e-12))
    high_edge = np.log(np.maximum(1.0 - lower, 1e-12))
    out = mid.copy()
    out[x < -0.999] = low_edge[x < -0.999]
    out[x > 0.999] = high_edge[x > 0.999]
    return out


def np_kl(m1, lv1, m2, lv2):
    s1, s2 = np.exp(0.5 * lv1), np.exp(0.5 * lv2)
    return np.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2.0 * s2**2) - 0.5


def np_p(tab, eps, v, x, t):
    """Reverse-step mean/log-variance/x0 from eps and v, learned-range variance."""
    abar = bcast(tab["abar"][t])
    x0 = (x - np.sqrt(1.0 - abar) * eps) / np.sqrt(abar)
    mean = bcast(tab["c1"][t]) * x0 + bcast(tab["c2"][t]) * x
    frac = (v + 1.0) / 2.0
    logvar = frac * bcast(np.log(tab["betas"][t])) + (1.0 - frac) * bcast(tab["post_logvar"][t])
    return mean, logvar, x0


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------- schedule
def test_schedule_numbers():
    d = create_diffusion()
    assert d.num_timesteps == 1000
    assert d.betas.dtype == np.float64 and d.alphas_cumprod.dtype == np.float64
    assert abs(d.alphas_cumprod[-1] - 4.04e-5) < 0.01e-5
    np.testing.assert_allclose(d.alphas_cumprod, np_abar(), rtol=1e-12)
    assert d.posterior_log_variance_clipped[0] == d.posterior_log_variance_clipped[1]
    tab = np_tables(np.linspace(1e-4, 0.02, 1000))
    np.testing.assert_allclose(d.posterior_variance, tab["post_var"], rtol=1e-12)
    np.testing.assert_allclose(d.posterior_log_variance_clipped, tab["post_logvar"], rtol=1e-12)
    np.testing.assert_array_equal(d.timestep_map, np.arange(1000))
    assert d.timestep_map.dtype == np.int32
    assert create_diffusion("").num_timesteps == 1000


# --------------------------------------------------------------------------------- respacing
def test_space_timesteps_250():
    s = space_timesteps(1000, "250")
    assert s == sorted(s) and len(s) == 250
    assert s[:6] == [0, 4, 8, 12, 16, 20]
    assert s[-4:] == [987, 991, 995, 999]
    assert 995 in s and 999 in s
    assert space_timesteps(1000, [250]) == s
    # Fractional stride 999/249, rounded.
    assert s == sorted({round(k * 999 / 249) for k in range(250)})


def test_space_timesteps_ddim_and_sections():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    first = [0, 55, 111, 166, 222, 277, 333, 388, 444, 499]
    assert space_timesteps(1000, "10,10") == first + [500 + k for k in first]
    # Uneven split: the first T % n sections are one step longer (334, 333, 333).
    assert space_timesteps(1000, "1,1,2") == [0, 334, 667, 999]
    assert space_timesteps(1000, "1000") == list(range(1000))


@pytest.mark.parametrize("bad", ["1001", "600,600", "ddim999", "ddimx", "abc", "", "0"])
def test_space_timesteps_errors(bad):
    with pytest.raises(ValueError):
        space_timesteps(1000, bad)


def test_respaced_betas():
    abar = np_abar()
    for spec in ["250", "ddim50", "10,10"]:
        d = create_diffusion(spec)
        kept = np.array(space_timesteps(1000, spec))
        prev = np.concatenate([[1.0], abar[kept[:-1]]])
        np.testing.assert_allclose(d.betas, 1.0 - abar[kept] / prev, rtol=1e-10)
        np.testing.assert_allclose(d.alphas_cumprod, abar[kept], rtol=1e-10)
        np.testing.assert_array_equal(d.timestep_map, kept)
        assert d.num_timesteps == len(kept)


# ------------------------------------------------------------------------- q and posterior
def test_q_sample_and_posterior():
    d = create_diffusion()
    tab = np_tables(np.linspace(1e-4, 0.02, 1000))
    r = rng(0)
    t = np.array([0, 1, 17, 500, 998, 999])
    x0 = r.uniform(-1, 1, (6, 4, 4, 3))
    noise = r.standard_normal((6, 4, 4, 3))
    xt = d.q_sample(jnp.asarray(x0, jnp.float32), jnp.asarray(t), jnp.asarray(noise, jnp.float32))
    ab = bcast(tab["abar"][t])
    exp_xt = np.sqrt(ab) * x0 + np.sqrt(1.0 - ab) * noise
    np.testing.assert_allclose(np.asarray(xt), exp_xt, rtol=1e-5, atol=1e-5)

    mean, var, logvar = d.q_posterior_mean_variance(
        jnp.asarray(x0, jnp.float32), jnp.asarray(exp_xt, jnp.float32), jnp.asarray(t)
    )
    # Posterior of x_{t-1} given x_t, x_0 in its "natural" form.
    ab_prev = bcast(tab["abar_prev"][t])
    beta = bcast(tab["betas"][t])
    exp_mean = (np.sqrt(ab_prev) * beta * x0 + np.sqrt(1 - beta) * (1 - ab_prev) * exp_xt) / (
        1 - ab
    )
    np.testing.assert_allclose(np.asarray(mean), exp_mean, rtol=1e-5, atol=1e-5)
    exp_var = np.broadcast_to(beta * (1 - ab_prev) / (1 - ab), x0.shape)
    np.testing.assert_allclose(np.asarray(var), exp_var, rtol=1e-5, atol=1e-12)
    exp_lv = np.broadcast_to(bcast(tab["post_logvar"][t]), x0.shape)
    np.testing.assert_allclose(np.asarray(logvar), exp_lv, rtol=1e-6)
    assert mean.shape == var.shape == logvar.shape == x0.shape


def test_p_mean_variance_learned_range():
    d = create_diffusion("250")
    tab = np_tables(d.betas)  # respaced betas already checked against abar above
    r = rng(1)
    t = np.array([0, 1, 100, 249])
    x = r.standard_normal((4, 3, 3, 4))
    eps = r.standard_normal((4, 3, 3, 4))
    v = r.uniform(-1, 1, (4, 3, 3, 4))
    out = d.p_mean_variance(
        jnp.asarray(np.concatenate([eps, v], -1), jnp.float32),
        jnp.asarray(x, jnp.float32),
        jnp.asarray(t),
    )
    mean, logvar, x0 = np_p(tab, eps, v, x, t)
    np.testing.assert_allclose(np.asarray(out["pred_xstart"]), x0, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out["mean"]), mean, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out["log_variance"]), logvar, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["variance"]), np.exp(logvar), rtol=1e-4)


# ----------------------------------------------------------------------------------- losses
def test_normal_kl_and_mean_flat():
    r = rng(2)
    m1, m2 = r.standard_normal((2, 5, 7))
    lv1, lv2 = r.uniform(-4, 1, (2, 5, 7))
    got = normal_kl(*(jnp.asarray(a, jnp.float32) for a in (m1, lv1, m2, lv2)))
    np.testing.assert_allclose(np.asarray(got), np_kl(m1, lv1, m2, lv2), rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(normal_kl(0.3, -1.0, 0.3, -1.0))) < 1e-7
    x = r.standard_normal((3, 2, 4, 5))
    np.testing.assert_allclose(
        np.asarray(mean_flat(jnp.asarray(x))), x.reshape(3, -1).mean(1), rtol=1e-5
    )


def test_discretized_gaussian_log_likelihood():
    x = np.array([-1.0, -0.9995, -0.5, 0.0, 0.3, 0.999, 0.9995, 1.0, -1.0, 1.0])
    means = np.array([-0.9, -1.0, -0.45, 0.01, 0.3, 0.5, 0.9, 1.2, 3.0, -3.0])
    log_scales = np.array([-2.0, -3.0, -1.0, -5.0, -0.5, -1.5, -2.5, 0.0, -4.0, -4.0])
    got = discretized_gaussian_log_likelihood(
        *(jnp.asarray(a, jnp.float32) for a in (x, means, log_scales))
    )
    exp = np_disc_loglik(x, means, log_scales)
    np.testing.assert_allclose(np.asarray(got), exp, rtol=1e-4, atol=1e-5)
    # The last two are far outside their edge bins: clamp at log(1e-12).
    np.testing.assert_allclose(np.asarray(got)[-2:], np.log(1e-12), rtol=1e-5)
    assert np.all(np.asarray(got) <= 0)


def _linear_model(x, t):
    """eps = 0.5 x + 0.01 + t/2000, v depends on the original timestep and channel."""
    c = x.shape[-1]
    tt = t.astype(jnp.float32)[:, None, None, None]
    eps = 0.5 * x + 0.01 + tt / 2000.0
    v = jnp.broadcast_to(0.8 * tt / 1000.0 - 0.4 + 0.1 * jnp.arange(c) / c, x.shape)
    return jnp.concatenate([eps, v], axis=-1)


def _np_linear_model(x, t):
    c = x.shape[-1]
    tt = bcast(t.astype(np.float64))
    eps = 0.5 * x + 0.01 + tt / 2000.0
    v = np.broadcast_to(0.8 * tt / 1000.0 - 0.4 + 0.1 * np.arange(c) / c, x.shape)
    return eps, v


def test_training_losses_vs_numpy():
    d = create_diffusion()
    tab = np_tables(np.linspace(1e-4, 0.02, 1000))
    r = rng(3)
    t = np.array([0, 0, 1, 5, 400, 999])
    x0 = r.uniform(-1, 1, (6, 4, 4, 4))
    x0[0, 0, 0, :2] = [-1.0, 1.0]  # edge bins of the decoder NLL
    x0[1, 1, 2, :2] = [1.0, -1.0]
    noise = r.standard_normal(x0.shape)
    got = jax.jit(lambda a, b, c: d.training_losses(_linear_model, a, b, c))(
        jnp.asarray(x0, jnp.float32), jnp.asarray(t, jnp.int32), jnp.asarray(noise, jnp.float32)
    )

    ab = bcast(tab["abar"][t])
    xt = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise
    eps, v = _np_linear_model(xt, t)
    mse = ((noise - eps) ** 2).reshape(6, -1).mean(1)
    mean, logvar, _ = np_p(tab, eps, v, xt, t)
    true_mean = bcast(tab["c1"][t]) * x0 + bcast(tab["c2"][t]) * xt
    true_lv = np.broadcast_to(bcast(tab["post_logvar"][t]), x0.shape)
    kl = np_kl(true_mean, true_lv, mean, logvar).reshape(6, -1).mean(1) / LN2
    nll = -np_disc_loglik(x0, mean, 0.5 * logvar).reshape(6, -1).mean(1) / LN2
    vb = np.where(t == 0, nll, kl)

    np.testing.assert_allclose(np.asarray(got["mse"]), mse, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got["vb"]), vb, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got["loss"]), mse + vb, rtol=1e-4, atol=1e-5)
    for k in ("loss", "mse", "vb"):
        assert got[k].shape == (6,)
    assert np.all(nll[:2] > 1.0)  # the t == 0 rows really use the (large) decoder NLL


def test_vb_gradient_only_reaches_variance_channels():
    d = create_diffusion()
    r = rng(4)
    t = jnp.array([0, 3, 250, 998], jnp.int32)
    x0 = jnp.asarray(r.uniform(-1, 1, (4, 2, 2, 4)), jnp.float32)
    noise = jnp.asarray(r.standard_normal((4, 2, 2, 4)), jnp.float32)

    def vb_of(out_offset, term):
        def model_fn(x, tt):
            return _linear_model(x, tt) + out_offset
        return jnp.sum(d.training_losses(model_fn, x0, t, noise)[term])

    g_vb = jax.grad(vb_of)(jnp.zeros((4, 2, 2, 8)), "vb")
    g_mse = jax.grad(vb_of)(jnp.zeros((4, 2, 2, 8)), "mse")
    assert np.all(np.asarray(g_vb[..., :4]) == 0.0)
    assert np.all(np.isfinite(np.asarray(g_vb)))
    assert np.abs(np.asarray(g_vb[..., 4:])).sum(axis=(1, 2, 3)).min() > 0  # every row
    assert np.all(np.asarray(g_mse[..., 4:]) == 0.0)
    assert np.abs(np.asarray(g_mse[..., :4])).sum() > 0


# ---------------------------------------------------------------------------------- samplers
def _t_record_model(record):
    def model_fn(x, t):
        jax.debug.callback(lambda tt: record.append(np.asarray(tt)), t, ordered=True)
        return _linear_model(x, t)
    return model_fn


def test_sample_loop_determinism_and_shapes():
    d = create_diffusion("ddim10")
    x_T = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 4))
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    run = jax.jit(
        lambda x, k, s, eta: sample_loop(d, _linear_model, x, k, sampler=s, eta=eta),
        static_argnums=(2,),
    )
    a, b = run(x_T, k1, "ddim", 0.0), run(x_T, k2, "ddim", 0.0)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c, e = run(x_T, k1, "ddpm", 0.0), run(x_T, k2, "ddpm", 0.0)
    assert not np.allclose(np.asarray(c), np.asarray(e))
    f, g = run(x_T, k1, "ddim", 1.0), run(x_T, k2, "ddim", 1.0)
    assert not np.allclose(np.asarray(f), np.asarray(g))
    for out in (a, c, f):
        assert out.shape == x_T.shape and np.all(np.isfinite(np.asarray(out)))
    with pytest.raises(ValueError):
        sample_loop(d, _linear_model, x_T, k1, sampler="euler")


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sample_loop_passes_original_timesteps(sampler):
    d = create_diffusion("ddim10")
    record: list[np.ndarray] = []
    x_T = jnp.ones((3, 2, 2, 4))
    out = sample_loop(d, _t_record_model(record), x_T, jax.random.PRNGKey(0), sampler=sampler)
    jax.block_until_ready(out)
    jax.effects_barrier()
    seen = [int(r[0]) for r in record]
    assert seen == list(range(900, -1, -100))
    assert all(np.all(r == r[0]) and r.shape == (3,) for r in record)


def test_ddpm_two_steps_vs_numpy():
    d = create_diffusion("ddim2")  # original timesteps {0, 500}
    np.testing.assert_array_equal(d.timestep_map, [0, 500])
    abar = np_abar()
    tab = np_tables(1.0 - abar[[0, 500]] / np.array([1.0, abar[0]]))
    key = jax.random.PRNGKey(7)
    x_T = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (2, 3, 3, 4)), np.float64)
    got = sample_loop(d, _linear_model, jnp.asarray(x_T, jnp.float32), key, sampler="ddpm")

    x = x_T
    for step, orig in [(1, 500), (0, 0)]:
        t = np.full(2, step)
        eps, v = _np_linear_model(x, np.full(2, orig))
        mean, logvar, _ = np_p(tab, eps, v, x, t)
        if step > 0:
            z = np.asarray(jax.random.normal(jax.random.fold_in(key, step), x.shape), np.float64)
            x = mean + np.exp(0.5 * logvar) * z
        else:
            x = mean
    np.testing.assert_allclose(np.asarray(got), x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_two_steps_vs_numpy(eta):
    d = create_diffusion("ddim2")
    abar_all = np_abar()
    abar = abar_all[[0, 500]]
    abar_prev = np.array([1.0, abar[0]])
    key = jax.random.PRNGKey(11)
    x_T = np.asarray(jax.random.normal(jax.random.PRNGKey(5), (2, 3, 3, 4)), np.float64)
    got = sample_loop(
        d, _linear_model, jnp.asarray(x_T, jnp.float32), key, sampler="ddim", eta=eta
    )

    x = x_T
    for step, orig in [(1, 500), (0, 0)]:
        eps, _ = _np_linear_model(x, np.full(2, orig))
        a, ap = abar[step], abar_prev[step]
        x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
        sigma = eta * np.sqrt((1 - ap) / (1 - a) * (1 - a / ap))
        x = np.sqrt(ap) * x0 + np.sqrt(1 - ap - sigma**2) * eps
        if step > 0:
            z = np.asarray(jax.random.normal(jax.random.fold_in(key, step), x.shape), np.float64)
            x = x + sigma * z
    np.testing.assert_allclose(np.asarray(got), x, rtol=1e-4, atol=1e-4)


def test_single_step_diffusion_is_finite():
    d = create_diffusion("1")
    assert isinstance(d, GaussianDiffusion) and d.num_timesteps == 1
    assert np.all(np.isfinite(d.posterior_log_variance_clipped))
    x_T = jnp.ones((1, 2, 2, 4))
    out = sample_loop(d, _linear_model, x_T, jax.random.PRNGKey(0))
    assert np.all(np.isfinite(np.asarray(out)))


# ------------------------------------------------------------------------- DPM-Solver++(2M)
@pytest.mark.parametrize("steps", ["3", "logsnr4"])
def test_dpmpp2m_vs_numpy(steps):
    """The multistep update written out from the paper's form (lambda = log(alpha/sigma),
    h = lambda_t - lambda_s, D = (1 + 1/(2r)) x0_s - 1/(2r) x0_prev, r = h_prev/h), with a
    first-order first step and a last step to the clean image."""
    d = create_diffusion(steps)
    abar = np_abar()[d.timestep_map]
    alpha, sigma = np.sqrt(abar), np.sqrt(1.0 - abar)
    lam = np.log(alpha / sigma)
    x_T = np.asarray(jax.random.normal(jax.random.PRNGKey(5), (2, 3, 3, 4)), np.float64)
    got = sample_loop(d, _linear_model, jnp.asarray(x_T, jnp.float32), jax.random.PRNGKey(0),
                      sampler="dpmpp2m")

    x, x0_prev, h_prev = x_T, None, None
    for i in range(d.num_timesteps - 1, -1, -1):
        eps, _ = _np_linear_model(x, np.full(2, d.timestep_map[i]))
        x0 = (x - sigma[i] * eps) / alpha[i]
        if i == 0:  # to sigma = 0: the clean-image prediction itself
            x = x0
            break
        h = lam[i - 1] - lam[i]
        dd = x0 if x0_prev is None else x0 + h / (2.0 * h_prev) * (x0 - x0_prev)
        x = sigma[i - 1] / sigma[i] * x - alpha[i - 1] * np.expm1(-h) * dd
        x0_prev, h_prev = x0, h
    np.testing.assert_allclose(np.asarray(got), x, rtol=1e-4, atol=1e-4)


def _gaussian_data_model(s2: float):
    """The exact eps of data ~ N(0, s2 I): eps(x_t) = sigma x_t / (alpha^2 s2 + sigma^2),
    learned-sigma layout (zeros for the variance half)."""
    abar = jnp.asarray(np_abar(), jnp.float32)

    def model_fn(x, t):
        a = abar[t][:, None, None, None]
        eps = jnp.sqrt(1.0 - a) * x / (a * s2 + 1.0 - a)
        return jnp.concatenate([eps, jnp.zeros_like(x)], -1)

    return model_fn


def test_dpmpp2m_converges_to_the_ode_at_second_order():
    """On Gaussian data the probability-flow ODE keeps x_t / sqrt(alpha^2 s2 + sigma^2)
    fixed: from x_T at t = 999 to t = 0, then to the clean-image prediction (the last step of
    every sampler). Halving the log-SNR step quarters DPM-Solver++(2M)'s error and halves
    DDIM's (first order)."""
    s2 = 0.25
    model_fn = _gaussian_data_model(s2)
    x_T = jax.random.normal(jax.random.key(0), (4, 3, 3, 2))
    a0, aT = np_abar()[0], np_abar()[-1]
    x_t0 = np.asarray(x_T, np.float64) * np.sqrt((a0 * s2 + 1 - a0) / (aT * s2 + 1 - aT))
    want = x_t0 * np.sqrt(a0) * s2 / (a0 * s2 + 1 - a0)

    def error(sampler, n):
        out = sample_loop(create_diffusion(f"logsnr{n}"), model_fn, x_T, jax.random.key(1),
                          sampler=sampler)
        return float(np.abs(np.asarray(out, np.float64) - want).max())

    dpm = [error("dpmpp2m", n) for n in (20, 40, 80)]
    ddim = [error("ddim", n) for n in (20, 40, 80)]
    for coarse, fine in zip(dpm[:-1], dpm[1:], strict=True):
        assert 3.0 < coarse / fine < 5.5, dpm
    for coarse, fine in zip(ddim[:-1], ddim[1:], strict=True):
        assert 1.6 < coarse / fine < 2.5, ddim
    assert dpm[0] < ddim[-1]  # 20 second-order steps beat 80 first-order ones


def test_log_snr_spacing_and_sampler_step_checks():
    kept = space_timesteps(1000, "logsnr20")
    assert len(kept) == 20 and kept[0] == 0 and kept[-1] == 999 and kept == sorted(set(kept))
    lam = 0.5 * np.log(np_abar() / (1.0 - np_abar()))
    gaps = -np.diff(lam[kept])
    assert gaps[5:].max() < 1.3 * gaps[5:].min()  # even in log-SNR (rounding near t=0 aside)
    for n in (1, 2, 999, 1000):
        assert len(set(space_timesteps(1000, f"logsnr{n}"))) == n
    for bad in ("logsnr0", "logsnr1001", "logsnr", "logsnrX"):
        with pytest.raises(ValueError, match="logsnr"):
            space_timesteps(1000, bad)
    with pytest.raises(ValueError, match="dpmpp2m sampler needs at least 2 sampling steps"):
        check_sampler("dpmpp2m", None, "1")
    with pytest.raises(ValueError, match="dpmpp2m sampler needs at least 2"):
        check_sampler("dpmpp2m", None, "logsnr1")
    with pytest.raises(ValueError, match=">= 1 step"):
        check_sampler("dpmpp2m", None, "0")
    with pytest.raises(ValueError, match="unknown sampler"):
        check_sampler("euler", None, "20")
    assert check_sampler("dpmpp2m", -1, "2") is None and check_sampler("ddpm", 3, "1") == 3


def test_guidance_interval_selects_a_contiguous_stretch_of_steps():
    d = create_diffusion("10")  # timesteps 0, 111, 222, ..., 999
    assert guidance_steps(d, (0.0, 1.0)) == (0, 10)
    assert guidance_steps(d, "0,1") == (0, 10)
    assert guidance_steps(d, (0.5, 0.5)) == (0, 0)  # empty
    first, stop = guidance_steps(d, "0.2,0.6")  # 222 .. 555 (t/1000 in [0.2, 0.6))
    assert d.timestep_map[first:stop].tolist() == [222, 333, 444, 555]
    assert parse_cfg_interval(" 0.1 , 0.9 ") == (0.1, 0.9)
    for bad in ("0.6,0.2", "-0.1,0.5", "0.2,1.5", "0.5", "a,b", "0,0.5,1", (0.9, 0.1)):
        with pytest.raises(ValueError, match="guidance interval"):
            parse_cfg_interval(bad)


# ------------------------------------------------------------------------------------ guidance
def _cfg_setup():
    r = rng(6)
    b, c = 2, 4
    x = jnp.asarray(r.standard_normal((b, 2, 2, c)), jnp.float32)
    t = jnp.array([10, 10], jnp.int32)
    y = jnp.array([3, 7], jnp.int32)
    seen = {}

    def apply_fn(xx, tt, labels):
        seen["labels"] = labels
        seen["t"] = tt
        lab = labels.astype(jnp.float32)[:, None, None, None]
        ch = jnp.arange(2 * c, dtype=jnp.float32)
        return jnp.concatenate([xx, xx], -1) * (1.0 + ch) + lab * 0.1 + ch * 0.01

    return x, t, y, seen, apply_fn


def _np_apply(x, labels):
    c = x.shape[-1]
    ch = np.arange(2 * c)
    return np.concatenate([x, x], -1) * (1.0 + ch) + bcast(labels * 0.1) + ch * 0.01


@pytest.mark.parametrize("g", [3, None])
def test_classifier_free_guidance(g):
    x, t, y, seen, apply_fn = _cfg_setup()
    scale = 1.5
    out = np.asarray(classifier_free_guidance(apply_fn, y, 1000, scale, guided_channels=g)(x, t))
    # the network sees [x; x] with labels [y; null], both at the rows' timesteps
    np.testing.assert_array_equal(np.asarray(seen["labels"]), [3, 7, 1000, 1000])
    np.testing.assert_array_equal(np.asarray(seen["t"]), [10, 10, 10, 10])

    x64 = np.asarray(x, np.float64)
    raw = _np_apply(np.concatenate([x64, x64]), np.array([3, 7, 1000, 1000], np.float64))
    gg = 4 if g is None else g
    cond, uncond = raw[:2], raw[2:]
    half = uncond[..., :gg] + scale * (cond[..., :gg] - uncond[..., :gg])
    assert out.shape == cond.shape  # the conditional rows only
    np.testing.assert_allclose(out[..., :gg], half, rtol=1e-5, atol=1e-5)
    # Unguided channels (4th eps channel when g=3, and all variance channels) stay the
    # conditional output's own.
    np.testing.assert_allclose(out[..., gg:], cond[..., gg:], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_per_row_keys_make_rows_independent_of_the_batch(sampler):
    """With one key per row, a row's sample depends on its own key only."""
    diffusion = create_diffusion("5")
    model_fn = lambda x, t: jnp.concatenate([0.3 * x, jnp.tanh(x)], -1)
    keys = jax.random.split(jax.random.key(7), 4)
    x_T = jax.random.normal(jax.random.key(1), (4, 2, 2, 1))
    run = jax.jit(lambda x, k: sample_loop(diffusion, model_fn, x, k, sampler=sampler, eta=0.5))
    whole = np.asarray(run(x_T, keys))
    for r in range(4):
        alone = np.asarray(run(x_T[r : r + 1], keys[r : r + 1]))
        np.testing.assert_allclose(whole[r : r + 1], alone, rtol=1e-6, atol=1e-6)
    assert not np.allclose(whole[0], whole[1])
