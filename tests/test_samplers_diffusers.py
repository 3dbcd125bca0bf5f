"""Samplers and timestep sequences against diffusers' PyTorch schedulers, step by step.

Both sides run their own full sampling loop with the same deterministic model (a fixed
nonlinear function of x and t written identically in torch and jnp), the same x_T and, for
stochastic samplers, the same per-step noise (ours, fed to diffusers through
``variance_noise`` or by replacing its ``randn_tensor``). Every intermediate state and the
model timesteps are compared. The diffusers scheduler is given our float32
``alphas_cumprod`` (float64-derived; diffusers' own float32 cumprod differs by ~1e-6
relative) so the comparison measures the samplers, not the schedule.
"""

from __future__ import annotations

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ldm_jax.diffusion.samplers import per_example_normal, sample, stream_key
from ldm_jax.diffusion.samplers.noise import STREAM_STEP
from ldm_jax.diffusion.schedules import make_schedule, sigma_at
from ldm_jax.diffusion.timesteps import (
    discrete_timesteps,
    dpm_solver_timesteps,
    karras_sigmas,
    plms_timesteps,
    repaint_events,
    sigma_to_timestep,
)

T = 1000
SHAPE = (3, 6)
# Relative agreement per step: max|ours - diffusers| / max(1, max|diffusers|). Measured
# worst case over all configurations: 3e-6 (float32 rounding, amplified along the chain).
RTOL = 1e-5


def model_jnp(x, t, learned=False):
    t = jnp.asarray(t, jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
    out = jnp.tanh(0.9 * x + 0.05) * (0.6 + 0.3 * jnp.cos(0.007 * t)) + 0.1 * x
    if learned:
        out = jnp.concatenate([out, jnp.tanh(0.5 * x + 0.2 * jnp.sin(0.01 * t))], axis=-1)
    return out


def model_torch(x, t, learned=False):
    t = torch.as_tensor(t, dtype=torch.float32)
    out = torch.tanh(0.9 * x + 0.05) * (0.6 + 0.3 * torch.cos(0.007 * t)) + 0.1 * x
    if learned:
        out = torch.cat([out, torch.tanh(0.5 * x + 0.2 * torch.sin(0.01 * t))], dim=-1)
    return out


@pytest.fixture(scope="module")
def schedules():
    return {
        "linear": make_schedule("linear", T),
        "scaled_linear": make_schedule("scaled_linear", T),
    }


def _our_noise(key, event):
    return np.array(per_example_normal(stream_key(key, STREAM_STEP, event), jnp.arange(SHAPE[0]), SHAPE[1:]))


def _share_schedule(sched, schedule):
    abar = torch.from_numpy(np.array(schedule.alphas_cumprod))
    sched.alphas_cumprod = abar
    if hasattr(sched, "final_alpha_cumprod"):
        sched.final_alpha_cumprod = torch.tensor(1.0) if sched.config.set_alpha_to_one else abar[0]


def run_diffusers(sched, schedule, num_steps, x_T, key, *, learned=False, noise_kw=None, **step_kw):
    """diffusers' sampling loop; returns (states after each step in VP scale, model timesteps)."""
    _share_schedule(sched, schedule)
    sched.set_timesteps(num_steps)
    x = torch.from_numpy(np.asarray(x_T)) * sched.init_noise_sigma
    states, seen_t = [], []
    ve = hasattr(sched, "sigmas") and not isinstance(sched, diffusers.DPMSolverMultistepScheduler)
    for i, t in enumerate(sched.timesteps):
        inp = sched.scale_model_input(x, t)
        out = model_torch(inp, t, learned)
        kw = dict(step_kw)
        if noise_kw is not None:
            kw[noise_kw] = torch.from_numpy(_our_noise(key, i))
        x = sched.step(out, t, x, **kw).prev_sample
        seen_t.append(float(t))
        vp = x / torch.sqrt(sched.sigmas[i + 1] ** 2 + 1) if ve else x
        states.append(vp.numpy().copy())
    return np.stack(states), np.array(seen_t)


def run_ours(schedule, x_T, key, **kw):
    learned = kw.get("variance") == "learned"
    fn = lambda x, t: model_jnp(x, t, learned)  # noqa: E731
    out, traj = sample(fn, schedule, x_T.shape, key, x_T=x_T, return_trajectory=True, **kw)
    return np.asarray(out), np.asarray(traj.x), np.asarray(traj.t)


def assert_same_run(ours, theirs):
    out, states, ts = ours
    ref_states, ref_ts = theirs
    assert states.shape == ref_states.shape, (states.shape, ref_states.shape)
    # Fractional (Karras) timesteps differ by up to ~1.5e-3: diffusers forms 1 - abar in
    # float32, so its sigma_min is off by ~3e-5 relative, and it interpolates in float64
    # where we use float32 (the interpolation alone: test_karras_sigmas_and_sigma_to_timestep...).
    np.testing.assert_allclose(ts, ref_ts, rtol=0, atol=2e-3)
    axes = tuple(range(1, states.ndim))
    err = np.abs(states - ref_states).max(axis=axes) / np.maximum(1.0, np.abs(ref_states).max(axis=axes))
    assert err.max() < RTOL, f"worst step {err.argmax()} of {len(err)}: relative error {err.max():.2e}"
    np.testing.assert_array_equal(out, states[-1])
    return err.max()


@pytest.fixture(scope="module")
def x_T():
    return np.array(jax.random.normal(jax.random.key(7), SHAPE), np.float32)  # writable, for torch.from_numpy


# --------------------------------------------------------------------------- timesteps


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("num_steps,offset", [(50, 1), (7, 0), (1000, 0), (13, 1)])
def test_timesteps_match_diffusers_set_timesteps(spacing, num_steps, offset):
    ddim = diffusers.DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
    ddim.set_timesteps(num_steps)
    np.testing.assert_array_equal(
        discrete_timesteps(T, num_steps, spacing, offset), ddim.timesteps.numpy()
    )
    euler = diffusers.EulerDiscreteScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
    euler.set_timesteps(num_steps)
    np.testing.assert_allclose(
        discrete_timesteps(T, num_steps, spacing, offset, rounded=False), euler.timesteps.numpy(), rtol=1e-6
    )
    pndm = diffusers.PNDMScheduler(
        num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset, skip_prk_steps=True
    )
    pndm.set_timesteps(num_steps)
    np.testing.assert_array_equal(
        plms_timesteps(discrete_timesteps(T, num_steps, spacing, offset)), pndm.timesteps.numpy()
    )
    dpm = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
    dpm.set_timesteps(num_steps)
    np.testing.assert_array_equal(dpm_solver_timesteps(T, num_steps, spacing, offset), dpm.timesteps.numpy())


def test_karras_sigmas_and_sigma_to_timestep_match_diffusers(schedules):
    schedule = schedules["scaled_linear"]
    sched = diffusers.EulerDiscreteScheduler(num_train_timesteps=T, use_karras_sigmas=True)
    sig = np.array(schedule.sigmas, np.float64)
    ts = discrete_timesteps(T, 30, "leading", 1)  # 958 .. 1
    in_sigmas = sig[ts]
    ref = sched._convert_to_karras(in_sigmas=torch.from_numpy(in_sigmas), num_inference_steps=30)
    np.testing.assert_allclose(karras_sigmas(sig[ts[-1]], sig[ts[0]], 30), ref, rtol=1e-12)
    # Same sigmas and log-sigma table on both sides: only float32 (ours) vs float64 rounding.
    ref_t = sched._sigma_to_t(ref, np.log(sig))
    t_ours = np.asarray(sigma_to_timestep(jnp.asarray(ref, jnp.float32), schedule.sigmas))
    np.testing.assert_allclose(t_ours, ref_t, rtol=0, atol=3e-4)
    # Round trip with the schedule's own fractional-timestep sigma.
    np.testing.assert_allclose(np.asarray(sigma_at(schedule, t_ours)), ref, rtol=2e-5)
    # Out-of-range sigmas clamp to the ends, as diffusers' _sigma_to_t.
    ends = np.asarray(sigma_to_timestep(jnp.array([1e-6, 1e6]), schedule.sigmas))
    np.testing.assert_allclose(ends, [0.0, T - 1])
    np.testing.assert_allclose(sched._sigma_to_t(np.array([1e-6, 1e6]), np.log(sig)), [0.0, T - 1])


def test_repaint_events_follow_diffusers_repaint_order():
    sched = diffusers.RePaintScheduler(num_train_timesteps=T)
    sched.set_timesteps(20, jump_length=3, jump_n_sample=3)
    levels = sched.timesteps.numpy() // (T // 20)
    kinds, last = [], 20
    for u in levels:
        kinds.append(("denoise" if u < last else "renoise", 20 - 1 - int(u)))
        last = u
    assert repaint_events(20, 3, 3) == kinds


# --------------------------------------------------------------------------- samplers


@pytest.mark.parametrize(
    "variance,prediction,clip",
    [("fixed_small", "eps", False), ("fixed_large", "v", False), ("learned", "eps", True)],
)
def test_ddpm_matches_diffusers_ddpm_scheduler(schedules, x_T, monkeypatch, variance, prediction, clip):
    schedule, key = schedules["linear"], jax.random.key(1)
    diff_var = {"learned": "learned_range"}.get(variance, variance)
    diff_pred = {"eps": "epsilon", "v": "v_prediction"}[prediction]
    sched = diffusers.DDPMScheduler(
        num_train_timesteps=T, variance_type=diff_var, prediction_type=diff_pred, clip_sample=clip
    )
    step = {"i": 0}

    def fake_randn(shape, generator=None, device=None, dtype=None, **_):
        return torch.from_numpy(_our_noise(key, step["i"]))

    monkeypatch.setattr(diffusers.schedulers.scheduling_ddpm, "randn_tensor", fake_randn)
    _share_schedule(sched, schedule)
    sched.set_timesteps(40)
    x = torch.from_numpy(x_T)
    states, ts = [], []
    for i, t in enumerate(sched.timesteps):
        step["i"] = i
        x = sched.step(model_torch(x, t, variance == "learned"), t, x).prev_sample
        states.append(x.numpy().copy())
        ts.append(float(t))
    ours = run_ours(
        schedule, x_T, key, sampler="ddpm", num_steps=40, variance=variance, prediction=prediction,
        thresholding="static" if clip else None,
    )
    assert_same_run(ours, (np.stack(states), np.array(ts)))


@pytest.mark.parametrize(
    "eta,spacing,offset,alpha_one,prediction",
    [(0.0, "leading", 1, False, "eps"), (0.7, "trailing", 0, True, "v"), (1.0, "leading", 0, True, "x0")],
)
def test_ddim_matches_diffusers_ddim_scheduler(schedules, x_T, eta, spacing, offset, alpha_one, prediction):
    schedule, key = schedules["scaled_linear"], jax.random.key(2)
    diff_pred = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[prediction]
    sched = diffusers.DDIMScheduler(
        num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset, set_alpha_to_one=alpha_one,
        prediction_type=diff_pred, clip_sample=False,
    )
    theirs = run_diffusers(sched, schedule, 25, x_T, key, noise_kw="variance_noise" if eta > 0 else None, eta=eta)
    ours = run_ours(
        schedule, x_T, key, sampler="ddim", num_steps=25, eta=eta, spacing=spacing, steps_offset=offset,
        set_alpha_to_one=alpha_one, prediction=prediction,
    )
    assert_same_run(ours, theirs)


def test_ddim_dynamic_thresholding_matches_diffusers(schedules, x_T):
    schedule, key = schedules["linear"], jax.random.key(3)
    sched = diffusers.DDIMScheduler(num_train_timesteps=T, thresholding=True, dynamic_thresholding_ratio=0.8,
                                    sample_max_value=1.3, clip_sample=False)
    x_big = 2.0 * x_T.reshape(3, 2, 3)  # diffusers' thresholding needs [B, C, ...]; large so it bites
    theirs = run_diffusers(sched, schedule, 20, x_big, key)
    ours = run_ours(schedule, x_big, key, sampler="ddim", num_steps=20, thresholding="dynamic",
                    threshold_percentile=0.8, threshold_max=1.3)
    assert_same_run(ours, theirs)


def test_plms_matches_diffusers_pndm_skip_prk_stable_diffusion_config(schedules, x_T):
    schedule, key = schedules["scaled_linear"], jax.random.key(4)
    sched = diffusers.PNDMScheduler(
        num_train_timesteps=T, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
        beta_schedule="scaled_linear",
    )
    theirs = run_diffusers(sched, schedule, 30, x_T, key)
    ours = run_ours(schedule, x_T, key, sampler="plms", num_steps=30, steps_offset=1, set_alpha_to_one=False)
    assert_same_run(ours, theirs)


@pytest.mark.parametrize(
    "sampler,num_steps,spacing,karras,prediction",
    [
        ("dpmpp_2m", 20, "linspace", False, "eps"),
        ("dpmpp_2m", 10, "leading", True, "v"),
        ("dpmpp_3m", 12, "linspace", False, "eps"),
        ("dpmpp_3m", 20, "trailing", True, "x0"),
        ("dpmpp_2m_sde", 15, "linspace", True, "eps"),
    ],
)
def test_dpm_solver_pp_matches_diffusers_multistep(schedules, x_T, sampler, num_steps, spacing, karras, prediction):
    schedule, key = schedules["scaled_linear"], jax.random.key(5)
    sched = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=T,
        solver_order=3 if sampler == "dpmpp_3m" else 2,
        algorithm_type="sde-dpmsolver++" if sampler.endswith("sde") else "dpmsolver++",
        use_karras_sigmas=karras,
        timestep_spacing=spacing,
        prediction_type={"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[prediction],
    )
    theirs = run_diffusers(sched, schedule, num_steps, x_T, key,
                           noise_kw="variance_noise" if sampler.endswith("sde") else None)
    ours = run_ours(schedule, x_T, key, sampler=sampler, num_steps=num_steps, spacing=spacing,
                    karras_sigmas=karras, prediction=prediction)
    assert_same_run(ours, theirs)


@pytest.mark.parametrize(
    "sampler,num_steps,spacing,offset,karras,prediction",
    [
        ("euler", 30, "leading", 1, True, "eps"),
        ("euler", 20, "linspace", 0, False, "v"),
        ("heun", 15, "linspace", 0, True, "eps"),
        ("heun", 10, "trailing", 0, False, "v"),
    ],
)
def test_euler_heun_match_diffusers_discrete(schedules, x_T, sampler, num_steps, spacing, offset, karras, prediction):
    schedule, key = schedules["scaled_linear"], jax.random.key(6)
    cls = diffusers.EulerDiscreteScheduler if sampler == "euler" else diffusers.HeunDiscreteScheduler
    sched = cls(
        num_train_timesteps=T, use_karras_sigmas=karras, timestep_spacing=spacing, steps_offset=offset,
        prediction_type={"eps": "epsilon", "v": "v_prediction"}[prediction],
    )
    theirs = run_diffusers(sched, schedule, num_steps, x_T, key)
    ours = run_ours(schedule, x_T, key, sampler=sampler, num_steps=num_steps, spacing=spacing,
                    steps_offset=offset, karras_sigmas=karras, prediction=prediction)
    assert_same_run(ours, theirs)
