"""Flow samplers against closed forms for Gaussian and Gaussian-mixture data; reflow; the
objective checks between DDPM and flow schedules.

Data x0 ~ N(mu, diag(s^2)) (4 dimensions of different mean and scale) with the exact velocity
(ldm_jax.diffusion.analytic.gaussian_velocity_model). For Gaussian data the flow ODE is linear
and keeps each dimension's z-score; starting from pure noise x_1 at t = 1 it ends at

    x0 = mu + s x_1,

so every deterministic flow sampler must reproduce this map up to its discretisation error.
For a mixture, samples are assigned to the component with the largest posterior weight and
the component frequencies, means and stds are compared with the mixture's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion import analytic
from ldm_jax.diffusion.flow import make_flow_schedule
from ldm_jax.diffusion.reflow import pairs_velocity_model, reflow_pairs, straightness
from ldm_jax.diffusion.samplers import SAMPLERS, initial_noise, sample
from ldm_jax.diffusion.schedules import make_schedule

MU = np.array([0.5, -1.0, 0.2, 1.5])
SD = np.array([0.3, 1.0, 0.6, 0.8])
BATCH = 2000
SHAPE = (BATCH, 4)


@pytest.fixture(scope="module")
def schedules():
    return {1.0: make_flow_schedule(1.0), 3.0: make_flow_schedule(3.0)}


@pytest.fixture(scope="module")
def x_T():
    return np.asarray(initial_noise(jax.random.key(0), SHAPE), np.float64)


def _run(schedule, sampler, num_steps, key=jax.random.key(0), model=None, shape=SHAPE, **options):
    model = model or analytic.gaussian_velocity_model(schedule, MU, SD)
    return np.asarray(sample(model, schedule, shape, key, sampler=sampler, num_steps=num_steps, **options), np.float64)


def _assert_moments(x, extra_tolerance):
    z = (x - MU) / SD
    n = z.size
    assert abs(z.mean()) < 4.0 / np.sqrt(n) + extra_tolerance, z.mean()
    assert abs(z.std() - 1.0) < 4.0 / np.sqrt(2 * n) + extra_tolerance, z.std()
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=4.0 / np.sqrt(BATCH) + extra_tolerance)
    np.testing.assert_allclose(z.std(axis=0), 1.0, atol=4.0 / np.sqrt(2 * BATCH) + extra_tolerance)


# (sampler, shift, options, num_steps, order). Pointwise bounds C / n^order; measured maxima:
# Euler 0.11 (shift 1) and 0.16 (shift 3) at n = 40, i.e. <= 6.2 / n; Heun 0.004 / 0.015 / 0.031
# (shift 1 / shift 3 / Karras) at n = 20, i.e. <= 12.5 / n^2. The constants add margin.
ODE_CASES = [
    ("flow_euler", 1.0, {}, 40, 1),
    ("flow_euler", 3.0, {}, 40, 1),
    ("flow_euler", 1.0, {"spacing": "trailing"}, 40, 1),
    ("flow_heun", 1.0, {}, 20, 2),
    ("flow_heun", 3.0, {}, 20, 2),
    ("flow_heun", 1.0, {"karras_sigmas": True}, 20, 2),
]
ORDER_CONSTANT = {1: 9.0, 2: 20.0}


@pytest.mark.parametrize("sampler,shift,options,num_steps,order", ODE_CASES)
def test_flow_ode_samplers_follow_gaussian_flow_map(schedules, x_T, sampler, shift, options, num_steps, order):
    x = _run(schedules[shift], sampler, num_steps, **options)
    err = np.abs(x - (MU + SD * x_T)).max()
    bound = ORDER_CONSTANT[order] / num_steps**order
    assert err < bound, f"max |x - flow map| = {err:.3g} >= {bound:.3g}"
    _assert_moments(x, bound / SD.min())


def test_flow_euler_is_first_order_and_heun_second_order(schedules, x_T):
    def err(sampler, n):
        return np.abs(_run(schedules[1.0], sampler, n) - (MU + SD * x_T)).max()

    euler = err("flow_euler", 80) / err("flow_euler", 40)
    assert 0.4 < euler < 0.6, euler
    heun = err("flow_heun", 40) / err("flow_heun", 20)
    assert heun < 0.35, heun


@pytest.mark.parametrize("eta,num_steps,allowance", [(1.0, 200, 0.03), (0.5, 100, 0.03)])
def test_stochastic_flow_euler_reproduces_gaussian_moments(schedules, eta, num_steps, allowance):
    # eta = 1 is the DDPM posterior step in flow coordinates: first-order weak error, ~2% of
    # the std at 200 steps (measured 1.2%); eta = 0.5 sits between it and the ODE.
    x = _run(schedules[1.0], "flow_euler", num_steps, key=jax.random.key(3), eta=eta)
    _assert_moments(x, allowance)


# --------------------------------------------------------------------------- mixture

WEIGHTS = np.array([0.2, 0.5, 0.3])
MEANS = np.array([[-2.0, 0.0], [1.5, 1.5], [1.0, -2.0]])
STDS = np.array([0.3, 0.5, 0.4])


def _component_stats(x):
    log_p = np.log(WEIGHTS)[:, None] - 0.5 * (((x[None] - MEANS[:, None]) / STDS[:, None, None]) ** 2).sum(-1) - 2 * np.log(STDS)[:, None]
    label = log_p.argmax(0)
    freq = np.bincount(label, minlength=3) / len(x)
    means = np.stack([x[label == k].mean(0) for k in range(3)])
    stds = np.stack([x[label == k].std(0) for k in range(3)])
    return freq, means, stds


@pytest.mark.parametrize(
    "sampler,num_steps,options",
    [("flow_euler", 50, {}), ("flow_heun", 20, {}), ("flow_heun", 20, {"spacing": "trailing"}),
     ("flow_euler", 200, {"eta": 1.0})],
)
def test_flow_samplers_reproduce_gaussian_mixture_weights_means_stds(sampler, num_steps, options):
    schedule = make_flow_schedule(1.0)
    model = analytic.gaussian_mixture_velocity_model(schedule, WEIGHTS, MEANS, STDS)
    n = 4000
    x = _run(schedule, sampler, num_steps, key=jax.random.key(5), model=model, shape=(n, 2), **options)
    freq, means, stds = _component_stats(x)
    # Binomial standard error of a frequency <= 0.5 / sqrt(n) = 0.008; the components are
    # > 5 stds apart, so misassignment is negligible.
    np.testing.assert_allclose(freq, WEIGHTS, atol=4 * 0.5 / np.sqrt(n) + 0.01)
    np.testing.assert_allclose(means, MEANS, atol=0.05)
    np.testing.assert_allclose(stds, np.broadcast_to(STDS[:, None], stds.shape), rtol=0.08)


# --------------------------------------------------------------------------- reflow


def _mixture_w1(x, weights, means, stds):
    """Wasserstein-1 distance of 1-D samples to a Gaussian mixture: int |F_n - F| dx (float64)."""
    from scipy.stats import norm

    grid = np.linspace(-6, 6, 24001)
    exact = sum(w * norm.cdf((grid - m) / s) for w, m, s in zip(weights, means, stds))
    empirical = np.searchsorted(np.sort(x), grid, side="right") / len(x)
    return np.abs(empirical - exact).sum() * (grid[1] - grid[0])


def test_reflow_straightens_paths_fewer_euler_steps_for_the_same_error():
    """1-D two-component mixture. The 1-rectified flow (exact mixture velocity) needs many Euler
    steps; the reflowed coupling (ODE pairs, velocity by kernel regression on the pairs, i.e. a
    perfectly trained second flow) needs far fewer for the same Wasserstein-1 error, and its
    measured straightness S is far smaller."""
    weights, means, stds = np.array([0.35, 0.65]), np.array([[-1.5], [1.2]]), np.array([0.3, 0.4])
    schedule = make_flow_schedule(1.0)
    v1 = analytic.gaussian_mixture_velocity_model(schedule, weights, means, stds)
    pairs_noise = initial_noise(jax.random.key(1), (2000, 1))
    x0_pairs, noise_pairs = reflow_pairs(v1, schedule, pairs_noise, sampler="flow_heun", num_steps=40)
    v2 = pairs_velocity_model(schedule, x0_pairs, noise_pairs, bandwidth=0.03)

    test_noise = initial_noise(jax.random.key(2), (2000, 1))
    def err(model, n):
        x = np.asarray(sample(model, schedule, (2000, 1), jax.random.key(0), sampler="flow_euler", num_steps=n,
                              x_T=test_noise))[:, 0]
        return _mixture_w1(x, weights, means[:, 0], stds)

    e1 = {n: err(v1, n) for n in (2, 16)}
    e2 = {n: err(v2, n) for n in (1, 2)}
    s1 = float(straightness(v1, schedule, test_noise[:500], num_steps=8))
    s2 = float(straightness(v2, schedule, test_noise[:500], num_steps=8))
    print("1-rectified W1", e1, "S", s1, "| reflowed W1", e2, "S", s2)
    # Measured (2000 pairs, 2000 test samples): W1 of the 1-rectified flow 1.23 / 0.077 at 2 / 16
    # Euler steps (0.053 at 32); reflowed 0.046 at 1 and 2 steps (the sampling-noise floor of
    # 2000 samples plus the kernel's bias); S 0.65 vs 7e-5.
    assert e2[2] < e1[16], (e1, e2)  # 8x fewer steps, smaller error
    assert e2[1] < 0.1 * e1[2], (e1, e2)
    assert s2 < 0.01 * s1, (s1, s2)


# --------------------------------------------------------------------------- objectives, jit, arguments


def test_flow_samplers_refuse_ddpm_schedules_and_ddpm_samplers_refuse_flow_schedules(schedules):
    ddpm = make_schedule("linear", 1000)
    velocity = analytic.gaussian_velocity_model(schedules[1.0], MU, SD)
    for sampler in ("flow_euler", "flow_heun"):
        with pytest.raises(ValueError, match=rf"sampler '{sampler}' integrates a flow-matching model and cannot run a DDPM") as info:
            sample(velocity, ddpm, (2, 4), jax.random.key(0), sampler=sampler, num_steps=4)
        assert "\n" not in str(info.value)
    for sampler in [name for name, spec in SAMPLERS.items() if spec.objective == "ddpm"]:
        with pytest.raises(ValueError, match=rf"sampler '{sampler}' integrates a DDPM .* cannot run a flow-matching") as info:
            sample(velocity, schedules[1.0], (2, 4), jax.random.key(0), sampler=sampler, num_steps=4)
        assert "flow_euler" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (dict(prediction="v"), "'v'"),
        (dict(prediction="eps"), "'eps'"),
        (dict(spacing="leading"), "'leading'"),
        (dict(sigmas=(1.0, 1.0, 0.5)), "decreasing"),
        (dict(sigmas=(1.0, 0.5), num_steps=3), "num_steps=3"),
        (dict(set_alpha_to_one=False), "set_alpha_to_one=False"),
        (dict(guidance=2.0), "'guidance'"),
        (dict(sampler="flow_heun", eta=0.5), "eta=0.5"),
    ],
)
def test_bad_flow_sampler_arguments_raise_value_error_naming_the_value(schedules, kwargs, fragment):
    kwargs = {"sampler": "flow_euler", **kwargs}
    with pytest.raises(ValueError) as info:
        sample(lambda x, t: x, schedules[1.0], (3, 4), jax.random.key(0), **kwargs)
    assert fragment in str(info.value), str(info.value)


def test_dynamic_shifting_needs_mu_or_image_seq_len_and_image_seq_len_gives_mu():
    flux = make_flow_schedule(dynamic_shifting=True)
    model = analytic.gaussian_velocity_model(flux, MU, SD)
    with pytest.raises(ValueError, match="dynamic shifting"):
        sample(model, flux, (3, 4), jax.random.key(0), sampler="flow_euler", num_steps=4)
    # image_seq_len 4096 gives mu = max_shift = 1.15.
    by_len = sample(model, flux, (3, 4), jax.random.key(0), sampler="flow_euler", num_steps=4, image_seq_len=4096)
    by_mu = sample(model, flux, (3, 4), jax.random.key(0), sampler="flow_euler", num_steps=4, mu=1.15)
    np.testing.assert_allclose(np.asarray(by_len), np.asarray(by_mu), rtol=1e-6)


def test_traced_flow_schedule_compiles_once_and_matches_eager(schedules):
    model = lambda x, t: x * 0.3 - 0.01 * t[:, None] / 1000  # noqa: E731
    traces = []

    @jax.jit
    def generate(schedule, key):
        traces.append(1)
        return sample(model, schedule, (3, 4), key, sampler="flow_heun", num_steps=5)

    a = generate(schedules[3.0], jax.random.key(1))
    b = generate(make_flow_schedule(2.0), jax.random.key(1))  # new shift, same static fields
    assert len(traces) == 1
    np.testing.assert_allclose(np.asarray(a), np.asarray(sample(model, schedules[3.0], (3, 4), jax.random.key(1),
                                                                 sampler="flow_heun", num_steps=5)), atol=2e-6)
    assert not np.allclose(np.asarray(a), np.asarray(b))


def test_flow_img2img_strength_one_from_data_is_sampling_and_zero_is_identity(schedules):
    from ldm_jax.diffusion.editing import img2img

    model = analytic.gaussian_velocity_model(schedules[1.0], MU, SD)
    init = jnp.asarray(np.random.default_rng(0).normal(size=(64, 4)), jnp.float32)
    same = img2img(model, schedules[1.0], init, jax.random.key(0), strength=0.0, sampler="flow_euler", num_steps=10)
    np.testing.assert_array_equal(np.asarray(same), np.asarray(init))
    # strength 1 starts at t = 1, where (1 - t) init + t eps is pure noise: a plain sample.
    full = img2img(model, schedules[1.0], init, jax.random.key(0), strength=1.0, sampler="flow_heun", num_steps=10)
    plain = sample(model, schedules[1.0], (64, 4), jax.random.key(0), sampler="flow_heun", num_steps=10)
    np.testing.assert_allclose(np.asarray(full), np.asarray(plain), atol=1e-5)


def test_every_registered_flow_sampler_is_covered():
    assert {name for name, spec in SAMPLERS.items() if spec.objective == "flow"} == {"flow_euler", "flow_heun"}


def test_flow_inpainting_keeps_the_known_region_and_generates_the_rest_as_sampling(schedules):
    from ldm_jax.diffusion.editing import inpaint

    model = analytic.gaussian_velocity_model(schedules[1.0], MU, SD)
    original = jnp.asarray(MU + SD * np.random.default_rng(1).normal(size=(256, 4)), jnp.float32)
    mask = jnp.asarray([1.0, 1.0, 0.0, 0.0])  # keep dims 0-1, generate 2-3
    run = lambda **kw: np.asarray(inpaint(model, schedules[1.0], original, mask, jax.random.key(0),  # noqa: E731
                                          sampler="flow_euler", num_steps=20, **kw))
    out = run()
    np.testing.assert_array_equal(out[:, :2], np.asarray(original)[:, :2])
    # The dimensions are independent under the exact velocity, so the generated ones are what
    # plain sampling from the same x_T gives.
    plain = np.asarray(sample(model, schedules[1.0], (256, 4), jax.random.key(0), sampler="flow_euler", num_steps=20))
    np.testing.assert_allclose(out[:, 2:], plain[:, 2:], atol=1e-5)
    # RePaint jumps (flow renoising x_in = (a_in / a_out) x_out + sqrt(b_in^2 - (a_in b_out / a_out)^2) z):
    # known region kept, the rest near its marginal. With 20 steps both this and DDIM on a DDPM
    # schedule are off by ~0.19 std in the mean of the last dimension (measured; -0.08 at 100 steps).
    jumped = run(jump_length=5, jump_n_sample=2)
    np.testing.assert_array_equal(jumped[:, :2], np.asarray(original)[:, :2])
    z = (jumped[:, 2:] - MU[2:]) / SD[2:]
    assert np.all(np.abs(z.mean(0)) < 0.35) and np.all(np.abs(z.std(0) - 1.0) < 0.2), (z.mean(0), z.std(0))
