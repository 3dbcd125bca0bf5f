"""SIGTERM handling: finish the current step, save, exit cleanly.

Cloud schedulers (preemptible TPU/GPU VMs, Kubernetes, SLURM) send SIGTERM and allow a
grace period. The handler only sets a flag; the training loop polls ``should_stop`` at each
step boundary, saves a checkpoint and returns. In a multi-process run the flag is OR-ed
across processes so every process stops at the same step (a save is a collective).
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


class PreemptionGuard:
    """Context manager installing a flag-setting handler for ``signals`` (default SIGTERM)
    in the main thread, and restoring the previous handlers on exit.

    ``should_stop()`` is the stop decision agreed by all processes; in multi-process runs
    it is a small all-gather, so call it at step boundaries only.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self._signals = tuple(signals)
        self._previous: dict[int, Any] = {}
        self._event = threading.Event()
        self.received: int | None = None

    def _handler(self, signum, frame) -> None:
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
        if jax.process_count() == 1:
            return local
        flags = multihost_utils.process_allgather(np.asarray(local, np.int32))
        return bool(np.any(flags))
