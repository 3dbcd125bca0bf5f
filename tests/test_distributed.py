"""Multi-process training with jax.distributed on 127.0.0.1, and start-up settings.

Truth for the two-process run: the same script in one process with 8 devices (same mesh,
same global batches); the two processes must also end with identical params.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from ldm_jax.training import initialize_distributed, make_mesh, process_batch_rows, training_defaults
from ldm_jax.training.mesh import batch_sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "scripts", "tiny_training.py")
# The arguments of test_checkpointing's runs, so that in one session the one-process
# reference reuses their compiled programs from the shared persistent cache.
STEPS = 24
ARGS = ["--steps", str(STEPS), "--every", "4", "--preset", "fsdp", "--mesh", "data=2,fsdp=4"]
TIMEOUT = 400  # a hang guard, not a speed check


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.getbasetemp() / "training_jax_cache")


def _env(devices: int, cache_dir: str | None = None) -> dict:
    env = dict(os.environ)
    env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    if cache_dir:
        env.update(
            JAX_COMPILATION_CACHE_DIR=cache_dir,
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
        )
    return env


def _load(path):
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def test_two_process_run_matches_itself_and_a_one_process_8_device_run(tmp_path, cache_dir):
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, SCRIPT, *ARGS, "--ckpt_dir", str(tmp_path / "multi"), "--out", str(tmp_path / f"p{i}.npz"),
             "--coordinator", f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(i)],
            env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    single = subprocess.Popen(
        [sys.executable, SCRIPT, *ARGS, "--ckpt_dir", str(tmp_path / "single"), "--out", str(tmp_path / "single.npz")],
        env=_env(8, cache_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    outputs = []
    try:
        for proc in (*procs, single):
            out, err = proc.communicate(timeout=TIMEOUT)
            assert proc.returncode == 0, err[-4000:]
            outputs.append(out)
    finally:
        for proc in (*procs, single):
            if proc.poll() is None:
                proc.kill()

    # Each process loaded its own half of every global batch.
    rows = sorted(re.search(r"process (\d) loads rows (\d+):(\d+)", out).groups() for out in outputs[:2])
    assert rows == [("0", "0", "8"), ("1", "8", "16")]
    for out in outputs:
        assert f"finished step={STEPS} preempted=False" in out

    p0, p1, ref = _load(tmp_path / "p0.npz"), _load(tmp_path / "p1.npz"), _load(tmp_path / "single.npz")
    assert p0.keys() == p1.keys() == ref.keys() and len(ref) > 0
    for name in ref:
        np.testing.assert_array_equal(p0[name], p1[name], err_msg=name)
    worst = max(float(np.max(np.abs(p0[k] - ref[k]))) for k in ref)
    # Only the order of cross-process reductions differs from the one-process run.
    assert worst < 1e-6, worst
    # Both processes wrote each checkpoint together (each its own shards); the last 2 are kept.
    assert sorted(int(n) for n in os.listdir(tmp_path / "multi") if n.isdigit()) == [STEPS - 4, STEPS]


def test_initialize_distributed_is_a_no_op_for_one_process():
    assert initialize_distributed(training_defaults()) is False
    config = training_defaults()
    config.distributed.num_processes = 1
    assert initialize_distributed(config) is False
    assert jax.process_count() == 1


@pytest.mark.parametrize(
    "settings, env, expected",
    [
        ({"coordinator_address": "127.0.0.1:1234"}, {}, "needs num_processes and process_id"),
        ({"num_processes": 2, "process_id": 0}, {}, "no coordinator_address"),
        ({}, {"LDM_JAX_NUM_PROCESSES": "2"}, "no coordinator_address"),
        ({"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 2}, {}, "process_id=2"),
    ],
)
def test_incomplete_distributed_settings_raise_one_line_value_error(settings, env, expected, monkeypatch):
    for name in ("LDM_JAX_COORDINATOR_ADDRESS", "LDM_JAX_NUM_PROCESSES", "LDM_JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = training_defaults()
    config.distributed.update(settings)
    with pytest.raises(ValueError) as info:
        initialize_distributed(config)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_process_batch_rows_is_the_whole_batch_in_one_process():
    mesh = make_mesh({"shape": {"data": 2, "fsdp": 4}})
    assert process_batch_rows(batch_sharding(mesh), 16) == slice(0, 16)
