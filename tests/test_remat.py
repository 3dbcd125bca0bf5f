"""U-Net remat policies (ldm_jax.models.remat): same gradients as no remat, and less activation
memory by XLA's own buffer assignment once the CPU compiler keeps jax.checkpoint's barriers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models.remat import CPU_REMAT_COMPILER_OPTIONS
from ldm_jax.models.unet import UNet

CONFIG = dict(
    block_out_channels=(16,), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",),
    up_block_types=("CrossAttnUpBlock2D",), norm_num_groups=4, cross_attention_dim=8, attention_head_dim=2,
)


@pytest.fixture(scope="module")
def setup():
    unet = UNet.from_diffusers_config(CONFIG, attention="xla")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 16, 16, 4)), jnp.float32)
    t = jnp.array([3])
    ctx = jnp.asarray(rng.standard_normal((1, 5, 8)), jnp.float32)
    params = jax.jit(unet.init)(jax.random.PRNGKey(0), x, t, ctx)["params"]
    return unet, params, (x, t, ctx)


def _grad_fn(module):
    def loss(params, x, t, ctx):
        return jnp.mean(module.apply({"params": params}, x, t, ctx) ** 2)

    return jax.jit(jax.grad(loss))


def test_layer_policy_gives_the_same_grads_as_no_remat(setup):
    unet, params, args = setup
    ref = _grad_fn(unet)(params, *args)
    for policy in ("layer",):
        grads = _grad_fn(unet.clone(remat=True, remat_policy=policy))(params, *args)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grads, ref)


def test_remat_lowers_temp_memory_when_barriers_are_kept(setup):
    # 256 tokens x 2 heads: the float32 logits of the three self-attentions dominate the
    # activations; with per-layer remat only one layer's are alive at a time.
    unet, params, args = setup

    def temp(module, options):
        lowered = _grad_fn(module).lower(params, *args)
        return lowered.compile(compiler_options=options).memory_analysis().temp_size_in_bytes

    plain = temp(unet, CPU_REMAT_COMPILER_OPTIONS)
    remat = temp(unet.clone(remat=True, remat_policy="layer"), CPU_REMAT_COMPILER_OPTIONS)
    assert remat < 0.8 * plain, (remat, plain)


def test_unknown_remat_policy_raises(setup):
    unet, params, args = setup
    with pytest.raises(ValueError, match="remat_policy 'sometimes'"):
        unet.clone(remat=True, remat_policy="sometimes").apply({"params": params}, *args)
