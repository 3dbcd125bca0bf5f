"""Flow-matching samplers against diffusers' FlowMatchEulerDiscreteScheduler and
FlowMatchHeunDiscreteScheduler, step by step.

Both sides run their own sampling loop with the same deterministic velocity model (a fixed
nonlinear function of x and the timestep, written identically in torch and jnp) from the same
x_T. Every intermediate state (diffusers' ``prev_sample`` after each ``step``) and every model
timestep are compared; the sigma sequences (shift, dynamic shifting by mu, explicit sigmas,
Karras, shift_terminal) are compared directly too.
"""

from __future__ import annotations

import diffusers
import jax
import numpy as np
import pytest
import torch

from ldm_jax.diffusion.flow import dynamic_shift_mu, make_flow_schedule
from ldm_jax.diffusion.samplers import sample
from ldm_jax.diffusion.samplers.base import SamplerConfig
from ldm_jax.diffusion.samplers.flow import flow_sigmas
from test_samplers_diffusers import RTOL, SHAPE, model_jnp, model_torch

N = 1000


def _velocity_jnp(x, t):
    # model_jnp's t-dependence is tuned for t in [0, 1000]; shift it so the test model is not
    # an odd function of the timestep alone.
    return model_jnp(x, t) - 0.4 * x


def _velocity_torch(x, t):
    return model_torch(x, t) - 0.4 * x


@pytest.fixture(scope="module")
def x_T():
    return np.array(jax.random.normal(jax.random.key(17), SHAPE), np.float32)


def run_diffusers(sched, num_steps, x_T, **set_kw):
    sched.set_timesteps(num_steps, **set_kw)
    x = torch.from_numpy(x_T.copy())
    states, seen = [], []
    for t in sched.timesteps:
        x = sched.step(_velocity_torch(x, t), t, x).prev_sample
        states.append(x.numpy().copy())
        seen.append(float(t))
    return np.stack(states), np.array(seen)


def run_ours(schedule, x_T, **kw):
    out, traj = sample(_velocity_jnp, schedule, x_T.shape, jax.random.key(0), x_T=x_T, return_trajectory=True, **kw)
    return np.asarray(out), np.asarray(traj.x), np.asarray(traj.t)


def assert_same_run(ours, theirs):
    out, states, ts = ours
    ref_states, ref_ts = theirs
    assert states.shape == ref_states.shape, (states.shape, ref_states.shape)
    np.testing.assert_allclose(ts, ref_ts, rtol=2e-6, atol=1e-4)
    axes = tuple(range(1, states.ndim))
    err = np.abs(states - ref_states).max(axis=axes) / np.maximum(1.0, np.abs(ref_states).max(axis=axes))
    assert err.max() < RTOL, f"worst step {err.argmax()} of {len(err)}: relative error {err.max():.2e}"
    np.testing.assert_array_equal(out, states[-1])
    print(f"worst per-step relative error {err.max():.2e}")
    return err.max()


# (scheduler kwargs, our schedule kwargs, num_steps, set_timesteps kwargs, our sampler kwargs)
EULER_CASES = [
    ("default", {}, {}, 20, {}, {}),
    ("sd3_shift3", {"shift": 3.0}, {"shift": 3.0}, 28, {}, {}),
    ("flux_dynamic", {"use_dynamic_shifting": True}, {"dynamic_shifting": True}, 12, "flux", {"spacing": "trailing"}),
    ("dynamic_linear", {"use_dynamic_shifting": True, "time_shift_type": "linear"},
     {"dynamic_shifting": True, "time_shift_type": "linear"}, 9, {"mu": 0.8}, {"mu": 0.8}),
    ("karras_shift2", {"shift": 2.0, "use_karras_sigmas": True}, {"shift": 2.0}, 15, {}, {"karras_sigmas": True}),
    ("explicit_sigmas", {"shift": 3.0}, {"shift": 3.0}, 4, {"sigmas": [1.0, 0.8, 0.5, 0.2]},
     {"sigmas": (1.0, 0.8, 0.5, 0.2)}),
    ("shift_terminal", {"shift": 3.0, "shift_terminal": 0.1}, {"shift": 3.0, "shift_terminal": 0.1}, 10, {}, {}),
]


@pytest.mark.parametrize("case", EULER_CASES, ids=[c[0] for c in EULER_CASES])
def test_flow_euler_matches_diffusers_flow_match_euler(x_T, case):
    _, sched_kw, ours_kw, n, set_kw, sample_kw = case
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=N, **sched_kw)
    schedule = make_flow_schedule(num_train_timesteps=N, **ours_kw)
    if set_kw == "flux":
        # The Flux pipeline: sigmas 1 .. 1/n and mu from the token count.
        seq_len = 1024
        mu = dynamic_shift_mu(seq_len)
        set_kw = {"sigmas": np.linspace(1.0, 1.0 / n, n), "mu": mu}
        sample_kw = {**sample_kw, "image_seq_len": seq_len}
    theirs = run_diffusers(sched, n, x_T, **set_kw)
    np.testing.assert_allclose(
        flow_sigmas(schedule, SamplerConfig(num_steps=n, spacing=sample_kw.get("spacing", "linspace"),
                                            **{k: v for k, v in sample_kw.items() if k != "spacing"})),
        sched.sigmas.numpy()[:-1], rtol=1e-6, atol=1e-7,
    )
    assert_same_run(run_ours(schedule, x_T, sampler="flow_euler", num_steps=n, **sample_kw), theirs)


@pytest.mark.parametrize("shift,n", [(1.0, 15), (3.0, 10)])
def test_flow_heun_matches_diffusers_flow_match_heun(x_T, shift, n):
    sched = diffusers.FlowMatchHeunDiscreteScheduler(num_train_timesteps=N, shift=shift)
    theirs = run_diffusers(sched, n, x_T)
    ours = run_ours(make_flow_schedule(shift, num_train_timesteps=N), x_T, sampler="flow_heun", num_steps=n)
    assert_same_run(ours, theirs)
