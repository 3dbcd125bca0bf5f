"""One run per workdir: a lock file naming its owner (pid, host, start time, command).

Two runs writing the same checkpoints collide mid-write. ``WorkdirLock`` takes an exclusive
``fcntl.flock`` on ``<workdir>/.lock`` and writes the owner into it. flock is held by the open
file, so the kernel releases it when the owner dies, even by kill -9: a lock file left behind
by a dead run is stale by construction, and the next run takes it over with one log line
naming the dead owner. A live owner makes the second run fail with one line naming it.

Where flock is not supported (some network filesystems) the file itself is the lock: it is
created with O_EXCL, and a file left by a pid that no longer exists on this host is taken over;
one owned by another host cannot be checked from here and refuses (remove it by hand once
that run is gone).

Multi-process runs: only process 0 takes the lock (all processes of a run share one workdir
and one run identity); ``lock_workdir`` broadcasts process 0's outcome, so when the workdir is
taken every process raises the same error instead of the others hanging in a collective.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys
from typing import Iterator

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class WorkdirLockedError(RuntimeError):
    """The workdir is locked by another run, or cannot be locked at all (one line)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _describe(owner: dict) -> str:
    if not owner:
        return "an unknown owner (empty lock file)"
    return (f"pid {owner.get('pid')} on host {owner.get('host')} (started {owner.get('started')}, "
            f"command: {owner.get('command', '?')})")


def _read_owner(path: str) -> dict:
    try:
        with open(path) as f:
            text = f.read()
        return json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {}


class WorkdirLock:
    """``with WorkdirLock(workdir): ...`` holds the lock for the block (created on enter,
    removed on exit). ``acquire`` raises WorkdirLockedError (one line) when it is taken."""

    def __init__(self, workdir: str | os.PathLike):
        self.workdir = os.path.abspath(os.fspath(workdir))
        self.path = os.path.join(self.workdir, LOCK_FILE)
        self._fd: int | None = None
        self.took_over: dict | None = None  # the stale owner replaced, if any

    def _owner_record(self) -> dict:
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:200],
        }

    def _write_owner(self, fd: int) -> None:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(self._owner_record()).encode())
        os.fsync(fd)

    def _open(self, flags: int) -> int:
        try:
            return os.open(self.path, flags, 0o644)
        except FileExistsError:
            raise
        except OSError as error:
            raise WorkdirLockedError(f"cannot lock workdir {self.workdir}: {error.strerror} ({self.path})") from None

    def acquire(self) -> "WorkdirLock":
        if self._fd is not None:
            return self
        if not os.path.isdir(self.workdir):
            raise WorkdirLockedError(f"cannot lock workdir {self.workdir}: not a directory")
        for _ in range(10):  # retries only when the file is replaced under us
            fd = self._open(os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                owner = _read_owner(self.path)
                hint = ""
                if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int) \
                        and not _pid_alive(owner["pid"]):
                    hint = " (that pid has exited, but a process it started still holds the lock)"
                raise WorkdirLockedError(
                    f"workdir {self.workdir} is in use by {_describe(owner)}{hint}; lock file {self.path}"
                ) from None
            except OSError as error:
                os.close(fd)
                if error.errno in _NO_FLOCK:
                    return self._acquire_exclusive_create()
                raise WorkdirLockedError(f"cannot lock workdir {self.workdir}: {error.strerror}") from None
            # The path may have been removed (a releasing owner) between open and flock: then
            # we hold a lock on an orphaned file; start again.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = _read_owner(self.path)
            if previous:
                # The kernel dropped the previous owner's flock, so it died without releasing.
                self.took_over = previous
                log.warning("took over the stale lock of workdir %s left by %s", self.workdir, _describe(previous))
            self._write_owner(fd)
            self._fd = fd
            return self
        raise WorkdirLockedError(f"cannot lock workdir {self.workdir}: lock file keeps being replaced")

    def _acquire_exclusive_create(self) -> "WorkdirLock":
        """Fallback without flock: the file's existence is the lock (O_EXCL creation)."""
        for _ in range(3):
            try:
                fd = self._open(os.O_RDWR | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                owner = _read_owner(self.path)
                same_host = owner.get("host") == socket.gethostname()
                pid = owner.get("pid")
                if same_host and isinstance(pid, int) and not _pid_alive(pid):
                    # Rename first: of two runs taking over, exactly one rename succeeds.
                    aside = f"{self.path}.stale.{os.getpid()}"
                    try:
                        os.rename(self.path, aside)
                    except FileNotFoundError:
                        continue
                    os.remove(aside)
                    self.took_over = owner
                    log.warning("took over the stale lock of workdir %s left by %s", self.workdir, _describe(owner))
                    continue
                where = "" if same_host else " (another host: remove the lock file if that run is gone)"
                raise WorkdirLockedError(
                    f"workdir {self.workdir} is in use by {_describe(owner)}{where}; lock file {self.path}"
                ) from None
            self._write_owner(fd)
            self._fd = fd
            return self
        raise WorkdirLockedError(f"cannot lock workdir {self.workdir}: lock file keeps being replaced")

    def release(self) -> None:
        if self._fd is None:
            return
        # Remove the file while still holding the lock, so nobody reads a stale owner.
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def lock_workdir(workdir: str | os.PathLike) -> Iterator[WorkdirLock | None]:
    """Hold the workdir lock for the block: process 0 locks, the others learn the outcome.

    Yields the lock on process 0 and None on the other processes. Every process raises
    WorkdirLockedError when process 0 could not lock (a collective: call it on all)."""
    import jax  # local: the lock itself needs no JAX (tests lock from bare subprocesses)

    if jax.process_count() == 1:
        with WorkdirLock(workdir) as lock:
            yield lock
        return
    import numpy as np
    from jax.experimental import multihost_utils

    lock, error = None, None
    if jax.process_index() == 0:
        try:
            lock = WorkdirLock(workdir).acquire()
        except WorkdirLockedError as caught:
            error = caught
    ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
    if error is not None:
        raise error
    if not int(ok):
        raise WorkdirLockedError(f"workdir {os.path.abspath(os.fspath(workdir))} is locked (see process 0's error)")
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
