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


TINY_AE = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from configs import digits_autoencoder

    def get_config(arg=None):
        c = digits_autoencoder.get_config("runlocal")
        c.data.resolution = 8
        c.autoencoder.block_out_channels = (8,)
        c.train.global_batch_size = 8
        c.train.num_steps = 100_000  # stopped by the signal long before
        c.train.log_every = 1000
        c.optimizer.warmup_steps = 1
        c.checkpoint.every_steps = 1
        c.checkpoint.async_save = False
        c.logging.progress_bar = False
        c.logging.tensorboard = False
        c.preview.every_steps = -1
        c.export.enabled = False
        return c
""").format(root=ROOT)


def test_train_py_sigint_saves_a_resumable_checkpoint_and_exits_130(tmp_path):
    """train.py end to end: Ctrl-C (SIGINT) once the first checkpoint exists -> a checkpoint
    of the step reached, exit 130, one line; the checkpoint restores (verified manifest)."""
    import time

    config = tmp_path / "tiny_ae.py"
    config.write_text(TINY_AE)
    workdir = tmp_path / "run"
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--config", str(config),
                             "--workdir", str(workdir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env=env)
    checkpoints = workdir / "checkpoints"
    deadline = time.monotonic() + 600
    try:
        while not (checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 600 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert sum(line.startswith("train.py:") for line in lines) == 1
    assert lines[-1].startswith("train.py: stopped by SIGINT at step ") and "re-run the same command" in lines[-1]
    step = int(lines[-1].split(" at step ")[1].split(";")[0])

    from ldm_jax.training.checkpointing import Checkpointer
    from ldm_jax.training.workdir import checkpoint_steps

    assert checkpoint_steps(workdir)[-1] == step >= 1
    with Checkpointer(checkpoints, async_save=False) as checkpointer:
        manifest = checkpointer.read_manifest(step)
        assert manifest is not None and all(manifest["finite"].values())
        found = checkpointer.latest_intact_metadata()
    assert found is not None and found[0] == step and found[1]["data_position"] == step
