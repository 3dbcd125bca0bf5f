"""Flow-matching math against independent references: diffusers' shift / dynamic-shift
functions, closed-form CDFs of the training-time densities, float64 NumPy re-implementations of
the loss and its weightings, and numerical integration for the analytic mixture velocity."""

from __future__ import annotations

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from scipy.stats import norm

from ldm_jax.diffusion import analytic
from ldm_jax.diffusion import flow as F


def test_interpolant_and_velocity_conversions_are_consistent():
    rng = np.random.default_rng(0)
    x0, eps = rng.normal(size=(5, 3, 2)), rng.normal(size=(5, 3, 2))
    t = np.array([0.05, 0.3, 0.5, 0.8, 0.99])
    x_t = np.asarray(F.flow_interpolate(jnp.asarray(x0), jnp.asarray(eps), jnp.asarray(t)), np.float64)
    np.testing.assert_allclose(x_t, (1 - t)[:, None, None] * x0 + t[:, None, None] * eps, rtol=1e-6, atol=1e-6)
    v = eps - x0
    np.testing.assert_allclose(F.velocity_target(x0, eps), v)
    j = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    np.testing.assert_allclose(F.x0_from_velocity(j(x_t), j(t), j(v)), x0, atol=1e-5)
    np.testing.assert_allclose(F.eps_from_velocity(j(x_t), j(t), j(v)), eps, atol=1e-5)
    np.testing.assert_allclose(F.velocity_from_eps(j(x_t), j(t), j(eps)), v, atol=2e-4)
    np.testing.assert_allclose(F.velocity_from_x0(j(x_t), j(t), j(x0)), v, atol=2e-4)
    for prediction, out in (("velocity", v), ("eps", eps), ("x0", x0)):
        e, x = F.flow_eps_and_x0(j(out), j(x_t), j(t), prediction)
        np.testing.assert_allclose(e, eps, atol=2e-4)
        np.testing.assert_allclose(x, x0, atol=2e-4)


def test_shifts_match_diffusers_scheduler_and_flux_calculate_shift():
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    grid = np.linspace(1, 1000, 1000)[::-1] / 1000
    np.testing.assert_allclose(F.shift_time(grid, 3.0), sched.sigmas.numpy(), rtol=1e-6)
    for mu in (0.5, 1.15):
        for kind in ("exponential", "linear"):
            s = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type=kind)
            np.testing.assert_allclose(F.time_shift(grid, mu, kind), s.time_shift(mu, 1.0, grid), rtol=1e-12)
    for seq in (256, 1024, 4096, 6000):
        assert F.dynamic_shift_mu(seq) == pytest.approx(calculate_shift(seq), rel=1e-12)
        assert F.schedule_mu(F.make_flow_schedule(dynamic_shifting=True), seq) == pytest.approx(calculate_shift(seq), rel=1e-6)
    seq = np.array([1.0, 0.7, 0.4, 0.2])
    s = diffusers.FlowMatchEulerDiscreteScheduler(shift_terminal=0.1)
    np.testing.assert_allclose(F.stretch_to_terminal(seq, 0.1), s.stretch_shift_to_terminal(torch.tensor(seq)).numpy(), rtol=1e-12)


def _ks(samples, cdf):
    x = np.sort(np.asarray(samples, np.float64))
    n = len(x)
    c = cdf(x)
    return max(np.abs(c - np.arange(1, n + 1) / n).max(), np.abs(c - np.arange(n) / n).max())


@pytest.mark.parametrize(
    "density,kw",
    [("uniform", {}), ("logit_normal", dict(logit_mean=0.3, logit_std=0.8)), ("mode", dict(mode_scale=1.29)),
     ("mode", dict(mode_scale=-0.5)), ("cosmap", {})],
)
def test_time_densities_match_their_closed_form_cdfs(density, kw):
    n = 20000
    t = np.asarray(F.sample_flow_time(jax.random.key(0), n, density=density, **kw), np.float64)
    assert t.min() >= 0 and t.max() <= 1
    if density == "uniform":
        cdf = lambda x: x  # noqa: E731
    elif density == "logit_normal":
        cdf = lambda x: norm.cdf((np.log(x / (1 - x)) - kw["logit_mean"]) / kw["logit_std"])  # noqa: E731
    elif density == "mode":
        # t = f(u) decreasing from 1 to 0, so P(T <= f(u)) = 1 - u; invert f on a fine grid.
        u = np.linspace(0, 1, 200001)
        f = 1 - u - kw["mode_scale"] * (np.cos(np.pi * u / 2) ** 2 - 1 + u)
        cdf = lambda x: 1 - np.interp(x, f[::-1], u[::-1])  # noqa: E731
    else:
        cdf = lambda x: 2 / np.pi * np.arctan(x / (1 - x))  # t = 1 - 1/(tan(pi u/2) + 1)  # noqa: E731
    # Kolmogorov-Smirnov: the 0.1% critical value is 1.95 / sqrt(n).
    assert _ks(t, cdf) < 1.95 / np.sqrt(n)


def _numpy_flow_loss(model, x0, eps, t, prediction, weighting, gamma=5.0):
    x_t = (1 - t)[:, None] * x0 + t[:, None] * eps
    out = model(x_t, 1000 * t)
    target = {"velocity": eps - x0, "eps": eps, "x0": x0}[prediction]
    mse = ((out - target) ** 2).mean(1)
    snr = ((1 - t) / t) ** 2
    x0_factor = {"velocity": t**2, "eps": 1 / snr, "x0": np.ones_like(t)}[prediction]  # x0-MSE / MSE
    weight = {
        "simple": np.ones_like(t),
        "min_snr": np.minimum(snr, gamma) * x0_factor,
        "sigma_sqrt": t**-2.0,
        "cosmap": 2 / (np.pi * (1 - 2 * t + 2 * t**2)),
    }[weighting]
    return weight * mse


@pytest.mark.parametrize("prediction", ["velocity", "eps", "x0"])
@pytest.mark.parametrize("weighting", ["simple", "min_snr", "sigma_sqrt", "cosmap"])
def test_flow_loss_matches_float64_numpy(prediction, weighting):
    rng = np.random.default_rng(1)
    x0, eps = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    t = np.array([0.02, 0.2, 0.45, 0.6, 0.9, 0.97])
    w = rng.normal(size=(5, 5)) * 0.3
    model_np = lambda x, tt: np.tanh(x @ w) + 1e-3 * tt[:, None]  # noqa: E731
    model_j = lambda x, tt: jnp.tanh(x @ jnp.asarray(w, jnp.float32)) + 1e-3 * tt[:, None]  # noqa: E731
    ours = F.flow_loss(F.make_flow_schedule(), model_j, jnp.asarray(x0, jnp.float32), jax.random.key(0),
                       prediction=prediction, weighting=weighting, t=jnp.asarray(t), noise=jnp.asarray(eps, jnp.float32),
                       reduce="none")
    np.testing.assert_allclose(ours, _numpy_flow_loss(model_np, x0, eps, t, prediction, weighting), rtol=2e-5)


def test_min_snr_weights_the_same_x0_error_equally_across_parameterisations():
    # One x0 estimate expressed as a velocity, eps and x0 prediction: Min-SNR losses must agree.
    rng = np.random.default_rng(2)
    x0 = jnp.asarray(rng.normal(size=(64, 3)), jnp.float32)
    schedule = F.make_flow_schedule(3.0)
    guess = lambda x_t: 0.7 * x_t + 0.1  # noqa: E731

    def model(prediction):
        def fn(x_t, timestep):
            t = timestep / 1000
            x0_hat = guess(x_t)
            return {"x0": x0_hat, "velocity": F.velocity_from_x0(x_t, t, x0_hat),
                    "eps": F.eps_from_velocity(x_t, t, F.velocity_from_x0(x_t, t, x0_hat))}[prediction]
        return fn

    losses = [F.flow_loss(schedule, model(p), x0, jax.random.key(3), prediction=p, weighting="min_snr", reduce="none")
              for p in ("x0", "velocity", "eps")]
    np.testing.assert_allclose(losses[1], losses[0], rtol=2e-3)
    np.testing.assert_allclose(losses[2], losses[0], rtol=2e-3)


def test_flow_loss_samples_shifted_times_and_rejects_bad_input():
    schedule = F.make_flow_schedule(3.0)
    x0 = jnp.zeros((4000, 1))
    terms = F.flow_loss_terms(schedule, lambda x, t: x, x0, jax.random.key(0))
    # Uniform u shifted by s = 3: P(t <= y) = P(u <= y / (s - (s - 1) y)).
    y = np.array([0.25, 0.5, 0.75])
    emp = (np.asarray(terms["t"])[:, None] <= y).mean(0)
    np.testing.assert_allclose(emp, y / (3 - 2 * y), atol=0.03)
    with pytest.raises(ValueError, match="FlowSchedule"):
        F.flow_loss(__import__("ldm_jax").diffusion.make_schedule(), lambda x, t: x, x0, jax.random.key(0))
    with pytest.raises(ValueError, match="'v'"):
        F.flow_loss(schedule, lambda x, t: x, x0, jax.random.key(0), prediction="v")
    with pytest.raises(ValueError, match="'snr'"):
        F.flow_loss(schedule, lambda x, t: x, x0, jax.random.key(0), weighting="snr")
    with pytest.raises(ValueError, match="mu"):
        F.flow_loss(F.make_flow_schedule(dynamic_shifting=True), lambda x, t: x, x0, jax.random.key(0))
    with pytest.raises(ValueError, match=r"\(3,\)"):
        F.flow_loss(schedule, lambda x, t: x, x0, jax.random.key(0), t=jnp.ones(3) * 0.5)


def test_analytic_mixture_velocity_matches_numerical_integration():
    # 1-D mixture: E[eps - x0 | x_t] by quadrature over x0 (float64), p(x0 | x_t) ∝ p(x0) N(x_t; (1-t) x0, t^2).
    weights, means, stds = np.array([0.3, 0.7]), np.array([[-1.0], [1.5]]), np.array([0.4, 0.25])
    schedule = F.make_flow_schedule()
    model = analytic.gaussian_mixture_velocity_model(schedule, weights, means, stds)
    grid = np.linspace(-5, 5, 40001)
    prior = sum(w * norm.pdf(grid, m[0], s) for w, m, s in zip(weights, means, stds))
    for t in (0.1, 0.5, 0.9):
        x_t = np.array([-1.2, 0.0, 0.4, 1.7])
        like = norm.pdf(x_t[:, None], (1 - t) * grid[None], t)
        post = prior[None] * like
        e_x0 = (post * grid).sum(1) / post.sum(1)
        e_eps = (x_t - (1 - t) * e_x0) / t
        ours = np.asarray(model(jnp.asarray(x_t[:, None], jnp.float32), jnp.full((4,), 1000 * t)))[:, 0]
        np.testing.assert_allclose(ours, e_eps - e_x0, rtol=2e-4, atol=2e-4)
    # One component: the Gaussian model.
    g = analytic.gaussian_velocity_model(schedule, 0.3, 0.5)
    m = analytic.gaussian_mixture_velocity_model(schedule, [1.0], [[0.3]], [0.5])
    x = jnp.linspace(-2, 2, 7)[:, None]
    np.testing.assert_allclose(g(x, jnp.full((7,), 400.0)), m(x, jnp.full((7,), 400.0)), rtol=1e-5, atol=1e-6)


def test_mixture_eps_model_matches_gaussian_eps_model_for_one_component():
    from ldm_jax.diffusion.schedules import make_schedule

    schedule = make_schedule("linear", 1000)
    g = analytic.gaussian_eps_model(schedule, 0.3, 0.5)
    m = analytic.gaussian_mixture_eps_model(schedule, [1.0], [[0.3, 0.3]], [0.5])
    x = jnp.linspace(-2, 2, 14).reshape(7, 2)
    t = jnp.array([0, 10, 100, 300, 500, 800, 999])
    np.testing.assert_allclose(g(x, t), m(x, t), rtol=1e-5, atol=1e-6)


def test_flow_schedule_config_round_trips_and_bad_values_raise():
    import json

    schedule = F.make_flow_schedule(dynamic_shifting=True, base_shift=0.4, max_shift=1.2, max_seq_len=8192,
                                    time_shift_type="linear", shift_terminal=0.05)
    config = json.loads(json.dumps(F.flow_schedule_config(schedule)))
    rebuilt = F.make_flow_schedule(**config)
    assert jax.tree.structure(rebuilt) == jax.tree.structure(schedule)
    for a, b in zip(jax.tree.leaves(rebuilt), jax.tree.leaves(schedule)):
        np.testing.assert_array_equal(a, b)
    for kwargs, fragment in [(dict(shift=0.0), "shift"), (dict(time_shift_type="cubic"), "'cubic'"),
                             (dict(shift_terminal=1.5), "1.5"), (dict(num_train_timesteps=0), "0"),
                             (dict(base_seq_len=5000), "max_seq_len")]:
        with pytest.raises(ValueError, match=fragment):
            F.make_flow_schedule(**kwargs)
