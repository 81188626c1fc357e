"""Reading and writing files that someone else may have put there, without letting them stop the agent.

Every file the agent reads (manifests, GGUF headers, its state, its config, server logs) may be a FIFO (``open``
blocks until a writer appears), a symlink to ``/dev/zero`` (a read never ends), a directory or a socket, or simply
huge. So a file is opened with ``O_NONBLOCK`` (a FIFO opens at once instead of waiting for a writer), checked with
``fstat`` on the opened descriptor (no race between the check and the read) to be a regular file after following
links, and read up to a cap: anything else is refused with ``UnsafeFile``, an ``OSError`` that says why, so callers
report it like any unreadable file. Async callers read in a worker thread (``read_bytes_async``), never on the
event loop.

Writes of the agent's own small files are atomic (a temporary file in the same directory, fsync, rename) and
never leave the temporary file behind, whatever fails.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import anyio.to_thread

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700


class UnsafeFile(OSError):
    """A file the agent refuses to read: not a regular file, or larger than allowed. ``str()`` says why."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(errno.EINVAL, reason, os.fspath(path))
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


@contextlib.contextmanager
def open_regular(path: str | os.PathLike[str], max_bytes: int | None = None) -> Iterator[tuple[int, int]]:
    """``(fd, size)`` of a regular file (links followed), opened without blocking; UnsafeFile for anything else.

    The descriptor is switched back to blocking mode once it is known to be a regular file (reads of regular files
    never block on a pipe's writer) and closed on exit.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeFile(path, f"refused: {_kind(info.st_mode)}, not a regular file")
        if max_bytes is not None and info.st_size > max_bytes:
            raise UnsafeFile(path, f"refused: {info.st_size} bytes, more than the limit of {max_bytes}")
        os.set_blocking(fd, True)
        yield fd, info.st_size
    finally:
        os.close(fd)


def read_bytes(path: str | os.PathLike[str], max_bytes: int) -> bytes:
    """The whole content of a regular file of at most ``max_bytes`` (a file that grows while read is refused)."""
    with open_regular(path, max_bytes) as (fd, _):
        parts: list[bytes] = []
        size = 0
        while True:
            block = os.read(fd, min(1 << 20, max_bytes + 1 - size))
            if not block:
                return b"".join(parts)
            parts.append(block)
            size += len(block)
            if size > max_bytes:
                raise UnsafeFile(path, f"refused: more than the limit of {max_bytes} bytes")


def read_text(path: str | os.PathLike[str], max_bytes: int, encoding: str = "utf-8") -> str:
    return read_bytes(path, max_bytes).decode(encoding)


async def read_bytes_async(path: str | os.PathLike[str], max_bytes: int) -> bytes:
    """``read_bytes`` in a worker thread: a slow disk never stalls the event loop."""
    return await anyio.to_thread.run_sync(read_bytes, path, max_bytes)


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) if needed and make it 0700: logs and state are no one else's business."""
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    info = path.stat()
    if info.st_mode & 0o077 and info.st_uid == os.getuid():
        os.chmod(path, PRIVATE_DIR)
    return path


def write_atomic(path: Path, data: bytes, mode: int = PRIVATE_FILE) -> None:
    """Replace ``path`` with ``data`` atomically (temporary file, fsync, rename); the temporary never remains.

    Raises the OSError of whatever failed (a read-only directory, a full disk): the caller decides what it means.
    """
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), mode)
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
