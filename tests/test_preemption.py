"""SIGINT/SIGTERM handling: a subprocess runs a stand-in training loop and sends itself the
signal mid-run. Truth: the operating system's signal delivery and the process exit status.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 120

LOOP = textwrap.dedent("""
    import importlib.util, os, signal, sys
    spec = importlib.util.spec_from_file_location("preemption", {path!r})
    preemption = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(preemption)
    sig, times = getattr(signal, sys.argv[1]), int(sys.argv[2])
    saved = None
    with preemption.PreemptionGuard() as guard:
        try:
            for step in range(1, 1000):
                if guard.should_stop():
                    saved = step  # the loop saves here
                    break
                if step == 3:
                    for _ in range(times):
                        os.kill(os.getpid(), sig)
        except KeyboardInterrupt as error:
            print(f"interrupted at step {{step}}: {{error}}", flush=True)
            if sys.argv[3] == "third":
                os.kill(os.getpid(), signal.SIGINT)  # default action now: killed
            raise SystemExit(1)
    print(f"saved at step {{saved}} after {{guard.describe()}}", flush=True)
    sys.exit(guard.exit_code)
""").format(path=os.path.join(ROOT, "ldm_jax", "training", "preemption.py"))


def _run(signal_name: str, times: int = 1, third: bool = False):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", LOOP, signal_name, str(times), "third" if third else "-"], capture_output=True, text=True,
                          timeout=TIMEOUT, env=env)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("signal_name, exit_code", [("SIGTERM", 0), ("SIGINT", 130)])
def test_signal_saves_at_next_step_boundary_and_sets_exit_code(signal_name, exit_code):
    rc, out, err = _run(signal_name)
    assert rc == exit_code, err[-2000:]
    assert f"saved at step 4 after {signal_name}" in out


def test_second_ctrl_c_interrupts_at_once_and_third_kills():
    rc, out, err = _run("SIGINT", times=2, third=True)
    # The second raised KeyboardInterrupt right where the program was (no save); the third,
    # sent while handling it, got the default action.
    assert "interrupted at step 3: second Ctrl-C: stopping now without saving" in out
    assert "saved at step" not in out
    assert rc == -signal.SIGINT, (rc, out, err[-2000:])


def test_request_stop_without_signal_exits_zero_and_handlers_are_restored():
    from ldm_jax.training.preemption import PreemptionGuard

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert signal.getsignal(signal.SIGINT) == guard._handler
        assert not guard.should_stop()
        guard.request_stop()
        assert guard.should_stop() and guard.signal_received is None and guard.exit_code == 0
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
