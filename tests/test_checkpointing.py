"""Checkpointing and fault handling of the training loop.

Truths: an uninterrupted run of the same script (resumption after kill -9 or SIGTERM must
reproduce its params bit for bit on CPU), and the arrays that were saved (round trip).
Training runs are subprocesses of tests/scripts/tiny_training.py sharing a persistent JAX
compilation cache, so only the first one compiles.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as PS

from ldm_jax.training import Checkpointer, TrainState, abstract_with_shardings, make_mesh, write_config_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "scripts", "tiny_training.py")
STEPS, EVERY = 24, 4
COMMON = ["--steps", str(STEPS), "--every", str(EVERY), "--preset", "fsdp", "--mesh", "data=2,fsdp=4"]
TIMEOUT = 300  # seconds a subprocess may take before the test gives up (a hang, not a speed check)


@pytest.fixture(scope="module")
def run_env(tmp_path_factory):
    env = dict(os.environ)
    env.update(
        PYTHONPATH=ROOT,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.getbasetemp() / "training_jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
    )
    return env


def _start(args, env):
    return subprocess.Popen(
        [sys.executable, SCRIPT, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(proc):
    out, err = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, out, err


def _complete_steps(directory) -> list[int]:
    """Finalized checkpoints: orbax renames a step directory to its bare number only when complete."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def _wait_for_checkpoint(directory, proc, after: int = 0) -> list[int]:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        steps = _complete_steps(directory)
        if steps and steps[-1] > after:
            return steps
        if proc.poll() is not None:
            raise AssertionError(f"run exited (rc={proc.returncode}) before writing a checkpoint past {after}:\n"
                                 + proc.stderr.read()[-3000:])
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no checkpoint past step {after} in {directory} after {TIMEOUT}s")


def _load(path):
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, run_env):
    out = tmp_path_factory.mktemp("uninterrupted")
    rc, stdout, stderr = _finish(_start([*COMMON, "--ckpt_dir", str(out / "ckpt"), "--out", str(out / "p.npz")], run_env))
    assert rc == 0, stderr[-3000:]
    assert f"finished step={STEPS} preempted=False resumed_from=None" in stdout
    return _load(out / "p.npz")


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, run_env):
    """kill -9 after the first checkpoint, resume, SIGTERM after a later checkpoint, resume to the end."""
    out = tmp_path_factory.mktemp("interrupted")
    ckpt = str(out / "ckpt")
    args = [*COMMON, "--ckpt_dir", ckpt, "--sleep", "0.1"]
    facts = {}

    first = _start(args, run_env)
    _wait_for_checkpoint(ckpt, first)
    first.send_signal(signal.SIGKILL)
    facts["kill_rc"], _, _ = _finish(first)
    facts["after_kill"] = _complete_steps(ckpt)

    second = _start(args, run_env)
    _wait_for_checkpoint(ckpt, second, after=facts["after_kill"][-1])
    second.send_signal(signal.SIGTERM)
    facts["term_rc"], facts["term_out"], facts["term_err"] = _finish(second)
    facts["after_term"] = _complete_steps(ckpt)
    facts["leftovers_after_term"] = sorted(n for n in os.listdir(ckpt) if not n.isdigit() and n not in ("config.json", "config_history.jsonl"))
    with Checkpointer(ckpt) as checkpointer:
        facts["latest_after_term"] = checkpointer.latest_step()
        facts["term_metadata"] = checkpointer.metadata()

    third = _start([*COMMON, "--ckpt_dir", ckpt, "--out", str(out / "p.npz")], run_env)
    facts["final_rc"], facts["final_out"], facts["final_err"] = _finish(third)
    facts["params"] = _load(out / "p.npz") if facts["final_rc"] == 0 else None
    facts["config_json"] = json.load(open(os.path.join(ckpt, "config.json")))
    return facts


def test_kill_9_leaves_only_complete_checkpoints_and_resume_starts_from_the_last(interrupted):
    assert interrupted["kill_rc"] == -signal.SIGKILL
    assert interrupted["after_kill"] and all(s % EVERY == 0 for s in interrupted["after_kill"])
    # The second run resumed from the newest checkpoint the killed run had completed.
    assert f"resumed_from={interrupted['after_kill'][-1]}" in interrupted["term_out"]


def test_sigterm_saves_at_the_next_step_boundary_and_exits_zero(interrupted):
    assert interrupted["term_rc"] == 0, interrupted["term_err"][-3000:]
    line = [ln for ln in interrupted["term_out"].splitlines() if ln.startswith("finished")][-1]
    stopped_at = int(line.split("step=")[1].split()[0])
    assert "preempted=True" in line
    assert 0 < stopped_at < STEPS
    assert interrupted["latest_after_term"] == stopped_at
    assert interrupted["after_term"][-1] == stopped_at
    assert interrupted["term_metadata"] == {"step": stopped_at, "data_position": stopped_at}
    # The killed run's unfinished temporary directory (if any) was removed at restart.
    assert interrupted["leftovers_after_term"] == []
    assert f"resumed_from={stopped_at}" in interrupted["final_out"]


def test_resume_after_kill_9_and_sigterm_reproduces_uninterrupted_params_bitwise(interrupted, uninterrupted):
    assert interrupted["final_rc"] == 0, interrupted["final_err"][-3000:]
    got = interrupted["params"]
    assert got.keys() == uninterrupted.keys() and len(got) > 0
    for name, want in uninterrupted.items():
        np.testing.assert_array_equal(got[name], want, err_msg=name)
    # The resolved config sits beside the checkpoints, wildcard filled and rules spelled out.
    config = interrupted["config_json"]
    assert config["mesh"]["shape"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert ["embed", "fsdp"] in config["sharding"]["logical_axis_rules"]
    assert config["optimizer"]["decay_steps"] == STEPS


def test_nan_loss_stops_with_clear_message_and_last_checkpoint_resumes_exactly(tmp_path, run_env, uninterrupted):
    ckpt = str(tmp_path / "ckpt")
    # Batch number 9 holds a NaN, so update 10 is the first bad one; checkpoints every 4 steps.
    rc, stdout, stderr = _finish(_start([*COMMON, "--ckpt_dir", ckpt, "--nan_at", "9"], run_env))
    assert rc != 0
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith("FloatingPointError: non-finite loss=nan"), last_line
    assert "at step 10" in last_line and "last checkpoint is step 8" in last_line
    assert _complete_steps(ckpt) == [4, 8]
    # The last good checkpoint is intact: resuming from it without the NaN batch reproduces
    # the uninterrupted run exactly.
    rc, stdout, stderr = _finish(_start([*COMMON, "--ckpt_dir", ckpt, "--out", str(tmp_path / "p.npz")], run_env))
    assert rc == 0, stderr[-3000:]
    assert "resumed_from=8" in stdout
    got = _load(tmp_path / "p.npz")
    for name, want in uninterrupted.items():
        np.testing.assert_array_equal(got[name], want, err_msg=name)


def _small_state(mesh, scale: float) -> TrainState:
    fsdp = NamedSharding(mesh, PS("fsdp"))
    replicated = NamedSharding(mesh, PS())
    w = jax.device_put(np.arange(64, dtype=np.float32).reshape(16, 4) * scale, fsdp)
    return TrainState(
        step=jax.device_put(np.int32(3), replicated),
        params={"w": w},
        opt_state=({"mu": jax.device_put(np.full((16, 4), scale, np.float32), fsdp)}, jax.device_put(np.int32(3), replicated)),
        ema_params={"w": jax.device_put(np.ones((16, 4), np.float32) * -scale, fsdp)},
        rng=jax.device_put(jax.random.key_data(jax.random.key(11)), replicated),
    )


def test_checkpoint_round_trip_restores_saved_values_into_the_target_shardings(tmp_path):
    mesh = make_mesh({"shape": {"data": 2, "fsdp": 4, "tensor": 1}})
    states = {step: _small_state(mesh, float(step)) for step in (1, 2, 3)}
    with Checkpointer(tmp_path / "ckpt", max_to_keep=2) as checkpointer:
        for step, state in states.items():
            checkpointer.save(step, state, {"data_position": step * 10, "note": "x"})
        checkpointer.wait_until_finished()
        assert checkpointer.all_steps() == [2, 3]  # keep last N
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), states[3])
        shardings = jax.tree.map(lambda x: x.sharding, states[3])
        restored, meta = checkpointer.restore(abstract_with_shardings(target, shardings))
    assert meta == {"step": 3, "data_position": 30, "note": "x"}
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(states[3])):
        assert got.sharding == want.sharding
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert restored.params["w"].addressable_shards[0].data.shape == (4, 4)
    key = jax.random.wrap_key_data(restored.rng)
    np.testing.assert_array_equal(jax.random.key_data(jax.random.fold_in(key, 5)),
                                  jax.random.key_data(jax.random.fold_in(jax.random.key(11), 5)))

    path = write_config_json(tmp_path / "ckpt", {"train": {"global_batch_size": 8}, "mesh": {"shape": {"data": 8}}})
    assert json.load(open(path)) == {"mesh": {"shape": {"data": 8}}, "train": {"global_batch_size": 8}}
    assert not [n for n in os.listdir(tmp_path / "ckpt") if n.endswith(".tmp")]


def test_checkpoint_metadata_must_be_json_and_restore_needs_a_checkpoint(tmp_path):
    mesh = make_mesh({"shape": {"data": -1}})
    state = _small_state(mesh, 1.0)
    with Checkpointer(tmp_path / "ckpt") as checkpointer:
        with pytest.raises(TypeError):
            checkpointer.save(1, state, {"bad": object()})
        with pytest.raises(ValueError, match="no checkpoint to restore"):
            checkpointer.restore(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state))
