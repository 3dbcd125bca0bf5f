"""Samplers against closed forms for Gaussian data, plus transformations and argument checks.

Data x0 ~ N(mu, diag(s^2)) with 4 dimensions of different mean and scale; the model is the
exact eps-predictor (ldm_jax.diffusion.analytic.gaussian_eps_model). For Gaussian data the
probability-flow ODE is linear and preserves each dimension's z-score: if x_t ~ N(a mu, a^2 s^2 + b^2)
at the start level (a, b), the ODE carries x_t to

    x0 = mu + s (x_t - a mu) / sqrt(a^2 s^2 + b^2),

so every deterministic sampler must reproduce this map up to its discretisation error, and
every sampler the data moments up to sampling error.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion.analytic import gaussian_eps_model
from ldm_jax.diffusion.samplers import SAMPLERS, initial_noise, sample
from ldm_jax.diffusion.schedules import make_schedule, sigma_at

T = 1000
MU = np.array([0.5, -1.0, 0.2, 1.5])
SD = np.array([0.3, 1.0, 0.6, 0.8])
BATCH = 2000
SHAPE = (BATCH, 4)


@pytest.fixture(scope="module")
def schedule():
    return make_schedule("linear", T)


@pytest.fixture(scope="module")
def eps_model(schedule):
    return gaussian_eps_model(schedule, MU, SD)


@pytest.fixture(scope="module")
def key():
    return jax.random.key(0)


@pytest.fixture(scope="module")
def x_T(key):
    return np.asarray(initial_noise(key, SHAPE), np.float64)


def flow_map(schedule, x_start, t_start):
    """The exact probability-flow map from VP level t_start (integer) to clean data, float64."""
    abar = float(np.float64(schedule.alphas_cumprod[t_start]))
    a, b2 = np.sqrt(abar), 1.0 - abar
    return MU + SD * (x_start - a * MU) / np.sqrt(a**2 * SD**2 + b2)


# (sampler, options, num_steps, order, first timestep of "leading" spacing)
ODE_CASES = [
    ("ddim", {}, 40, 1, 39 * 25),
    ("euler", {}, 40, 1, 39 * 25),
    ("euler", {"karras_sigmas": True}, 40, 1, 39 * 25),
    ("plms", {}, 40, 2, 39 * 25),
    ("heun", {}, 20, 2, 19 * 50),
    ("heun", {"karras_sigmas": True}, 20, 2, 19 * 50),
    ("dpmpp_2m", {}, 40, 2, 40 * (T // 41)),
    ("dpmpp_2m", {"karras_sigmas": True}, 40, 2, T - 1),  # Karras sigmas start at sigma_{T-1}
    ("dpmpp_3m", {}, 40, 2, 40 * (T // 41)),
    # 2S takes n / 2 second-order steps, each through an intermediate level.
    ("dpmpp_2s", {}, 40, "2s", 40 * (T // 41)),
    ("dpmpp_2s", {"solver_type": "heun", "karras_sigmas": True}, 40, "2s", T - 1),
    ("unipc_1", {}, 40, 1, 40 * (T // 41)),
    ("unipc_2", {}, 40, 2, 40 * (T // 41)),
    ("unipc_3", {"solver_type": "bh1"}, 40, 2, 40 * (T // 41)),
]
# Pointwise error bounds C / n^order. The steps are uniform in t, so near t = 0 they are
# large in log-SNR and shrink slowly with n; the constants cover the measured errors
# (first order: 6.2 / n for uniform and 8.9 / n for Karras sigmas, UniPC-1 3.6 / n; higher
# orders: <= 70 / n^2 at these n, UniPC-2 / -3 59 / n^2 and 38 / n^2; DPM-Solver++(2S) 139 / n^2
# and 33 / n^2 with Karras sigmas) with margin.
ORDER_CONSTANT = {1: 12.0, 2: 100.0, "2s": 200.0}
ORDER_EXPONENT = {1: 1, 2: 2, "2s": 2}


def _run(eps_model, schedule, sampler, num_steps, key, **options):
    return np.asarray(
        sample(eps_model, schedule, SHAPE, key, sampler=sampler, num_steps=num_steps, spacing="leading", **options),
        np.float64,
    )


def _assert_moments(x, extra_tolerance):
    """Pooled z-scores: mean 0 and std 1 within 4 standard errors plus ``extra_tolerance``."""
    z = (x - MU) / SD
    n = z.size
    assert abs(z.mean()) < 4.0 / np.sqrt(n) + extra_tolerance, z.mean()
    assert abs(z.std() - 1.0) < 4.0 / np.sqrt(2 * n) + extra_tolerance, z.std()
    # Per dimension too, so a broadcasting error in one dimension cannot hide in the pool.
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=4.0 / np.sqrt(BATCH) + extra_tolerance)


@pytest.mark.parametrize("sampler,options,num_steps,order,t_start", ODE_CASES)
def test_ode_samplers_follow_gaussian_probability_flow(
    schedule, eps_model, key, x_T, sampler, options, num_steps, order, t_start
):
    x = _run(eps_model, schedule, sampler, num_steps, key, **options)
    exact = flow_map(schedule, x_T, t_start)
    bound = ORDER_CONSTANT[order] / num_steps ** ORDER_EXPONENT[order]
    err = np.abs(x - exact).max()
    assert err < bound, f"max |x - flow map| = {err:.3g} >= {bound:.3g}"
    # Moments: the exact map's sample moments are within sampling error of (mu, s), and the
    # sampler differs from it pointwise by less than the bound.
    _assert_moments(x, bound / SD.min())


def test_ddim_is_first_order_and_heun_dpm_second_order(schedule, eps_model, key, x_T):
    def err(sampler, n, t_start, **options):
        return np.abs(_run(eps_model, schedule, sampler, n, key, **options) - flow_map(schedule, x_T, t_start)).max()

    ddim_ratio = err("ddim", 80, 79 * 12) / err("ddim", 40, 39 * 25)
    assert 0.4 < ddim_ratio < 0.6, ddim_ratio  # error ~ 1/n
    heun_ratio = err("heun", 40, 39 * 25) / err("heun", 20, 19 * 50)
    assert heun_ratio < 0.35, heun_ratio  # error ~ 1/n^2 gives 0.25
    dpm_ratio = err("dpmpp_2m", 80, 80 * (T // 81)) / err("dpmpp_2m", 40, 40 * (T // 41))
    assert dpm_ratio < 0.35, dpm_ratio


@pytest.mark.parametrize(
    "sampler,options,num_steps,allowance",
    [
        # Full-length DDPM: the fixed-small variance misses coef1^2 Var(x0 | x_t) per step,
        # ~1e-4 / t summed over t, i.e. < 1% of the std; allow 1%.
        ("ddpm", {}, 1000, 0.01),
        ("ddpm", {"variance": "fixed_large"}, 1000, 0.01),
        # eta = 1 DDIM is DDPM with the fixed-small variance.
        ("ddim", {"eta": 1.0}, 1000, 0.01),
        # SDE solver, 100 steps: first-order weak error in the large final steps; allow 2%.
        ("dpmpp_2m_sde", {}, 100, 0.02),
        # Euler ancestral: first-order weak error (std 6% low at 100 steps, 2.6% at 300); allow 1.5% at 1000.
        ("euler_ancestral", {}, 1000, 0.015),
    ],
)
def test_stochastic_samplers_reproduce_gaussian_moments(schedule, eps_model, key, sampler, options, num_steps, allowance):
    x = _run(eps_model, schedule, sampler, num_steps, jax.random.key(3), **options)
    _assert_moments(x, allowance)


def _lcm_gaussian_moments(schedule, num_steps, original_steps=50):
    """Mean and std of LCM's output with the exact denoiser, per dimension, float64.

    With x0_hat = E[x0 | x_t] = mu + g (x - a mu), g = a s^2 / (a^2 s^2 + b^2), every step is
    affine in the state plus fresh noise, so the state stays Gaussian: denoised = c_out x0_hat +
    c_skip x, then x' = a' denoised + b' z. Few-step LCM with a posterior-MEAN denoiser (not a
    consistency model) shrinks the std: this is the closed form it must follow, not the data's.
    """
    from ldm_jax.diffusion.samplers.discrete import lcm_timesteps

    abar = np.asarray(schedule.alphas_cumprod, np.float64)
    ts = lcm_timesteps(T, num_steps, original_steps)
    mean, var = np.zeros(4), np.ones(4)
    for k, t in enumerate(ts):
        a, b2 = np.sqrt(abar[t]), 1.0 - abar[t]
        g = a * SD**2 / (a**2 * SD**2 + b2)
        scaled = 10.0 * t
        c_skip, c_out = 0.25 / (scaled**2 + 0.25), scaled / np.sqrt(scaled**2 + 0.25)
        mean = c_out * (MU + g * (mean - a * MU)) + c_skip * mean
        var = (c_out * g + c_skip) ** 2 * var
        if k + 1 < len(ts):
            a_next = np.sqrt(abar[ts[k + 1]])
            mean, var = a_next * mean, a_next**2 * var + 1.0 - abar[ts[k + 1]]
    return mean, np.sqrt(var)


@pytest.mark.parametrize("num_steps", [4, 50])
def test_lcm_with_the_exact_denoiser_follows_its_gaussian_closed_form(schedule, eps_model, num_steps):
    x = _run(eps_model, schedule, "lcm", num_steps, jax.random.key(6))
    mean, std = _lcm_gaussian_moments(schedule, num_steps)
    # 4 standard errors of a mean / std from 2000 samples per dimension.
    print("lcm", num_steps, "closed-form std / data std", std / SD, "sample std", x.std(0) / SD)
    assert np.all(np.abs(x.mean(0) - mean) < 4 * std / np.sqrt(BATCH)), (x.mean(0), mean)
    assert np.all(np.abs(x.std(0) - std) < 4 * std / np.sqrt(2 * BATCH)), (x.std(0), std)
    # The data is NOT recovered, by design: every step re-noises the posterior mean, whose
    # variance deficit at the noisy start is carried to the end (std / data std 0.66 pooled at
    # 50 steps, lower at 4). LCM needs a consistency model, whose output is a sample.
    assert np.all(std < SD)


def test_ddim_eta0_is_deterministic_given_x_T(schedule, eps_model):
    x_T = initial_noise(jax.random.key(5), (8, 4))
    a = sample(eps_model, schedule, (8, 4), jax.random.key(1), sampler="ddim", num_steps=20, x_T=x_T)
    b = sample(eps_model, schedule, (8, 4), jax.random.key(2), sampler="ddim", num_steps=20, x_T=x_T)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _vp_scales_at(schedule, t, ndim):
    sig = sigma_at(schedule, t).reshape((-1,) + (1,) * (ndim - 1))
    a = 1.0 / jnp.sqrt(1.0 + sig**2)
    return a, sig * a


@pytest.mark.parametrize(
    "sampler,options",
    [("ddim", {}), ("ddpm", {}), ("dpmpp_2m", {}), ("euler", {"karras_sigmas": True}), ("unipc_3", {}),
     ("dpmpp_2s", {})],
)
def test_x0_and_v_predictions_of_the_same_model_give_the_same_samples(schedule, eps_model, sampler, options):
    def x0_model(x, t):
        a, b = _vp_scales_at(schedule, t, x.ndim)
        return (x - b * eps_model(x, t)) / a

    def v_model(x, t):
        a, b = _vp_scales_at(schedule, t, x.ndim)
        eps = eps_model(x, t)
        return a * eps - b * (x - b * eps) / a

    run = lambda fn, pred: np.asarray(  # noqa: E731
        sample(fn, schedule, (16, 4), jax.random.key(4), sampler=sampler, num_steps=15, prediction=pred, **options)
    )
    ref = run(eps_model, "eps")
    np.testing.assert_allclose(run(x0_model, "x0"), ref, atol=2e-4)
    np.testing.assert_allclose(run(v_model, "v"), ref, atol=2e-4)


# --------------------------------------------------------------------------- transformations


def test_noise_of_an_example_does_not_depend_on_the_batch(schedule, eps_model):
    kw = dict(sampler="ddpm", num_steps=10)
    big = np.asarray(sample(eps_model, schedule, (4, 4), jax.random.key(9), **kw))
    small = np.asarray(sample(eps_model, schedule, (2, 4), jax.random.key(9), **kw))
    tail = np.asarray(sample(eps_model, schedule, (2, 4), jax.random.key(9), example_indices=jnp.array([2, 3]), **kw))
    np.testing.assert_allclose(small, big[:2], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(tail, big[2:], rtol=1e-6, atol=1e-6)
    assert np.abs(big[0] - big[1]).min() > 0  # distinct examples get distinct noise


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2m_sde"])
def test_jit_compiles_once_per_shape_and_traces_the_model_once(schedule, eps_model, sampler):
    model_traces = []

    def counting_model(x, t):
        model_traces.append(x.shape)
        return eps_model(x, t)

    @jax.jit
    @chex.assert_max_traces(n=1)  # all calls below have the same input shapes
    def generate(sched, key):
        return sample(counting_model, sched, (3, 4), key, sampler=sampler, num_steps=6)

    a = generate(schedule, jax.random.key(0))
    b = generate(schedule, jax.random.key(1))  # new key, same shape: no retrace
    assert len(model_traces) == 1  # 11 (heun) or 6 model evaluations, one trace: a scan, no Python loop
    assert not np.allclose(np.asarray(a), np.asarray(b))
    # The schedule was a traced argument; the eager call builds its plan in float64 NumPy.
    eager = sample(eps_model, schedule, (3, 4), jax.random.key(1), sampler=sampler, num_steps=6)
    np.testing.assert_allclose(np.asarray(b), np.asarray(eager), atol=2e-6)
    generate(make_schedule("linear", T, beta_end=0.03), jax.random.key(0))  # new values, same shapes
    assert len(model_traces) == 1
    chex.clear_trace_counter()


def test_vmap_over_keys_matches_separate_calls(schedule, eps_model):
    keys = jax.random.split(jax.random.key(11), 3)
    run = lambda k: sample(eps_model, schedule, (2, 4), k, sampler="ddim", eta=0.5, num_steps=8)  # noqa: E731
    batched = np.asarray(jax.vmap(run)(keys))
    for i in range(3):
        np.testing.assert_allclose(batched[i], np.asarray(run(keys[i])), atol=1e-6)


def test_trajectory_ends_at_the_output_and_predicts_x0(schedule, eps_model):
    out, traj = sample(eps_model, schedule, (5, 4), jax.random.key(2), sampler="heun", num_steps=5,
                       return_trajectory=True)
    assert traj.x.shape == (9, 5, 4) and traj.x0.shape == (9, 5, 4) and traj.t.shape == (9,)
    np.testing.assert_array_equal(np.asarray(traj.x[-1]), np.asarray(out))
    # The last prediction comes from the smallest noise level, close to the final sample.
    assert np.abs(np.asarray(traj.x0[-1]) - np.asarray(out)).max() < 1e-6


# --------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (dict(sampler="dpm++"), "'dpm++'"),
        (dict(num_steps=1001), "1001"),
        (dict(num_steps=0), "0"),
        (dict(spacing="uniform"), "'uniform'"),
        (dict(prediction="epsilon"), "'epsilon'"),
        (dict(variance="learned_range"), "'learned_range'"),
        (dict(sampler="euler", eta=0.5), "eta=0.5"),
        (dict(sampler="plms", thresholding="dynamic"), "'dynamic'"),
        (dict(sampler="ddim", karras_sigmas=True), "karras_sigmas=True"),
        (dict(sampler="ddim", variance="fixed_large"), "fixed_large"),
        (dict(eta=-1.0), "-1.0"),
        (dict(thresholding="dynamic", threshold_percentile=1.5), "1.5"),
        (dict(x_T=jnp.zeros((3, 5))), "(3, 5)"),
        (dict(example_indices=jnp.arange(4)), "(4,)"),
        (dict(sampler="dpmpp_2m", num_steps=1000, spacing="leading"), "num_steps=1000"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_value(schedule, eps_model, kwargs, fragment):
    with pytest.raises(ValueError) as info:
        sample(eps_model, schedule, (3, 4), jax.random.key(0), **kwargs)
    assert fragment in str(info.value), str(info.value)


def test_model_output_of_the_wrong_shape_raises(schedule):
    with pytest.raises(ValueError, match=r"\(3, 8\)"):
        sample(lambda x, t: jnp.concatenate([x, x], -1), schedule, (3, 4), jax.random.key(0), num_steps=3)
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        sample(lambda x, t: x, schedule, (3, 4), jax.random.key(0), num_steps=3, sampler="ddpm", variance="learned")


def test_every_registered_ddpm_sampler_is_covered():
    # Flow samplers have their own closed-form tests (test_flow_samplers.py).
    assert {name for name, spec in SAMPLERS.items() if spec.objective == "ddpm"} == {
        "dpmpp_2s", "euler_ancestral", "lcm", "unipc_1", "unipc_2", "unipc_3",
        "ddpm", "ddim", "plms", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "euler", "heun"}
