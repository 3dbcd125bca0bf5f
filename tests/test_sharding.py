"""Mesh, logical-axis sharding, sharded state creation and the train step on 8 simulated devices.

Truths: a single-device run of the same step (sharding must not change the math), a
float64 NumPy AdamW + clipping + EMA on a linear model with closed-form gradients, closed
forms of the lr schedules, hand-derived partition specs.
"""

from __future__ import annotations

import math
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as PS

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
import tiny_training as tt  # noqa: E402

from ldm_jax.models import partitioning as P  # noqa: E402
from ldm_jax.training import (  # noqa: E402
    Task,
    compile_train_step,
    create_sharded_state,
    logical_axis_rules,
    make_lr_schedule,
    make_mesh,
    make_optimizer,
    make_train_step,
    resolve_config,
    state_shardings,
    step_key,
)
from ldm_jax.training import mesh as mesh_lib  # noqa: E402

LAYOUTS = {
    "dp8": ({"data": 8, "fsdp": 1, "tensor": 1}, "dp"),
    "fsdp8": ({"data": 1, "fsdp": 8, "tensor": 1}, "fsdp"),
    "data2_fsdp4": ({"data": 2, "fsdp": 4, "tensor": 1}, "fsdp"),
    "data2_fsdp2_tensor2": ({"data": 2, "fsdp": 2, "tensor": 2}, "fsdp_tensor"),
}


def _flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _setup(config, task, devices=None, steps=1, batches=None):
    """Create the state on a mesh and run ``steps`` compiled steps.

    Returns a dict: final ``state``, per-step host ``metrics``, planned ``shardings``, and
    what the freshly created state looked like before the first (donating) step:
    ``born_shardings``, ``born_shard_shapes``, ``born_params`` (host copy)."""
    mesh = make_mesh(config.mesh, devices=devices)
    rules = logical_axis_rules(config.sharding)
    tx, schedule = make_optimizer(config.optimizer)
    abstract, shardings = state_shardings(task.init_params, tx, mesh, rules, config.seed)
    state = create_sharded_state(task.init_params, tx, shardings, config.seed)
    step_fn = compile_train_step(
        make_train_step(task.loss_fn, tx, schedule, config.train, config.ema, mesh=mesh, state_shardings=shardings),
        shardings,
        mesh,
    )
    run = {
        "abstract": abstract,
        "shardings": shardings,
        "born_shardings": [x.sharding for x in jax.tree.leaves(state)],
        "born_shard_shapes": [{s.data.shape for s in x.addressable_shards} for x in jax.tree.leaves(state)],
        "born_params": jax.device_get(state.params),
        "metrics": [],
    }
    for i in range(steps):
        batch = batches[i] if batches is not None else tt.global_batch(i, config.train.global_batch_size)
        state, m = step_fn(state, batch, step_key(state.rng, i))
        run["metrics"].append(jax.device_get(m))
    run["state"] = state
    return run


def _config(mesh_shape, preset, **train):
    config = tt.tiny_config(steps=10, preset=preset, mesh=mesh_shape)
    config.train.update(train)
    return resolve_config(config, math.prod(mesh_shape.values()))


@pytest.fixture(scope="module")
def single_device_run():
    config = _config({"data": 1, "fsdp": 1, "tensor": 1}, "dp")
    run = _setup(config, tt.tiny_task(), devices=jax.devices()[:1], steps=2)
    return _flat(run["state"]), run["metrics"], run["born_params"]


@pytest.fixture(scope="module")
def layout_runs():
    """Two steps of the stand-in model per layout, computed once per module on first use."""
    cache = {}

    def get(layout):
        if layout not in cache:
            mesh_shape, preset = LAYOUTS[layout]
            cache[layout] = _setup(_config(mesh_shape, preset), tt.tiny_task(), steps=2)
        return cache[layout]

    return get


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_sharded_steps_match_single_device_steps(layout, single_device_run, layout_runs):
    ref_state, ref_metrics, _ = single_device_run
    mesh_shape, preset = LAYOUTS[layout]
    run = layout_runs(layout)
    state = run["state"]

    for got, want in zip(run["metrics"], ref_metrics):
        for name in ("loss", "grad_norm", "lr", "abs_err"):
            np.testing.assert_allclose(got[name], want[name], rtol=2e-6, err_msg=name)
    flat = _flat(state)
    assert flat.keys() == ref_state.keys()
    worst = max(np.max(np.abs(flat[k].astype(np.float64) - ref_state[k])) for k in flat)
    assert worst < 2e-6, f"{layout}: max |sharded - single device| = {worst}"

    # The updated state keeps the planned shardings (in_shardings == out_shardings).
    assert [x.sharding for x in jax.tree.leaves(state)] == jax.tree.leaves(run["shardings"])
    kernel = state.params["block"]["conv1"]["kernel"]  # [3, 3, 16, 16]: (conv_h, conv_w, embed, mlp)
    mu = state.opt_state[1][0].mu["block"]["conv1"]["kernel"]
    nu = state.opt_state[1][0].nu["block"]["conv1"]["kernel"]
    ema = state.ema_params["block"]["conv1"]["kernel"]
    fsdp = mesh_shape["fsdp"]
    for array in (kernel, mu, nu, ema):
        if preset == "fsdp_tensor":  # output channels over tensor, input channels over fsdp
            assert array.sharding.spec == PS(None, None, "fsdp", "tensor")
            assert {s.data.shape for s in array.addressable_shards} == {(3, 3, 8, 8)}
        elif preset == "fsdp":
            assert array.sharding.spec == PS(None, None, "fsdp", None)
            assert {s.data.shape for s in array.addressable_shards} == {(3, 3, 16 // fsdp, 16)}
        else:
            assert array.sharding.is_fully_replicated
            assert {s.data.shape for s in array.addressable_shards} == {(3, 3, 16, 16)}


def test_state_is_born_sharded_by_jitted_init_with_out_shardings(layout_runs, single_device_run):
    run = layout_runs("data2_fsdp4")
    leaves_abstract = jax.tree.leaves(run["abstract"])
    leaves_planned = jax.tree.leaves(run["shardings"])
    assert run["born_shardings"] == leaves_planned
    for shard_shapes, sharding, abstract in zip(run["born_shard_shapes"], leaves_planned, leaves_abstract):
        # every device holds exactly its shard, never the whole array
        assert shard_shapes == {sharding.shard_shape(abstract.shape)}
    kernel_index = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(run["abstract"])[0]].index(
        ".params['block']['conv2']['kernel']"
    )
    assert run["born_shardings"][kernel_index].spec == PS(None, None, "fsdp", None)
    assert leaves_abstract[kernel_index].dtype == jnp.float32
    state = run["state"]
    assert state.opt_state[1][0].mu["block"]["conv2"]["kernel"].sharding.spec == PS(None, None, "fsdp", None)
    assert state.opt_state[1][0].count.sharding.is_fully_replicated
    # The same numbers as the init on one device: sharding changes placement only.
    for got, want in zip(jax.tree.leaves(run["born_params"]), jax.tree.leaves(single_device_run[2])):
        np.testing.assert_array_equal(got, want)


def test_gradient_accumulation_equals_one_full_batch_step():
    rng = np.random.default_rng(0)
    batches = []
    for i in range(2):
        batch = tt.global_batch(i, 16)
        batch["noise"] = rng.standard_normal(batch["image"].shape).astype(np.float32)
        batches.append(batch)
    mesh_shape = {"data": 2, "fsdp": 4, "tensor": 1}
    full = _setup(_config(mesh_shape, "fsdp"), tt.tiny_task(), steps=2, batches=batches)
    accum = _setup(_config(mesh_shape, "fsdp", num_microbatches=2), tt.tiny_task(), steps=2, batches=batches)
    for a, f in zip(accum["metrics"], full["metrics"]):
        for name in ("loss", "grad_norm", "abs_err"):
            np.testing.assert_allclose(a[name], f[name], rtol=2e-6, err_msg=name)
    full, accum = _flat(full["state"]), _flat(accum["state"])
    worst = max(np.max(np.abs(accum[k] - full[k])) for k in full)
    assert worst < 2e-6, worst


def test_fsdp_rules_fall_back_when_a_dimension_is_not_divisible():
    config = _config({"data": 1, "fsdp": 8, "tensor": 1}, "fsdp")
    mesh = make_mesh(config.mesh)
    boxed = jax.eval_shape(tt.tiny_task().init_params, jax.random.key(0))
    shardings = mesh_lib.param_shardings(boxed, mesh, logical_axis_rules(config.sharding))
    specs = {jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
    expected = {
        # 4 input channels do not divide by 8: the mlp (output) rule takes fsdp instead.
        "['conv_in']['kernel']": PS(None, None, None, "fsdp"),
        "['conv_in']['bias']": PS("fsdp"),
        "['block']['conv1']['kernel']": PS(None, None, "fsdp", None),
        # 10 classes (vocab) do not divide by 8: the embed axis (32) is sharded.
        "['class_embed']['embedding']": PS(None, "fsdp"),
        "['time_proj']['kernel']": PS("fsdp", None),
        # conv_out: 16 in / 4 out: input axis sharded; its bias (4,) cannot be and is replicated.
        "['conv_out']['kernel']": PS(None, None, "fsdp", None),
        "['conv_out']['bias']": PS(None),
        "['block']['norm1']['scale']": PS(None),
    }
    for path, spec in expected.items():
        assert specs[path] == spec, (path, specs[path])


def _linear_task():
    class Linear(nn.Module):
        @nn.compact
        def __call__(self, x):
            return P.dense(3, name="head")(x)

    model = Linear()

    def init_params(key):
        params = model.init(key, jnp.zeros((1, 5)))["params"]
        # a non-zero bias so weight decay and EMA act on both leaves
        return jax.tree.map(lambda p: p.replace_boxed(p.unbox() + 0.3) if p.unbox().ndim == 1 else p, params,
                            is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))

    def loss_fn(params, batch, key):
        pred = model.apply({"params": params}, batch["x"])
        return jnp.mean((pred - batch["y"]) ** 2), {}

    return Task(init_params, loss_fn)


def test_step_matches_float64_numpy_adamw_with_clipping_warmup_cosine_and_ema():
    config = tt.tiny_config(steps=10, preset="dp", mesh={"data": 8, "fsdp": 1, "tensor": 1})
    config.optimizer.update(dict(learning_rate=0.05, warmup_steps=2, weight_decay=0.1, grad_clip_norm=0.5,
                                 b1=0.8, b2=0.95, eps=1e-6, end_lr_ratio=0.1))
    config.ema.update(dict(decay=0.5, warmup=True))
    config = resolve_config(config, 8)
    rng = np.random.default_rng(3)
    batches = [{"x": rng.standard_normal((16, 5)).astype(np.float32),
                "y": rng.standard_normal((16, 3)).astype(np.float32)} for _ in range(4)]
    task = _linear_task()
    state0 = jax.device_get(nn.unbox(task.init_params(jax.random.split(jax.random.key(config.seed))[0])))
    run = _setup(config, task, steps=4, batches=batches)
    state, metrics = run["state"], run["metrics"]

    w = state0["head"]["kernel"].astype(np.float64)
    b = state0["head"]["bias"].astype(np.float64)
    ema_w, ema_b = w.copy(), b.copy()
    m = [np.zeros_like(w), np.zeros_like(b)]
    v = [np.zeros_like(w), np.zeros_like(b)]
    oc = config.optimizer
    for t, batch in enumerate(batches, start=1):
        x, y = batch["x"].astype(np.float64), batch["y"].astype(np.float64)
        r = x @ w + b - y
        loss = np.mean(r**2)
        grads = [2.0 / r.size * x.T @ r, 2.0 / r.size * r.sum(0)]
        norm = math.sqrt(sum(float(np.sum(g**2)) for g in grads))
        scale = min(1.0, oc.grad_clip_norm / norm)
        s = t - 1
        if s < oc.warmup_steps:
            lr = oc.learning_rate * s / oc.warmup_steps
        else:
            frac = (s - oc.warmup_steps) / (oc.decay_steps - oc.warmup_steps)
            end = oc.learning_rate * oc.end_lr_ratio
            lr = end + (oc.learning_rate - end) * 0.5 * (1 + math.cos(math.pi * frac))
        new = []
        for i, (p, g) in enumerate(zip((w, b), grads)):
            g = g * scale
            m[i] = oc.b1 * m[i] + (1 - oc.b1) * g
            v[i] = oc.b2 * v[i] + (1 - oc.b2) * g**2
            mhat, vhat = m[i] / (1 - oc.b1**t), v[i] / (1 - oc.b2**t)
            new.append(p - lr * (mhat / (np.sqrt(vhat) + oc.eps) + oc.weight_decay * p))
        w, b = new
        decay = min(config.ema.decay, (1 + t) / (10 + t))
        ema_w, ema_b = decay * ema_w + (1 - decay) * w, decay * ema_b + (1 - decay) * b
        got = metrics[t - 1]
        np.testing.assert_allclose(got["loss"], loss, rtol=1e-5)
        np.testing.assert_allclose(got["grad_norm"], norm, rtol=1e-5)
        np.testing.assert_allclose(got["lr"], lr, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(got["ema_decay"], decay, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(state.params["head"]["kernel"]), w, atol=2e-6)
    np.testing.assert_allclose(np.asarray(state.params["head"]["bias"]), b, atol=2e-6)
    np.testing.assert_allclose(np.asarray(state.ema_params["head"]["kernel"]), ema_w, atol=2e-6)
    np.testing.assert_allclose(np.asarray(state.ema_params["head"]["bias"]), ema_b, atol=2e-6)
    assert int(state.step) == 4


def test_lr_schedules_match_closed_forms():
    cosine = make_lr_schedule(dict(schedule="cosine", learning_rate=2.0, warmup_steps=4, decay_steps=12, end_lr_ratio=0.25))
    constant = make_lr_schedule(dict(schedule="constant", learning_rate=2.0, warmup_steps=4))
    for s in range(16):
        if s < 4:
            want_cos = want_const = 2.0 * s / 4
        else:
            frac = min(s - 4, 8) / 8
            want_cos = 0.5 + 1.5 * 0.5 * (1 + math.cos(math.pi * frac))
            want_const = 2.0
        np.testing.assert_allclose(float(cosine(s)), want_cos, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(float(constant(s)), want_const, rtol=1e-6, atol=1e-7)


def _bad(config_edit, num_devices=8):
    config = tt.tiny_config(steps=10)
    config_edit(config)
    with pytest.raises(ValueError) as info:
        resolve_config(config, num_devices)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_bad_config_values_raise_one_line_value_errors():
    def batch(c):
        c.train.global_batch_size = 12

    assert "global_batch_size=12" in _bad(batch)

    def micro(c):
        c.train.num_microbatches = 4  # 16 / 8 devices = 2 rows per device, not 4 microbatches

    assert "microbatches" in _bad(micro)

    def too_big(c):
        c.mesh.shape = {"data": 4, "fsdp": 4, "tensor": 1}

    assert "needs 16 devices" in _bad(too_big)

    def unknown_axis(c):
        c.mesh.shape = {"data": -1, "model": 2}

    assert "'model'" in _bad(unknown_axis)

    def two_wildcards(c):
        c.mesh.shape = {"data": -1, "fsdp": -1, "tensor": 1}

    assert "more than one -1" in _bad(two_wildcards)

    def preset(c):
        c.sharding.preset = "zero3"

    assert "'zero3'" in _bad(preset)

    def rule(c):
        c.sharding.logical_axis_rules = [["embed", "model"]]

    assert "'model'" in _bad(rule)

    def schedule(c):
        c.optimizer.schedule = "linear"

    assert "'linear'" in _bad(schedule)


def test_fsdp_shardings_report():
    """Prints the shardings of the stand-in model under fsdp=8 and data2 x fsdp4 (for the
    closing note) and checks the per-device sizes add up to the whole parameter count."""
    task = tt.tiny_task()
    boxed = jax.eval_shape(task.init_params, jax.random.key(0))
    abstract = nn.unbox(boxed)
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract))
    for shape in ({"data": 1, "fsdp": 8, "tensor": 1}, {"data": 2, "fsdp": 4, "tensor": 1}):
        mesh = make_mesh({"shape": shape})
        shardings = mesh_lib.param_shardings(boxed, mesh, logical_axis_rules({"preset": "fsdp"}))
        per_device = sum(math.prod(s.shard_shape(x.shape)) for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)))
        print(f"mesh {shape}: {total} params, {per_device} per device")
        print("\n".join(mesh_lib.describe_shardings(abstract, shardings)))
        assert total / shape["fsdp"] <= per_device < total


def test_bf16_model_keeps_float32_params_optimizer_state_ema_and_metrics():
    """Abstract evaluation of init and step with a bfloat16-compute model: every float leaf
    of the state, before and after the step, is float32 (only activations are bf16)."""
    config = _config({"data": 8, "fsdp": 1, "tensor": 1}, "dp", num_microbatches=2)
    task = tt.tiny_task(dtype=jnp.bfloat16)
    mesh = make_mesh(config.mesh)
    tx, schedule = make_optimizer(config.optimizer)
    abstract, shardings = state_shardings(task.init_params, tx, mesh, logical_axis_rules(config.sharding), 7)
    step_fn = make_train_step(task.loss_fn, tx, schedule, config.train, config.ema, mesh=mesh, state_shardings=shardings)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tt.global_batch(0, 16))
    new_state, metrics = jax.eval_shape(step_fn, abstract, batch, jax.eval_shape(lambda: jax.random.key(0)))
    for tree in (abstract, new_state):
        for part in (tree.params, tree.opt_state, tree.ema_params):
            dtypes = {x.dtype for x in jax.tree.leaves(part) if jnp.issubdtype(x.dtype, jnp.floating)}
            assert dtypes == {jnp.dtype(jnp.float32)}, dtypes
    assert {m.dtype for m in metrics.values()} == {jnp.dtype(jnp.float32)}
    assert jax.tree.structure(new_state) == jax.tree.structure(abstract)


def test_compiled_step_traces_under_its_mesh_and_leaves_no_mesh_behind():
    """Mesh-aware kernels (splash's shard_map) read jax.sharding.get_abstract_mesh() while the
    step traces; outside the step no mesh is left in context (fresh arrays stay uncommitted)."""
    from ldm_jax.models import partitioning as P
    from ldm_jax.training import (
        compile_train_step, create_sharded_state, logical_axis_rules, make_mesh, make_optimizer,
        make_train_step, state_shardings,
    )

    model = P.dense(4, name="d")
    seen = []

    def init(key):
        return model.init(key, jnp.zeros((1, 3)))["params"]

    def loss(params, batch, key):
        seen.append(jax.sharding.get_abstract_mesh())
        return jnp.mean((model.apply({"params": params}, batch["x"]) - 1.0) ** 2), {}

    mesh = make_mesh({"shape": {"data": -1, "fsdp": 1, "tensor": 1}})
    tx, lr = make_optimizer({"schedule": "constant", "warmup_steps": 0})
    _, shardings = state_shardings(init, tx, mesh, logical_axis_rules({"preset": "dp"}), seed=0)
    state = create_sharded_state(init, tx, shardings, seed=0)
    step = compile_train_step(make_train_step(loss, tx, lr, {}, {}, mesh=mesh, state_shardings=shardings), shardings, mesh)
    state, metrics = step(state, {"x": jnp.ones((len(jax.devices()), 3))}, jax.random.key(0))
    assert np.isfinite(float(metrics["loss"]))
    assert seen and dict(zip(seen[0].axis_names, seen[0].axis_sizes)) == dict(mesh.shape)
    assert jax.sharding.get_abstract_mesh().empty
