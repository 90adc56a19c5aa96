"""One process per run directory: ``<run_dir>/rltrain.lock``.

Two processes writing one run directory (a ``resume`` of a run that is still alive, two ``train`` with the same
name) cancel each other's rollouts, write every metric line twice and overwrite each other's checkpoints. So
every command that writes a run directory first takes its lock: an exclusive ``flock`` on ``rltrain.lock``,
which also names the holder (pid, host, command, start time) for the error the second process prints.

Why ``flock`` and not "the file exists": the kernel releases the lock when its holder dies, ``kill -9`` included,
so a lock left by a killed process is simply free to take (the new holder overwrites the stale name; nothing
has to guess whether an old pid is still alive or was reused). The file itself is never deleted: deleting it on
release would let a process that opened the old file and one that creates a new one both "hold" the lock.
``flock`` is per host; on a network file system shared by several hosts it may not exclude a process on another
host.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Self

logger = logging.getLogger(__name__)

LOCK_FILE = "rltrain.lock"


class RunDirError(RuntimeError):
    """A run directory cannot be used: another process holds it, or it cannot be written."""


class RunDirBusyError(RunDirError):
    """Another live process holds the run directory's lock."""


class RunDirLock:
    """``with RunDirLock(run_dir): ...`` holds ``run_dir`` for this process (see the module docstring)."""

    def __init__(self, run_dir: Path, command: str | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.command = command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) or "python"
        self._fd: int | None = None

    def acquire(self) -> Self:
        """Take the lock, or raise :class:`RunDirBusyError` naming the holder (:class:`RunDirError` when the
        directory cannot be written)."""
        if self._fd is not None:
            return self
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunDirError(f"{self.run_dir}: cannot write to the run directory ({exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(fd)
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                raise RunDirBusyError(f"{self.run_dir} is in use by {holder}; wait for it to finish or stop it "
                                      "(one process per run directory)") from None
            raise RunDirError(f"{self.path}: cannot lock the run directory ({exc.strerror or exc})") from None
        stale = _read_holder(fd)
        if stale != "an unnamed process":
            logger.info("%s: taking over the lock left by %s (no longer running)", self.run_dir, stale)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lock up (the file stays, emptied: see the module docstring)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass  # a read-only or full disk: the kernel lock is released below all the same
        finally:
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    """``pid 123 on host h (rltrain train r.yaml, since 2026-12-06 04:00:00)`` from the lock file's record."""
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode() or "null")
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict):
        return "an unnamed process"
    return (f"pid {record.get('pid')} on {record.get('host')} ({record.get('command')}, "
            f"since {record.get('started')})")
