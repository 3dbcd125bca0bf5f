"""Workdir lock: one run per workdir, stale locks of dead runs taken over, released on exit.

Truths: the operating system (a second open file description cannot take a held flock; a
process that exits, even by os._exit without cleanup, drops its locks) and the owner record
the holding subprocess wrote about itself (its own pid).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from ldm_jax.training.workdir_lock import LOCK_FILE, WorkdirLock, WorkdirLockedError, lock_workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 60

HOLDER = textwrap.dedent("""
    import importlib.util, os, sys
    # The module file alone (no package import, so no JAX start-up): it needs only the stdlib.
    spec = importlib.util.spec_from_file_location("workdir_lock", {path!r})
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    WorkdirLock = module.WorkdirLock
    lock = WorkdirLock(sys.argv[1]).acquire()
    print(os.getpid(), flush=True)
    mode = sys.argv[2]
    if mode == "crash":
        os._exit(9)            # dies without releasing: the lock file stays behind
    if mode == "hold":
        sys.stdin.readline()   # holds the lock until the test closes stdin
    lock.release()
""").format(path=os.path.join(ROOT, "ldm_jax", "training", "workdir_lock.py"))


def _holder(workdir, mode):
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir), mode], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def test_second_locker_is_refused_with_one_line_naming_the_owner(tmp_path):
    with WorkdirLock(tmp_path) as first:
        owner = json.load(open(first.path))
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname() and owner["started"]
        with pytest.raises(WorkdirLockedError) as info:
            WorkdirLock(tmp_path).acquire()
    message = str(info.value)
    assert "\n" not in message
    assert f"is in use by pid {os.getpid()} on host {socket.gethostname()}" in message
    assert not os.path.exists(tmp_path / LOCK_FILE)  # released on exit
    with WorkdirLock(tmp_path) as again:  # and free again
        assert again.held and again.took_over is None


def test_live_lock_of_another_process_refuses_then_its_exit_releases_it(tmp_path):
    proc = _holder(tmp_path, "hold")
    pid = int(proc.stdout.readline())
    try:
        with pytest.raises(WorkdirLockedError, match=f"in use by pid {pid} on host"):
            WorkdirLock(tmp_path).acquire()
    finally:
        proc.stdin.close()
        assert proc.wait(TIMEOUT) == 0
    assert not os.path.exists(tmp_path / LOCK_FILE)
    with WorkdirLock(tmp_path) as lock:
        assert lock.took_over is None


def test_stale_lock_of_a_crashed_process_is_taken_over_with_a_logged_line(tmp_path, caplog):
    proc = _holder(tmp_path, "crash")
    pid = int(proc.stdout.readline())
    assert proc.wait(TIMEOUT) == 9
    assert json.load(open(tmp_path / LOCK_FILE))["pid"] == pid  # left behind
    caplog.set_level(logging.WARNING, logger="ldm_jax.training.workdir_lock")
    with lock_workdir(tmp_path) as lock:
        assert lock.took_over["pid"] == pid
        assert json.load(open(tmp_path / LOCK_FILE))["pid"] == os.getpid()
    [line] = [r.getMessage() for r in caplog.records if "stale lock" in r.getMessage()]
    assert f"left by pid {pid} on host {socket.gethostname()}" in line
    assert not os.path.exists(tmp_path / LOCK_FILE)


def test_exclusive_create_fallback_takes_over_dead_pid_and_refuses_live_one(tmp_path, caplog):
    lock = WorkdirLock(tmp_path)
    dead = _holder(tmp_path, "crash")
    dead_pid = int(dead.stdout.readline())
    dead.wait(TIMEOUT)
    caplog.set_level(logging.WARNING, logger="ldm_jax.training.workdir_lock")
    lock._acquire_exclusive_create()  # the path taken where flock is unsupported
    assert lock.took_over["pid"] == dead_pid
    with pytest.raises(WorkdirLockedError, match=f"in use by pid {os.getpid()}"):
        WorkdirLock(tmp_path)._acquire_exclusive_create()
    lock.release()
    assert not os.path.exists(tmp_path / LOCK_FILE)


def test_workdir_that_is_a_file_or_missing_fails_in_one_line(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(WorkdirLockedError, match=f"cannot lock workdir {a_file}: not a directory"):
        WorkdirLock(a_file).acquire()
    with pytest.raises(WorkdirLockedError, match="not a directory"):
        WorkdirLock(tmp_path / "missing").acquire()
