"""Classifier-free guidance: one batched call, float64 NumPy branch-by-branch references,
diffusers' rescale_noise_cfg for guidance rescale, traced scales, label helpers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from ldm_jax.diffusion.guidance import apply_guidance, cfg_model_fn, drop_conditioning, null_class_labels

B, H, W, C, L, D, NUM_CLASSES = 3, 4, 4, 2, 5, 6, 10


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    proj = rng.standard_normal((D, C)).astype(np.float32)
    class_emb = rng.standard_normal((NUM_CLASSES + 1, C)).astype(np.float32)
    cond = {"text": rng.standard_normal((B, L, D)).astype(np.float32), "label": np.array([1, 4, 7], np.int32)}
    uncond = {"text": rng.standard_normal((B, L, D)).astype(np.float32), "label": np.full((B,), NUM_CLASSES, np.int32)}
    x = rng.standard_normal((B, H, W, C)).astype(np.float32)
    t = np.array([5, 500, 900], np.int32)
    return dict(proj=proj, class_emb=class_emb, cond=cond, uncond=uncond, x=x, t=t)


def _model_np(s, x, t, cond):
    """float64 toy conditional model: depends on x, t, the text tokens and the class."""
    text = np.tanh(cond["text"].mean(axis=1) @ s["proj"])  # [N, C]
    return np.sin(x) * (1 + t[:, None, None, None] / 1000) + (text + s["class_emb"][cond["label"]])[:, None, None, :]


def _model_jax(s, calls):
    proj, class_emb = jnp.asarray(s["proj"]), jnp.asarray(s["class_emb"])

    def model_fn(x, t, cond):
        calls.append(x.shape)
        text = jnp.tanh(cond["text"].mean(axis=1) @ proj)
        return jnp.sin(x) * (1 + t[:, None, None, None] / 1000) + (text + class_emb[cond["label"]])[:, None, None, :]

    return model_fn


def test_cfg_equals_float64_branch_combination_with_one_batched_call(setup):
    s = setup
    calls = []
    out_c = _model_np(s, s["x"].astype(np.float64), s["t"], s["cond"])
    out_u = _model_np(s, s["x"].astype(np.float64), s["t"], s["uncond"])
    for scale in (0.0, 1.0, 7.5):
        guided = cfg_model_fn(_model_jax(s, calls), s["cond"], s["uncond"], scale)
        got = np.asarray(guided(jnp.asarray(s["x"]), jnp.asarray(s["t"])))
        np.testing.assert_allclose(got, out_u + scale * (out_c - out_u), rtol=1e-5, atol=1e-5, err_msg=str(scale))
    # Exactly one model call per guided call, on the doubled batch.
    assert calls == [(2 * B, H, W, C)] * 3
    # A scalar timestep is broadcast to the batch.
    guided = cfg_model_fn(_model_jax(s, []), s["cond"], s["uncond"], 2.0)
    want = _model_np(s, s["x"].astype(np.float64), np.full(B, 500), s["uncond"])
    want = want + 2.0 * (_model_np(s, s["x"].astype(np.float64), np.full(B, 500), s["cond"]) - want)
    np.testing.assert_allclose(np.asarray(guided(jnp.asarray(s["x"]), 500)), want, rtol=1e-5, atol=1e-5)


def test_negative_embedding_of_batch_one_is_broadcast(setup):
    s = setup
    single = {"text": s["uncond"]["text"][:1], "label": s["uncond"]["label"][:1]}
    tiled = {"text": np.repeat(single["text"], B, 0), "label": np.repeat(single["label"], B, 0)}
    a = cfg_model_fn(_model_jax(s, []), s["cond"], single, 4.0)(jnp.asarray(s["x"]), jnp.asarray(s["t"]))
    b = cfg_model_fn(_model_jax(s, []), s["cond"], tiled, 4.0)(jnp.asarray(s["x"]), jnp.asarray(s["t"]))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("rescale", [0.0, 0.7, 1.0])
def test_guidance_rescale_matches_diffusers_rescale_noise_cfg(rescale):
    rng = np.random.default_rng(1)
    c = rng.standard_normal((B, C, H, W)).astype(np.float32) * 1.3
    u = rng.standard_normal((B, C, H, W)).astype(np.float32)
    scale = 7.5
    cfg = torch.from_numpy(u) + scale * (torch.from_numpy(c) - torch.from_numpy(u))
    want = rescale_noise_cfg(cfg, torch.from_numpy(c), guidance_rescale=rescale).numpy()
    nhwc = lambda a: jnp.asarray(np.moveaxis(a, 1, -1))
    got = apply_guidance(nhwc(c), nhwc(u), scale, rescale)
    np.testing.assert_allclose(np.asarray(got), np.moveaxis(want, 1, -1), rtol=1e-5, atol=1e-5)
    if rescale == 1.0:  # fully rescaled: each example has the std of its conditional output
        np.testing.assert_allclose(np.asarray(got).std(axis=(1, 2, 3)), c.std(axis=(1, 2, 3)), rtol=1e-5)


def test_traced_guidance_scale_does_not_recompile_and_per_example_scales(setup):
    s = setup
    traces = []

    @jax.jit
    def step(x, t, scale, rescale):
        traces.append(1)
        return cfg_model_fn(_model_jax(s, []), s["cond"], s["uncond"], scale, rescale)(x, t)

    x, t = jnp.asarray(s["x"]), jnp.asarray(s["t"])
    outs = {w: np.asarray(step(x, t, jnp.float32(w), jnp.float32(0.3))) for w in (1.0, 3.0, 9.0)}
    assert len(traces) == 1
    for w, out in outs.items():
        eager = cfg_model_fn(_model_jax(s, []), s["cond"], s["uncond"], w, 0.3)(x, t)
        np.testing.assert_allclose(out, np.asarray(eager), rtol=1e-5, atol=1e-5)
    # A [B] vector of scales guides each example with its own scale.
    per_example = np.asarray(step(x, t, jnp.array([1.0, 3.0, 9.0]), jnp.float32(0.3)))
    for i, w in enumerate((1.0, 3.0, 9.0)):
        np.testing.assert_allclose(per_example[i], outs[w][i], rtol=1e-5, atol=1e-5)


def test_guided_channels_leave_learned_variance_channels_conditional():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((B, H, W, C)), jnp.float32)
    cond, uncond = jnp.ones((B,)), jnp.zeros((B,))

    def model_fn(xx, tt, cc):  # 2C channels: prediction, then variance interpolation
        return jnp.concatenate([xx * (1 + cc[:, None, None, None]), jnp.tanh(xx) * cc[:, None, None, None]], -1)

    out = np.asarray(cfg_model_fn(model_fn, cond, uncond, 5.0, guided_channels=C)(x, jnp.zeros((B,), jnp.int32)))
    xn = np.asarray(x, np.float64)
    np.testing.assert_allclose(out[..., :C], xn + 5.0 * (2 * xn - xn), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[..., C:], np.tanh(xn), rtol=1e-5, atol=1e-6)


def test_guidance_interval_guides_only_the_examples_whose_timestep_is_inside(setup):
    """t = [5, 500, 900] with the interval [100, 500]: only the second example is guided (the
    bounds are inclusive); the others get the float64 conditional output."""
    s = setup
    x64 = s["x"].astype(np.float64)
    out_c, out_u = _model_np(s, x64, s["t"], s["cond"]), _model_np(s, x64, s["t"], s["uncond"])
    want = out_c.copy()
    want[1] = out_u[1] + 7.5 * (out_c[1] - out_u[1])
    guided = cfg_model_fn(_model_jax(s, []), s["cond"], s["uncond"], 7.5, guidance_interval=(100, 500))
    got = np.asarray(jax.jit(guided)(jnp.asarray(s["x"]), jnp.asarray(s["t"])))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # an interval holding every timestep is plain guidance, bit for bit (both compiled: eager
    # op-by-op execution rounds differently from the compiled lax.cond branch)
    full = cfg_model_fn(_model_jax(s, []), s["cond"], s["uncond"], 7.5, guidance_interval=(0, 1000))
    plain = cfg_model_fn(_model_jax(s, []), s["cond"], s["uncond"], 7.5)
    np.testing.assert_array_equal(np.asarray(jax.jit(full)(jnp.asarray(s["x"]), jnp.asarray(s["t"]))),
                                  np.asarray(jax.jit(plain)(jnp.asarray(s["x"]), jnp.asarray(s["t"]))))
    with pytest.raises(ValueError, match=r"finite with t_low <= t_high, got \(600, 100\)"):
        cfg_model_fn(_model_jax(s, []), s["cond"], s["uncond"], 7.5, guidance_interval=(600, 100))


def test_guidance_interval_outside_runs_only_the_conditional_branch(setup):
    """A step with no example inside the interval costs one model call on B, not 2B (checked at
    run time with a host callback: lax.cond executes one branch), and returns the float64
    conditional output; a step with one example inside still makes the 2B call."""
    s = setup
    proj, class_emb = jnp.asarray(s["proj"]), jnp.asarray(s["class_emb"])
    executed = []

    def model_fn(x, t, cond):
        jax.debug.callback(lambda n: executed.append(int(n)), x.shape[0])
        text = jnp.tanh(cond["text"].mean(axis=1) @ proj)
        return jnp.sin(x) * (1 + t[:, None, None, None] / 1000) + (text + class_emb[cond["label"]])[:, None, None, :]

    guided = jax.jit(cfg_model_fn(model_fn, s["cond"], s["uncond"], 7.5, guidance_interval=(600, 800)))
    x = jnp.asarray(s["x"])
    t_outside = np.array([5, 500, 900], np.int32)
    got = np.asarray(guided(x, jnp.asarray(t_outside)))
    jax.effects_barrier()
    assert executed == [B]
    np.testing.assert_allclose(got, _model_np(s, s["x"].astype(np.float64), t_outside, s["cond"]), rtol=1e-5, atol=1e-5)
    executed.clear()
    t_one_inside = np.array([5, 700, 900], np.int32)
    got = np.asarray(guided(x, jnp.asarray(t_one_inside)))
    jax.effects_barrier()
    assert executed == [2 * B]
    x64 = s["x"].astype(np.float64)
    want = _model_np(s, x64, t_one_inside, s["cond"])
    out_u = _model_np(s, x64, t_one_inside, s["uncond"])
    want[1] = out_u[1] + 7.5 * (want[1] - out_u[1])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_null_class_labels_and_drop_conditioning():
    labels = jnp.array([0, 3, 9, 2])
    null = null_class_labels(labels, NUM_CLASSES)
    np.testing.assert_array_equal(np.asarray(null), [10, 10, 10, 10])
    assert null.dtype == labels.dtype

    n = 4000
    rng = np.random.default_rng(3)
    cond = {"label": jnp.asarray(rng.integers(0, NUM_CLASSES, n)), "text": jnp.asarray(rng.standard_normal((n, 2, 3)), jnp.float32)}
    uncond = {"label": null_class_labels(cond["label"], NUM_CLASSES), "text": jnp.zeros((1, 2, 3))}
    dropped = jax.jit(lambda k: drop_conditioning(k, cond, uncond, 0.1))(jax.random.PRNGKey(4))
    is_null = np.asarray(dropped["label"]) == NUM_CLASSES
    # Binomial(4000, 0.1): mean 400, sd 19; 4 sd either side.
    assert 324 < is_null.sum() < 476, is_null.sum()
    # The same draw governs every leaf; kept examples are untouched.
    np.testing.assert_array_equal(np.asarray(dropped["text"])[is_null], 0.0)
    np.testing.assert_array_equal(np.asarray(dropped["text"])[~is_null], np.asarray(cond["text"])[~is_null])
    np.testing.assert_array_equal(np.asarray(dropped["label"])[~is_null], np.asarray(cond["label"])[~is_null])
    np.testing.assert_array_equal(np.asarray(drop_conditioning(jax.random.PRNGKey(5), cond, uncond, 0.0)["label"]), np.asarray(cond["label"]))


def test_guidance_works_under_vmap_and_grad(setup):
    s = setup
    x, t = jnp.asarray(s["x"]), jnp.asarray(s["t"])
    batched = cfg_model_fn(_model_jax(s, []), s["cond"], s["uncond"], 4.0, 0.5)(x, t)

    def one(xi, ti, ci, ui):
        add_batch = lambda tree: jax.tree.map(lambda a: a[None], tree)
        return cfg_model_fn(_model_jax(s, []), add_batch(ci), add_batch(ui), 4.0, 0.5)(xi[None], ti[None])[0]

    per_example = jax.jit(jax.vmap(one))(x, t, s["cond"], s["uncond"])
    np.testing.assert_allclose(np.asarray(per_example), np.asarray(batched), rtol=1e-5, atol=1e-5)
    # Gradient through the guided model w.r.t. its input (e.g. for guidance-based editing).
    g = jax.grad(lambda xx: cfg_model_fn(_model_jax(s, []), s["cond"], s["uncond"], 4.0)(xx, t).sum())(x)
    # d/dx of u + w (c - u) where both branches share sin(x) (1 + t/1000): the same derivative.
    np.testing.assert_allclose(np.asarray(g), np.cos(s["x"]) * (1 + s["t"][:, None, None, None] / 1000), rtol=1e-5, atol=1e-5)


def test_bad_arguments_raise_value_error_naming_the_value(setup):
    s = setup
    x, t = jnp.asarray(s["x"]), jnp.asarray(s["t"])
    model = _model_jax(s, [])
    with pytest.raises(ValueError, match="different structures"):
        cfg_model_fn(model, s["cond"], {"text": s["uncond"]["text"]}, 2.0)(x, t)
    with pytest.raises(ValueError, match=r"\(3, 5, 4\)"):
        cfg_model_fn(model, s["cond"], {"text": s["uncond"]["text"][..., :4], "label": s["uncond"]["label"]}, 2.0)(x, t)
    with pytest.raises(ValueError, match=r"\(2,\) does not have the batch size 3"):
        cfg_model_fn(model, {"text": s["cond"]["text"][:2], "label": s["cond"]["label"][:2]}, s["uncond"], 2.0)(x, t)
    with pytest.raises(ValueError, match=r"\(2,\)"):
        cfg_model_fn(model, s["cond"], s["uncond"], 2.0)(x, t[:2])
    with pytest.raises(ValueError, match="guided_channels 5"):
        cfg_model_fn(model, s["cond"], s["uncond"], 2.0, guided_channels=5)(x, t)
    with pytest.raises(ValueError, match="-1"):
        cfg_model_fn(model, s["cond"], s["uncond"], 2.0, guided_channels=-1)
    with pytest.raises(ValueError, match=r"\(3, 2\)"):
        apply_guidance(x, x, jnp.ones((3, 2)))
    with pytest.raises(ValueError, match="1.5"):
        drop_conditioning(jax.random.PRNGKey(0), s["cond"], s["uncond"], 1.5)
    with pytest.raises(ValueError, match="0"):
        null_class_labels(jnp.array([1]), 0)
