"""Pretrained initialisation in the shared loop (``Task.load_params``): a fresh run's state is born
sharded with the loaded entries in place of their random init (EMA equal to them, Adam's moments
zero), the other entries as the random init; a resume restores the checkpoint and never calls
the loader; the resume guard allows ``diffusion.init_from`` to change and still refuses the
objective's keys beside it.

Truths: the arrays handed to the loader (host copies, exactly), the task's own random init from
the same key (``jax.random.split(key(seed))[0]``, as ``train_state`` splits it; up to float
rounding), the planned shardings.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
import tiny_training as tt  # noqa: E402

from ldm_jax.training import logical_axis_rules, make_mesh, make_optimizer, resolve_config, state_shardings  # noqa: E402
from ldm_jax.training import resume_guard  # noqa: E402
from ldm_jax.training.loop import create_initial_state, train  # noqa: E402

MESH = {"data": 1, "fsdp": 8, "tensor": 1}
LOADED = ("conv_in", "block")


def _pretrained(task):
    abstract = jax.eval_shape(lambda: nn.unbox(task.init_params(jax.random.key(0))))
    rng = np.random.default_rng(11)
    return {k: jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), abstract[k]) for k in LOADED}


def _loader(pretrained, calls):
    def load_params(abstract, shardings):
        calls.append(sorted(abstract))
        return {k: jax.tree.map(lambda v, s: jax.make_array_from_callback(v.shape, s, lambda i, v=v: v[i]),
                                pretrained[k], shardings[k]) for k in LOADED}

    return load_params


def _flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_fresh_state_is_born_sharded_with_the_loaded_params_as_params_and_ema():
    config = resolve_config(tt.tiny_config(steps=10, preset="fsdp", mesh=MESH), 8)
    base = tt.tiny_task()
    pretrained, calls = _pretrained(base), []
    task = dataclasses.replace(base, load_params=_loader(pretrained, calls))
    mesh = make_mesh(config.mesh)
    tx, _ = make_optimizer(config.optimizer)
    abstract, shardings = state_shardings(task.init_params, tx, mesh, logical_axis_rules(config.sharding), config.seed)
    state = create_initial_state(task, tx, abstract, shardings, config.seed)
    assert len(calls) == 1

    assert [x.sharding for x in jax.tree.leaves(state)] == jax.tree.leaves(shardings)
    kernel = state.params["block"]["conv1"]["kernel"]  # [3, 3, 16, 16], input channels over fsdp
    assert {s.data.shape for s in kernel.addressable_shards} == {(3, 3, 2, 16)}
    random_init = jax.device_get(nn.unbox(base.init_params(jax.random.split(jax.random.key(config.seed))[0])))
    params, ema = jax.device_get(state.params), jax.device_get(state.ema_params)
    for key in params:
        # Loaded entries exactly; the others are the random init (computed eagerly here, in the
        # sharded init program there: equal up to float rounding of the initialisers' scaling).
        check = np.testing.assert_array_equal if key in LOADED else (
            lambda a, b, err_msg: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8, err_msg=err_msg))
        want = pretrained[key] if key in LOADED else random_init[key]
        for name, value in _flat(want).items():
            check(_flat(params[key])[name], value, err_msg=f"{key}{name}")
            np.testing.assert_array_equal(_flat(ema[key])[name], _flat(params[key])[name], err_msg=f"ema {key}{name}")
    moments = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
    assert moments and all(not np.any(jax.device_get(x)) for x in moments)
    assert int(state.step) == 0


def test_loaded_entry_with_a_wrong_shape_is_one_line_naming_its_path():
    config = resolve_config(tt.tiny_config(steps=10, preset="fsdp", mesh=MESH), 8)
    base = tt.tiny_task()

    def load_params(abstract, shardings):
        return {"conv_in": {"kernel": np.zeros((3, 3, 4, 8), np.float32), "bias": np.zeros((16,), np.float32)}}

    task = dataclasses.replace(base, load_params=load_params)
    mesh = make_mesh(config.mesh)
    tx, _ = make_optimizer(config.optimizer)
    abstract, shardings = state_shardings(task.init_params, tx, mesh, logical_axis_rules(config.sharding), config.seed)
    with pytest.raises(ValueError, match=r"conv_in\['kernel'\]: float32\[3, 3, 4, 8\], the model has float32\[3, 3, 4, 16\]"):
        create_initial_state(task, tx, abstract, shardings, config.seed)


def test_resume_restores_the_checkpoint_and_never_calls_the_loader(tmp_path):
    base = tt.tiny_task()
    pretrained, calls = _pretrained(base), []
    ckpt = tmp_path / "ckpt"
    first = train(tt.tiny_config(steps=4, every=4, preset="fsdp", mesh=MESH),
                  dataclasses.replace(base, load_params=_loader(pretrained, calls)), tt.batch_source(16), ckpt)
    assert first.step == 4 and first.resumed_from is None and len(calls) == 1
    trained = _flat(jax.device_get(first.state.params))

    def refuse(abstract, shardings):
        raise AssertionError("the loader was called on resume")

    # Resumed with a loader that must not run: the params continue from the checkpoint.
    config = tt.tiny_config(steps=5, every=4, preset="fsdp", mesh=MESH)
    seen = []

    def hook_start(step):
        seen.append(step)

    resumed = train(config, dataclasses.replace(base, load_params=refuse), tt.batch_source(16), ckpt,
                    on_start=hook_start)
    assert resumed.resumed_from == 4 and resumed.step == 5 and seen == [4]
    # ... and differ from the pretrained values they started from four steps before.
    assert any(np.any(trained[f"['{k}']{name}"] != value) for k in LOADED for name, value in _flat(pretrained[k]).items())


def test_resume_guard_allows_init_from_and_refuses_the_objective_beside_it(tmp_path):
    directory = tmp_path / "checkpoints"
    (directory / "4").mkdir(parents=True)
    stored = {"stage": "diffusion", "diffusion": {"init_from": "/models/sdxl", "prediction": "eps"}}
    (directory / resume_guard.CONFIG_FILE).write_text(json.dumps(stored))
    assert resume_guard.classify("diffusion.init_from") is None
    moved = {"stage": "diffusion", "diffusion": {"init_from": "/mnt/other/sdxl", "prediction": "eps"}}
    assert resume_guard.check_resume(directory, moved) == {"diffusion.init_from": ["/models/sdxl", "/mnt/other/sdxl"]}
    scratch = {"stage": "diffusion", "diffusion": {"init_from": None, "prediction": "eps"}}
    assert "diffusion.init_from" in resume_guard.check_resume(directory, scratch)
    with pytest.raises(resume_guard.ResumeRefused, match="objective: diffusion.prediction"):
        resume_guard.check_resume(directory, {"stage": "diffusion", "diffusion": {"init_from": "/x", "prediction": "v"}})
