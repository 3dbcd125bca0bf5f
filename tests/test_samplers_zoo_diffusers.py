"""The rest of the DDPM-family sampler zoo against diffusers, step by step: Euler ancestral,
DPM-Solver++(2S), UniPC and LCM (same protocol as test_samplers_diffusers.py: the same
deterministic model on both sides, our noise fed to diffusers, every state compared)."""

from __future__ import annotations

import diffusers
import jax
import numpy as np
import pytest
import torch

from test_samplers_diffusers import RTOL, T, _our_noise, _share_schedule, assert_same_run, model_torch, run_ours
from ldm_jax.diffusion.schedules import make_schedule

PRED = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


@pytest.fixture(scope="module")
def schedule():
    return make_schedule("scaled_linear", T)


@pytest.fixture(scope="module")
def x_T():
    return np.array(jax.random.normal(jax.random.key(27), (3, 6)), np.float32)


def run_diffusers(sched, schedule, num_steps, x_T, key, *, ve, monkeypatch=None, module=None, step_kw=None):
    """diffusers' loop; states in VP scale (VE states divided by sqrt(sigma^2 + 1))."""
    _share_schedule(sched, schedule)
    sched.set_timesteps(num_steps)
    counter = {"i": 0}
    if module is not None:
        def fake_randn(shape, generator=None, device=None, dtype=None, **_):
            return torch.from_numpy(_our_noise(key, counter["i"]))

        monkeypatch.setattr(module, "randn_tensor", fake_randn)
    x = torch.from_numpy(x_T.copy()) * sched.init_noise_sigma
    states, seen = [], []
    for i, t in enumerate(sched.timesteps):
        counter["i"] = i
        out = model_torch(sched.scale_model_input(x, t), t)
        x = sched.step(out, t, x, **(step_kw or {})).prev_sample
        seen.append(float(t))
        states.append((x / torch.sqrt(sched.sigmas[i + 1] ** 2 + 1) if ve else x).numpy().copy())
    return np.stack(states), np.array(seen)


@pytest.mark.parametrize("num_steps,spacing,offset,prediction", [(30, "leading", 1, "eps"), (20, "linspace", 0, "v"),
                                                                 (15, "trailing", 0, "eps")])
def test_euler_ancestral_matches_diffusers(schedule, x_T, monkeypatch, num_steps, spacing, offset, prediction):
    key = jax.random.key(8)
    sched = diffusers.EulerAncestralDiscreteScheduler(num_train_timesteps=T, timestep_spacing=spacing,
                                                      steps_offset=offset, prediction_type=PRED[prediction])
    theirs = run_diffusers(sched, schedule, num_steps, x_T, key, ve=True, monkeypatch=monkeypatch,
                           module=diffusers.schedulers.scheduling_euler_ancestral_discrete)
    ours = run_ours(schedule, x_T, key, sampler="euler_ancestral", num_steps=num_steps, spacing=spacing,
                    steps_offset=offset, prediction=prediction)
    print(f"euler_ancestral {num_steps} {spacing}: {assert_same_run(ours, theirs):.2e}")


@pytest.mark.parametrize(
    "num_steps,karras,solver_type,prediction",
    [(20, False, "midpoint", "eps"), (15, False, "heun", "v"), (12, True, "midpoint", "x0"), (7, False, "midpoint", "eps")],
)
def test_dpmpp_2s_matches_diffusers_singlestep_order_2(schedule, x_T, num_steps, karras, solver_type, prediction):
    key = jax.random.key(9)
    sched = diffusers.DPMSolverSinglestepScheduler(num_train_timesteps=T, solver_order=2, algorithm_type="dpmsolver++",
                                                   solver_type=solver_type, use_karras_sigmas=karras,
                                                   prediction_type=PRED[prediction], lower_order_final=True)
    theirs = run_diffusers(sched, schedule, num_steps, x_T, key, ve=False)
    ours = run_ours(schedule, x_T, key, sampler="dpmpp_2s", num_steps=num_steps, karras_sigmas=karras,
                    solver_type=solver_type, prediction=prediction)
    print(f"dpmpp_2s {num_steps} karras={karras} {solver_type}: {assert_same_run(ours, theirs):.2e}")


@pytest.mark.parametrize("num_steps,original,prediction,clip", [(4, 50, "eps", False), (8, 50, "v", True), (25, 100, "eps", False)])
def test_lcm_matches_diffusers_lcm_scheduler(schedule, x_T, monkeypatch, num_steps, original, prediction, clip):
    key = jax.random.key(10)
    sched = diffusers.LCMScheduler(num_train_timesteps=T, original_inference_steps=original,
                                   prediction_type=PRED[prediction], clip_sample=clip)
    theirs = run_diffusers(sched, schedule, num_steps, x_T, key, ve=False, monkeypatch=monkeypatch,
                           module=diffusers.schedulers.scheduling_lcm)
    ours = run_ours(schedule, x_T, key, sampler="lcm", num_steps=num_steps, lcm_original_steps=original,
                    prediction=prediction, thresholding="static" if clip else None)
    print(f"lcm {num_steps}/{original}: {assert_same_run(ours, theirs):.2e}")


@pytest.mark.parametrize(
    "order,solver_type,num_steps,spacing,karras,prediction,lower_final",
    [
        (1, "bh2", 10, "linspace", False, "eps", True),
        (2, "bh2", 20, "linspace", False, "eps", True),
        (2, "bh1", 12, "trailing", True, "v", True),
        (3, "bh2", 15, "linspace", False, "x0", True),
        (3, "bh1", 25, "leading", False, "eps", True),
        (3, "bh2", 10, "linspace", True, "eps", True),
    ],
)
def test_unipc_matches_diffusers_unipc_multistep(schedule, x_T, order, solver_type, num_steps, spacing, karras,
                                                 prediction, lower_final):
    key = jax.random.key(11)
    sched = diffusers.UniPCMultistepScheduler(num_train_timesteps=T, solver_order=order, solver_type=solver_type,
                                              timestep_spacing=spacing, use_karras_sigmas=karras,
                                              prediction_type=PRED[prediction], lower_order_final=lower_final)
    theirs = run_diffusers(sched, schedule, num_steps, x_T, key, ve=False)
    ours = run_ours(schedule, x_T, key, sampler=f"unipc_{order}", num_steps=num_steps, spacing=spacing,
                    karras_sigmas=karras, solver_type=solver_type, prediction=prediction, lower_order_final=lower_final)
    if solver_type == "bh1":
        # diffusers' last bh1 step (to sigma = 0, first order) computes B(h) * 0 with B(h) = h = -inf:
        # NaN. The first-order step to sigma = 0 is x0_hat whatever B is; compare the other steps.
        assert np.isnan(theirs[0][-1]).all() and np.isfinite(ours[1][-1]).all()
        out, states, ts = ours
        ours = (states[-2], states[:-1], ts[:-1])
        theirs = (theirs[0][:-1], theirs[1][:-1])
    print(f"unipc_{order} {solver_type} {num_steps} {spacing} karras={karras}: {assert_same_run(ours, theirs):.2e}")
