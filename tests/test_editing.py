"""img2img against diffusers' img2img loop; inpainting against closed forms for Gaussian data."""

from __future__ import annotations

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ldm_jax.diffusion.analytic import gaussian_eps_model
from ldm_jax.diffusion.editing import img2img, img2img_start_step, inpaint
from ldm_jax.diffusion.samplers import initial_noise, sample
from ldm_jax.diffusion.schedules import make_schedule, sigma_at

T = 1000


@pytest.fixture(scope="module")
def schedule():
    return make_schedule("scaled_linear", T)


def model_jnp(x, t):
    t = jnp.asarray(t, jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.tanh(0.9 * x + 0.05) * (0.6 + 0.3 * jnp.cos(0.007 * t)) + 0.1 * x


def model_torch(x, t):
    t = torch.as_tensor(t, dtype=torch.float32)
    return torch.tanh(0.9 * x + 0.05) * (0.6 + 0.3 * torch.cos(0.007 * t)) + 0.1 * x


# --------------------------------------------------------------------------- img2img


def test_img2img_strength_zero_returns_the_input(schedule):
    init = jax.random.normal(jax.random.key(0), (2, 3, 3, 4))
    for sampler in ("ddim", "heun"):
        out = img2img(model_jnp, schedule, init, jax.random.key(1), strength=0.0, sampler=sampler, num_steps=10)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(init))
    # int(10 * 0.05) = 0 steps to run: also the input, as diffusers' strength arithmetic.
    out = img2img(model_jnp, schedule, init, jax.random.key(1), strength=0.05, num_steps=10)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(init))


@pytest.mark.parametrize("strength", [-0.1, 1.5, float("nan"), "0.5"])
def test_img2img_rejects_strength_outside_unit_interval(schedule, strength):
    with pytest.raises(ValueError, match=str(strength) if strength == strength else "nan"):
        img2img(model_jnp, schedule, jnp.zeros((1, 4)), jax.random.key(0), strength=strength)


@pytest.mark.parametrize(
    "sampler,options,diffusers_cls,diffusers_kw,strength",
    [
        ("ddim", dict(steps_offset=1, set_alpha_to_one=False), diffusers.DDIMScheduler,
         dict(steps_offset=1, set_alpha_to_one=False, clip_sample=False), 0.6),
        ("ddim", {}, diffusers.DDIMScheduler, dict(clip_sample=False), 1.0),
        ("dpmpp_2m", dict(karras_sigmas=True), diffusers.DPMSolverMultistepScheduler, dict(use_karras_sigmas=True), 0.7),
        ("euler", dict(karras_sigmas=True), diffusers.EulerDiscreteScheduler, dict(use_karras_sigmas=True), 0.5),
        ("heun", {}, diffusers.HeunDiscreteScheduler, {}, 0.75),
    ],
)
def test_img2img_matches_diffusers_img2img_loop(schedule, sampler, options, diffusers_cls, diffusers_kw, strength):
    n, shape, key = 12, (3, 6), jax.random.key(4)
    init = np.array(jax.random.normal(jax.random.key(5), shape))
    noise = np.array(initial_noise(key, shape))  # the noise img2img draws from this key
    # diffusers' StableDiffusionImg2ImgPipeline: get_timesteps, set_begin_index, add_noise, loop.
    sched = diffusers_cls(num_train_timesteps=T, **diffusers_kw)
    abar = torch.from_numpy(np.array(schedule.alphas_cumprod))
    sched.alphas_cumprod = abar
    if hasattr(sched, "final_alpha_cumprod"):
        sched.final_alpha_cumprod = torch.tensor(1.0) if sched.config.set_alpha_to_one else abar[0]
    sched.set_timesteps(n)
    t_start = max(n - min(int(n * strength), n), 0)
    assert img2img_start_step(n, strength) == t_start
    timesteps = sched.timesteps[t_start * sched.order:]
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(t_start * sched.order)
    x = sched.add_noise(torch.from_numpy(init), torch.from_numpy(noise), timesteps[:1])
    for t in timesteps:
        x = sched.step(model_torch(sched.scale_model_input(x, t), t), t, x).prev_sample
    out, traj = img2img(model_jnp, schedule, init, key, strength=strength, sampler=sampler, num_steps=n,
                        return_trajectory=True, **options)
    np.testing.assert_allclose(np.asarray(traj.t), timesteps.numpy(), atol=2e-3)
    ref = x.numpy()
    assert np.abs(np.asarray(out) - ref).max() < 1e-5 * max(1.0, np.abs(ref).max())


# --------------------------------------------------------------------------- inpainting

MU = np.array([0.5, -1.0, 0.2, 1.5])
SD = np.array([0.3, 1.0, 0.6, 0.8])


@pytest.fixture(scope="module")
def linear_schedule():
    return make_schedule("linear", T)


@pytest.mark.parametrize(
    "sampler,options",
    [
        ("ddpm", dict(jump_length=3, jump_n_sample=3)),
        ("ddim", dict(eta=0.3)),
        ("plms", {}),
        ("heun", dict(karras_sigmas=True)),
        ("euler", dict(jump_length=2, jump_n_sample=2)),
    ],
)
def test_inpainting_keeps_the_known_region_exactly(linear_schedule, sampler, options):
    model = gaussian_eps_model(linear_schedule, MU, SD)
    original = jax.random.normal(jax.random.key(1), (4, 2, 2, 4)) * 3.0
    mask = (jnp.arange(4) % 2 == 0).astype(jnp.float32)  # keep channels 0 and 2 (broadcast mask)
    out = np.asarray(inpaint(model, linear_schedule, original, mask, jax.random.key(2), sampler=sampler,
                             num_steps=10, **options))
    keep = np.broadcast_to(np.asarray(mask) > 0, out.shape)
    np.testing.assert_array_equal(out[keep], np.asarray(original)[keep])
    assert np.isfinite(out).all()
    assert np.abs(out[~keep] - np.asarray(original)[~keep]).min() > 0  # the rest was generated


@pytest.mark.parametrize("sampler,options", [("dpmpp_2m", {}), ("euler", dict(karras_sigmas=True))])
def test_inpainting_independent_gaussian_generates_the_unknown_region_unconditionally(linear_schedule, sampler,
                                                                                       options):
    # With independent dimensions the exact model never mixes them, so for a deterministic
    # sampler the unknown region must equal unconditional sampling from the same x_T, and
    # hence have the data statistics, whatever the (here: far out of distribution) known values.
    model = gaussian_eps_model(linear_schedule, MU, SD)
    shape = (2000, 4)
    mask = jnp.array([1.0, 0.0, 1.0, 0.0])
    original = jnp.full(shape, 5.0)
    key = jax.random.key(3)
    x_T = initial_noise(key, shape)
    out = np.asarray(inpaint(model, linear_schedule, original, mask, key, sampler=sampler, num_steps=40,
                             x_T=x_T, **options))
    free = np.asarray(sample(model, linear_schedule, shape, key, sampler=sampler, num_steps=40, x_T=x_T, **options))
    np.testing.assert_allclose(out[:, 1::2], free[:, 1::2], atol=1e-5)
    z = (out[:, 1::2] - MU[1::2]) / SD[1::2]
    # 4 standard errors of 4000 z-scores, plus the 40-step discretisation (< 0.05 in z; see
    # test_samplers_gaussian's flow-map bounds).
    assert abs(z.mean()) < 4 / np.sqrt(z.size) + 0.05
    assert abs(z.std() - 1) < 4 / np.sqrt(2 * z.size) + 0.05


def _correlated_gaussian_model(schedule, mean, cov):
    """Exact eps-predictor for 2-D data N(mean, cov): E[eps | x_t] = b S_t^-1 (x_t - a mean)."""
    mean, cov = jnp.asarray(mean, jnp.float32), jnp.asarray(cov, jnp.float32)

    def model(x, t):
        sig = sigma_at(schedule, t)[:, None, None]
        a = 1.0 / jnp.sqrt(1.0 + sig**2)
        b = sig * a
        cov_t = a**2 * cov[None] + b**2 * jnp.eye(2)[None]
        return b[:, :, 0] * jnp.einsum("bij,bj->bi", jnp.linalg.inv(cov_t), x - a[:, :, 0] * mean)

    return model


def test_repaint_resampling_moves_the_unknown_region_towards_the_true_conditional(linear_schedule):
    # x = (x1, x2) ~ N(m, S) with correlation 0.9; x1 = c is known. The unknown x2 should be
    # N(m2 + rho s2/s1 (c - m1), s2^2 (1 - rho^2)). Plain replacement under-uses the known value
    # (RePaint's motivation); resampling jumps must shrink that bias.
    m, s1, s2, rho, c = np.array([0.5, -0.3]), 1.0, 0.6, 0.9, 1.2
    cov = np.array([[s1**2, rho * s1 * s2], [rho * s1 * s2, s2**2]])
    model = _correlated_gaussian_model(linear_schedule, m, cov)
    cond_mean = m[1] + rho * s2 / s1 * (c - m[0])
    cond_std = s2 * np.sqrt(1 - rho**2)
    batch = 4000
    original = jnp.tile(jnp.array([[c, 0.0]]), (batch, 1))
    mask = jnp.array([1.0, 0.0])
    key = jax.random.key(1)
    plain = np.asarray(inpaint(model, linear_schedule, original, mask, key, sampler="ddpm", num_steps=50))[:, 1]
    jumps = np.asarray(inpaint(model, linear_schedule, original, mask, key, sampler="ddpm", num_steps=50,
                               jump_length=3, jump_n_sample=10))[:, 1]
    standard_error = cond_std / np.sqrt(batch)  # 0.004
    # Measured: plain bias 0.070, with jumps 0.018 (std 0.269 vs 0.2615). Margins >= 4 SE.
    assert abs(plain.mean() - cond_mean) > 0.05
    assert abs(jumps.mean() - cond_mean) < 0.035
    assert abs(jumps.std() / cond_std - 1) < 0.1
    assert jumps.mean() - plain.mean() > 8 * standard_error


# --------------------------------------------------------------------------- bad arguments


def test_inpainting_bad_arguments_raise_value_error_naming_the_value(linear_schedule):
    model = gaussian_eps_model(linear_schedule, 0.0, 1.0)
    original = jnp.zeros((2, 4))
    with pytest.raises(ValueError, match=r"\(3,\)"):
        inpaint(model, linear_schedule, original, jnp.ones((3,)), jax.random.key(0))
    with pytest.raises(ValueError, match=r"\(2, 2, 4\)"):
        inpaint(model, linear_schedule, original, jnp.ones((2, 2, 4)), jax.random.key(0))
    with pytest.raises(ValueError, match="'plms'"):
        inpaint(model, linear_schedule, original, jnp.ones((4,)), jax.random.key(0), sampler="plms",
                jump_length=2, jump_n_sample=2)
    with pytest.raises(ValueError, match="jump_n_sample"):
        inpaint(model, linear_schedule, original, jnp.ones((4,)), jax.random.key(0), jump_n_sample=0)
    with pytest.raises(ValueError, match=r"\(2, 5\)"):
        inpaint(model, linear_schedule, original, jnp.ones((4,)), jax.random.key(0), x_T=jnp.zeros((2, 5)))
    with pytest.raises(ValueError, match="'ddim2'"):
        inpaint(model, linear_schedule, original, jnp.ones((4,)), jax.random.key(0), sampler="ddim2")
