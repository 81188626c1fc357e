"""One agent per state directory.

Two agents on one state directory would both adopt the same servers and both admit against the same memory.
An exclusive ``flock`` on ``STATE/agent.lock`` is held for the agent's lifetime; the kernel releases it when
the process dies, however it dies, so a crashed agent never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO


class AlreadyRunning(RuntimeError):
    """Another agent holds the state directory."""


class InstanceLock:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "agent.lock"
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise AlreadyRunning(
                f"another metal-agent (pid {holder}) is running on {self.path.parent}; stop it or use another "
                "--state-dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
