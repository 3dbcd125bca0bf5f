"""Schedules, the forward process, parameterisation conversions and thresholding, checked against
diffusers' DDPMScheduler / EulerDiscreteScheduler (PyTorch, float32) and float64 NumPy formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

from ldm_jax.diffusion import forward as fwd
from ldm_jax.diffusion.schedules import extract, make_schedule, sigma_at
from ldm_jax.diffusion.thresholding import dynamic_threshold, static_clip

T = 1000
DIFFUSERS_KIND = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
DIFFUSERS_BETAS = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012), "cosine": (1e-4, 0.02)}


def _ddpm(kind, zero_snr=False, **kw):
    lo, hi = DIFFUSERS_BETAS[kind]
    return DDPMScheduler(
        num_train_timesteps=T,
        beta_start=lo,
        beta_end=hi,
        beta_schedule=DIFFUSERS_KIND[kind],
        rescale_betas_zero_snr=zero_snr,
        **kw,
    )


@pytest.fixture(scope="module")
def sd_schedule():
    return make_schedule("scaled_linear", T)


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
def test_betas_and_alphas_cumprod_match_diffusers_ddpm_scheduler(kind, zero_snr):
    ours = make_schedule(kind, T, rescale_to_zero_terminal_snr=zero_snr)
    ref = _ddpm(kind, zero_snr)
    if zero_snr:
        # diffusers rescales in float32, where 1 - abar_t / abar_{t-1} loses ~3 digits for
        # betas ~1e-4; its own function evaluated in float64 is the sharp reference for betas.
        betas64 = rescale_zero_terminal_snr(_ddpm(kind).betas.double()).numpy()
        np.testing.assert_allclose(np.asarray(ours.betas), betas64, rtol=2e-5, atol=1e-8)
        np.testing.assert_allclose(np.asarray(ours.betas), ref.betas.numpy(), rtol=5e-3, atol=1e-6)
    else:
        np.testing.assert_allclose(np.asarray(ours.betas), ref.betas.numpy(), rtol=2e-5, atol=1e-8)
    # torch accumulates the cumulative product in float32; ours is float64 rounded once.
    np.testing.assert_allclose(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=2e-5, atol=1e-7)
    if zero_snr:
        assert float(ours.alphas_cumprod[-1]) == 0.0
        assert float(ref.alphas_cumprod[-1]) == 0.0


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_derived_schedule_arrays_match_float64_formulas(kind):
    s = make_schedule(kind, T)
    ref = _ddpm(kind)
    b = ref.betas.numpy().astype(np.float64)
    if kind == "linear":
        b = np.linspace(1e-4, 0.02, T)  # exact float64 betas for a tight comparison
    a = 1 - b
    ab = np.cumprod(a)
    abp = np.concatenate([[1.0], ab[:-1]])
    post_var = b * (1 - abp) / (1 - ab)
    expected = {
        "alphas_cumprod_prev": abp,
        "sqrt_alphas_cumprod": np.sqrt(ab),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - ab),
        "log_one_minus_alphas_cumprod": np.log(1 - ab),
        "sqrt_recip_alphas_cumprod": 1 / np.sqrt(ab),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1 / ab - 1),
        "sigmas": np.sqrt((1 - ab) / ab),
        "log_snr": np.log(ab / (1 - ab)),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": np.log(np.where(np.arange(T) == 0, post_var[1], post_var)),
        "posterior_mean_coef1": b * np.sqrt(abp) / (1 - ab),
        "posterior_mean_coef2": (1 - abp) * np.sqrt(a) / (1 - ab),
    }
    for name, want in expected.items():
        np.testing.assert_allclose(np.asarray(getattr(s, name)), want, rtol=5e-5, atol=1e-6, err_msg=name)


def test_sigma_at_matches_float64_log_interpolation_and_inverts_diffusers_sigma_to_t(sd_schedule):
    abar64 = np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, T) ** 2)
    sigmas64 = np.sqrt((1 - abar64) / abar64)
    t = np.array([0.0, 0.25, 1.5, 17.3, 500.0, 998.75, 999.0])
    want = np.exp(np.interp(t, np.arange(T), np.log(sigmas64)))
    np.testing.assert_allclose(np.asarray(sigma_at(sd_schedule, jnp.asarray(t))), want, rtol=1e-5)
    # Out-of-range timesteps clamp to the end sigmas rather than extrapolating.
    np.testing.assert_allclose(np.asarray(sigma_at(sd_schedule, jnp.array([-3.0, 1500.0]))), sigmas64[[0, -1]], rtol=1e-5)

    # diffusers' Euler scheduler maps a sigma to a fractional timestep by the same log-linear rule.
    euler = EulerDiscreteScheduler(num_train_timesteps=T, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    log_sigmas = np.log(((1 - euler.alphas_cumprod) / euler.alphas_cumprod).numpy() ** 0.5)
    query = np.array([0.03, 0.5, 1.0, 3.7, 14.0])
    t_frac = euler._sigma_to_t(query, log_sigmas)
    np.testing.assert_allclose(np.asarray(sigma_at(sd_schedule, jnp.asarray(t_frac))), query, rtol=1e-4)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((4, 8, 8, 3)).astype(np.float32)
    noise = rng.standard_normal((4, 8, 8, 3)).astype(np.float32)
    t = np.array([0, 10, 500, 999], dtype=np.int32)
    return x0, noise, t


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


def test_q_sample_matches_diffusers_add_noise(sd_schedule, batch):
    x0, noise, t = batch
    ours = np.asarray(fwd.q_sample(sd_schedule, jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise)))
    ref = _ddpm("scaled_linear").add_noise(_nchw(x0), _nchw(noise), torch.from_numpy(t).long()).numpy()
    np.testing.assert_allclose(ours, np.moveaxis(ref, 1, -1), atol=1e-5)


def test_velocity_matches_diffusers_get_velocity(sd_schedule, batch):
    x0, noise, t = batch
    ours = np.asarray(fwd.v_from_eps_x0(sd_schedule, jnp.asarray(t), jnp.asarray(noise), jnp.asarray(x0)))
    ref = _ddpm("scaled_linear").get_velocity(_nchw(x0), _nchw(noise), torch.from_numpy(t).long()).numpy()
    np.testing.assert_allclose(ours, np.moveaxis(ref, 1, -1), atol=1e-5)
    target = fwd.training_target(sd_schedule, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t), "v")
    np.testing.assert_allclose(np.asarray(target), ours, atol=1e-6)


@pytest.mark.parametrize("prediction,diffusers_name", [("eps", "epsilon"), ("x0", "sample"), ("v", "v_prediction")])
def test_x0_hat_matches_diffusers_step_pred_original_sample(sd_schedule, batch, prediction, diffusers_name):
    x0, noise, _ = batch
    x_t, out = x0, noise  # any arrays will do: both sides interpret `out` as the model output
    for step in (0, 37, 999):
        sched = _ddpm("scaled_linear", prediction_type=diffusers_name, clip_sample=False)
        ref = sched.step(_nchw(out), step, _nchw(x_t), generator=torch.Generator().manual_seed(0))
        _, ours = fwd.to_eps_and_x0(sd_schedule, jnp.asarray(out), jnp.asarray(x_t), step, prediction)
        np.testing.assert_allclose(np.asarray(ours), np.moveaxis(ref.pred_original_sample.numpy(), 1, -1), rtol=1e-4, atol=1e-4)


def test_q_posterior_matches_float64_formulas(batch):
    x0, noise, t = batch
    s = make_schedule("linear", T)
    b = np.linspace(1e-4, 0.02, T)
    ab = np.cumprod(1 - b)
    abp = np.concatenate([[1.0], ab[:-1]])
    x_t = 0.7 * x0.astype(np.float64) + 0.3 * noise
    mean, var, log_var = fwd.q_posterior(s, jnp.asarray(x0), jnp.asarray(x_t, jnp.float32), jnp.asarray(t))
    r = lambda v: v[t][:, None, None, None]
    want_mean = r(np.sqrt(abp) * b / (1 - ab)) * x0 + r(np.sqrt(1 - b) * (1 - abp) / (1 - ab)) * x_t
    want_var = r(b * (1 - abp) / (1 - ab))
    np.testing.assert_allclose(np.asarray(mean), want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(var), want_var, rtol=1e-5, atol=1e-12)
    pv1 = b[1] * (1 - ab[0]) / (1 - ab[1])
    np.testing.assert_allclose(np.asarray(log_var), np.log(np.where(r(np.arange(T)) == 0, pv1, want_var)), rtol=1e-5)


def test_conversions_round_trip_and_match_float64(batch):
    x0, noise, t = batch
    s = make_schedule("cosine", T)
    abar = np.cumprod(1 - np.asarray(_ddpm("cosine").betas.numpy(), np.float64))[t][:, None, None, None]
    x_t = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise
    v = np.sqrt(abar) * noise - np.sqrt(1 - abar) * x0
    jx_t, jt = jnp.asarray(x_t, jnp.float32), jnp.asarray(t)
    np.testing.assert_allclose(np.asarray(fwd.q_sample(s, jnp.asarray(x0), jt, jnp.asarray(noise))), x_t, atol=2e-5)
    np.testing.assert_allclose(np.asarray(fwd.v_from_eps_x0(s, jt, jnp.asarray(noise), jnp.asarray(x0))), v, atol=2e-5)
    # From v both eps and x0 are well conditioned at every t.
    np.testing.assert_allclose(np.asarray(fwd.x0_from_v(s, jx_t, jt, jnp.asarray(v, jnp.float32))), x0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(fwd.eps_from_v(s, jx_t, jt, jnp.asarray(v, jnp.float32))), noise, atol=1e-4)
    # eps -> x0 -> eps and x0 -> eps -> x0, at the timesteps where each direction is well conditioned.
    x0_hat = fwd.x0_from_eps(s, jx_t, jt, jnp.asarray(noise))
    np.testing.assert_allclose(np.asarray(x0_hat)[:3], x0[:3], atol=2e-3)
    np.testing.assert_allclose(np.asarray(fwd.eps_from_x0(s, jx_t, jt, x0_hat))[1:], noise[1:], atol=2e-3)
    for prediction, out in [("eps", noise), ("x0", x0), ("v", v)]:
        eps_hat, x0_back = fwd.to_eps_and_x0(s, jnp.asarray(out, jnp.float32), jx_t, jt, prediction)
        np.testing.assert_allclose(np.asarray(x0_back)[1:3], x0[1:3], atol=2e-3, err_msg=prediction)
        np.testing.assert_allclose(np.asarray(eps_hat)[1:3], noise[1:3], atol=2e-3, err_msg=prediction)


@pytest.mark.parametrize("max_value,ratio", [(1.0, 0.995), (1.5, 0.995), (3.0, 0.9)])
def test_dynamic_threshold_matches_diffusers_threshold_sample(max_value, ratio):
    rng = np.random.default_rng(1)
    x0 = (rng.standard_normal((3, 8, 8, 4)) * np.array([0.5, 1.3, 4.0])[:, None, None, None]).astype(np.float32)
    sched = DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=ratio, sample_max_value=max_value)
    ref = np.moveaxis(sched._threshold_sample(_nchw(x0)).numpy(), 1, -1)
    np.testing.assert_allclose(np.asarray(dynamic_threshold(jnp.asarray(x0), ratio, max_value)), ref, atol=1e-6)
    if max_value == 1.0:
        np.testing.assert_allclose(np.asarray(static_clip(jnp.asarray(x0))), ref, atol=1e-6)


def test_public_functions_work_under_jit_and_vmap(sd_schedule, batch):
    x0, noise, t = (jnp.asarray(a) for a in batch)
    cases = {
        "q_sample": lambda x, n, tt: fwd.q_sample(sd_schedule, x, tt, n),
        "q_posterior": lambda x, n, tt: fwd.q_posterior(sd_schedule, x, n, tt)[0],
        "x0_from_eps": lambda x, n, tt: fwd.x0_from_eps(sd_schedule, x, tt, n),
        "eps_from_x0": lambda x, n, tt: fwd.eps_from_x0(sd_schedule, x, tt, n),
        "v_from_eps_x0": lambda x, n, tt: fwd.v_from_eps_x0(sd_schedule, tt, n, x),
        "x0_from_v": lambda x, n, tt: fwd.x0_from_v(sd_schedule, x, tt, n),
        "eps_from_v": lambda x, n, tt: fwd.eps_from_v(sd_schedule, x, tt, n),
        "to_eps_and_x0": lambda x, n, tt: fwd.to_eps_and_x0(sd_schedule, n, x, tt, "v")[1],
        "training_target": lambda x, n, tt: fwd.training_target(sd_schedule, x, n, tt, "v"),
        "dynamic_threshold": lambda x, n, tt: dynamic_threshold(x * 3.0, 0.9, 2.0),
        "static_clip": lambda x, n, tt: static_clip(x * 3.0),
        "sigma_at": lambda x, n, tt: sigma_at(sd_schedule, tt.astype(jnp.float32) + 0.5)[:, None, None, None] + 0 * x,
        "extract": lambda x, n, tt: extract(sd_schedule.betas, tt, x.ndim) + 0 * x,
    }
    # One program holding every function keeps this to two compilations.
    def all_cases(x, n, tt):
        return {name: fn(x, n, tt) for name, fn in cases.items()}

    eager = all_cases(x0, noise, t)
    jitted = jax.jit(all_cases)(x0, noise, t)
    # vmap over examples, keeping a batch axis of 1 inside so the functions see [1, ...].
    per_example = jax.vmap(lambda x, n, tt: jax.tree.map(lambda a: a[0], all_cases(x[None], n[None], tt[None])))(x0, noise, t)
    for name in cases:
        np.testing.assert_allclose(np.asarray(jitted[name]), np.asarray(eager[name]), rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(np.asarray(per_example[name]), np.asarray(eager[name]), rtol=1e-5, atol=1e-6, err_msg=name)
    # The Schedule is a pytree argument of jitted functions, not a static constant.
    other = make_schedule("linear", T)
    sample = jax.jit(lambda sched, x, n, tt: fwd.q_sample(sched, x, tt, n))
    np.testing.assert_allclose(np.asarray(sample(other, x0, noise, t)), np.asarray(fwd.q_sample(other, x0, t, noise)), atol=1e-6)
    assert not np.allclose(np.asarray(sample(other, x0, noise, t)), np.asarray(sample(sd_schedule, x0, noise, t)))


def test_bad_arguments_raise_value_error_naming_the_value(sd_schedule, batch):
    x0, noise, t = (jnp.asarray(a) for a in batch)
    with pytest.raises(ValueError, match="'cosine_v2'"):
        make_schedule("cosine_v2", T)
    with pytest.raises(ValueError, match="'sample'"):
        fwd.to_eps_and_x0(sd_schedule, noise, x0, t, "sample")
    with pytest.raises(ValueError, match="'epsilon'"):
        fwd.training_target(sd_schedule, x0, noise, t, "epsilon")
    with pytest.raises(ValueError, match=r"\(4, 8, 8, 2\)"):
        fwd.q_sample(sd_schedule, x0, t, noise[..., :2])
    with pytest.raises(ValueError, match=r"\(3,\)"):
        fwd.q_sample(sd_schedule, x0, t[:3], noise)
    with pytest.raises(ValueError, match=r"\(4, 8, 8, 2\)"):
        fwd.to_eps_and_x0(sd_schedule, noise[..., :2], x0, t)
    with pytest.raises(ValueError, match="1.5"):
        dynamic_threshold(x0, percentile=1.5)
    with pytest.raises(ValueError, match="0.5"):
        dynamic_threshold(x0, max_value=0.5)
