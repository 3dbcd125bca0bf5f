"""SIGTERM and SIGINT handling: finish the current step, save, exit cleanly.

Cloud schedulers (preemptible TPU/GPU VMs, Kubernetes, SLURM) send SIGTERM and allow a
grace period; a user at a terminal presses Ctrl-C (SIGINT). Both are handled the same way:
the handler only sets a flag and records the signal; the training loop polls ``should_stop``
at each step boundary, saves a checkpoint and returns. ``exit_code`` then tells the CLI how
to end: 0 after SIGTERM (a preemption is a normal end: the scheduler restarts the job), 130
(128 + SIGINT, the shell convention) after Ctrl-C. In a multi-process run the signals are
gathered across processes so every process stops at the same step (a save is a collective)
and reports the same signal.

Ctrl-C escalates: the first one asks for a save at the next step boundary; a second one
raises KeyboardInterrupt right away (no save; ``finally`` blocks still run, e.g. the workdir
lock is released, and the last complete checkpoint stays valid); a third one gets the
default action and kills the process even when it is stuck in native code.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from typing import Any

log = logging.getLogger(__name__)

# What the CLI should return after a stop caused by each signal.
EXIT_CODES = {signal.SIGTERM: 0, signal.SIGINT: 128 + signal.SIGINT}
_REQUESTED = -1  # ``request_stop`` (no signal): encoded like a signal number when gathered


class PreemptionGuard:
    """Context manager installing a flag-setting handler for ``signals`` (default SIGTERM
    and SIGINT) in the main thread, and restoring the previous handlers on exit.

    ``should_stop()`` is the stop decision agreed by all processes; in multi-process runs
    it is a small all-gather, so call it at step boundaries only.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self._signals = tuple(signals)
        self._previous: dict[int, Any] = {}
        self._event = threading.Event()
        self.received: int | None = None  # the first signal this process received
        self._agreed: int | None = None  # the signal all processes agreed on (should_stop)
        self._interrupts = 0

    def _handler(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts == 2:
                # Further Ctrl-C: the default action (terminate), for a process stuck in C code.
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                raise KeyboardInterrupt("second Ctrl-C: stopping now without saving")
            log.warning("Ctrl-C: saving at the next step boundary, then exiting "
                        "(press Ctrl-C again to stop at once without saving)")
        if self.received is None:
            self.received = signum
        self._event.set()

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():
            for sig in self._signals:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def request_stop(self) -> None:
        """Ask for a stop as if a signal had arrived (tests, or a time budget)."""
        self._event.set()

    @property
    def local_flag(self) -> bool:
        return self._event.is_set()

    def should_stop(self) -> bool:
        local = self._event.is_set()
        code = self.received if self.received is not None else (_REQUESTED if local else 0)
        # A process that has not imported JAX is not part of a multi-process JAX run.
        jax = sys.modules.get("jax")
        if jax is None or jax.process_count() == 1:
            if local:
                self._agreed = code
            return local
        import numpy as np
        from jax.experimental import multihost_utils

        codes = np.asarray(multihost_utils.process_allgather(np.asarray(code, np.int32))).reshape(-1)
        if not np.any(codes != 0):
            return False
        received = [int(c) for c in codes if c > 0]
        # SIGINT wins: someone at a terminal asked for the run to end, not to be restarted.
        self._agreed = signal.SIGINT if signal.SIGINT in received else (received[0] if received else _REQUESTED)
        return True

    @property
    def signal_received(self) -> int | None:
        """The signal behind the stop (agreed across processes once ``should_stop`` said
        True; this process's own before that); None for ``request_stop`` or no stop."""
        agreed = self._agreed if self._agreed is not None else self.received
        return None if agreed in (None, _REQUESTED) else int(agreed)

    @property
    def exit_code(self) -> int:
        """What the CLI returns after the loop stopped: 130 for SIGINT, 0 otherwise."""
        return EXIT_CODES.get(self.signal_received, 0)

    def describe(self) -> str:
        """E.g. ``"SIGINT"``, for the one-line message at exit."""
        sig = self.signal_received
        return "a stop request" if sig is None else signal.Signals(sig).name
