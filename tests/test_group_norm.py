"""ldm_jax.models.partitioning.GroupNorm against torch's group_norm in float64 (an independent
reference) and against flax.linen.GroupNorm (same parameters, so checkpoints cannot tell)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ldm_jax.models.partitioning import GroupNorm


def _torch_group_norm64(x, scale, bias, groups, eps):
    """x [B, ..., C] (channels last) -> torch.nn.functional.group_norm in float64, channels last."""
    t = torch.from_numpy(np.moveaxis(np.asarray(x, np.float64), -1, 1)).requires_grad_(True)
    y = torch.nn.functional.group_norm(
        t, groups, torch.from_numpy(np.asarray(scale, np.float64)), torch.from_numpy(np.asarray(bias, np.float64)), eps
    )
    return t, y


@pytest.mark.parametrize("shape,groups", [((2, 6, 5, 32), 32), ((3, 4, 4, 64), 8), ((2, 7, 48), 4), ((1, 3, 3, 3, 16), 4)])
def test_group_norm_matches_torch_float64_forward_and_gradient(shape, groups):
    rng = np.random.default_rng(0)
    # an offset mean and uneven scales: E[x^2] - E[x]^2 must still be accurate enough
    x = (rng.normal(size=shape) * rng.uniform(0.5, 3.0, size=shape[-1]) + 1.5).astype(np.float32)
    scale = rng.normal(size=shape[-1]).astype(np.float32)
    bias = rng.normal(size=shape[-1]).astype(np.float32)
    weights = rng.normal(size=shape).astype(np.float32)  # a non-trivial cotangent
    module = GroupNorm(num_groups=groups, epsilon=1e-5)
    variables = {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}

    def loss(x, variables):
        return jnp.sum(module.apply(variables, x) * weights)

    y = module.apply(variables, jnp.asarray(x))
    dx, dvars = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), variables)

    t, ty = _torch_group_norm64(x, scale, bias, groups, 1e-5)
    scale_t = torch.from_numpy(scale.astype(np.float64)).requires_grad_(True)
    bias_t = torch.from_numpy(bias.astype(np.float64)).requires_grad_(True)
    ty = torch.nn.functional.group_norm(t, groups, scale_t, bias_t, 1e-5)
    (ty * torch.from_numpy(np.moveaxis(weights.astype(np.float64), -1, 1))).sum().backward()
    ref_y = np.moveaxis(ty.detach().numpy(), 1, -1)
    ref_dx = np.moveaxis(t.grad.numpy(), 1, -1)

    def rel(a, b):
        return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))

    assert y.dtype == jnp.float32 and y.shape == shape
    assert rel(y, ref_y) < 1e-5
    assert rel(dx, ref_dx) < 1e-4
    assert rel(dvars["params"]["scale"], scale_t.grad.numpy()) < 1e-5
    assert rel(dvars["params"]["bias"], bias_t.grad.numpy()) < 1e-5


def test_group_norm_has_flax_parameters_and_outputs():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 64)).astype(np.float32))
    ours = GroupNorm(num_groups=32, epsilon=1e-6)
    theirs = nn.GroupNorm(num_groups=32, epsilon=1e-6, dtype=jnp.float32)
    p_ours = nn.unbox(ours.init(jax.random.key(0), x))
    p_theirs = theirs.init(jax.random.key(0), x)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), p_ours) == jax.tree.map(lambda a: (a.shape, a.dtype), p_theirs)
    params = {"params": {"scale": jnp.asarray(rng.normal(size=64), jnp.float32),
                         "bias": jnp.asarray(rng.normal(size=64), jnp.float32)}}
    np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x), rtol=0, atol=2e-5)


def test_group_norm_bfloat16_input_gives_float32_statistics():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 16, 16, 32)) * 4 + 2, jnp.bfloat16)
    params = {"params": {"scale": jnp.ones(32), "bias": jnp.zeros(32)}}
    y = GroupNorm(num_groups=8).apply(params, x)
    assert y.dtype == jnp.float32
    _, ref = _torch_group_norm64(np.asarray(x, np.float32), np.ones(32), np.zeros(32), 8, 1e-5)
    np.testing.assert_allclose(np.asarray(y), np.moveaxis(ref.detach().numpy(), 1, -1), atol=1e-4)


def test_group_norm_refuses_indivisible_channels():
    with pytest.raises(ValueError, match="30 channels are not divisible by num_groups=32"):
        GroupNorm(num_groups=32).init(jax.random.key(0), jnp.zeros((1, 2, 2, 30)))
