"""A server's log writer: reads the server's output from a pipe and keeps its log file within a size bound.

Bounding a log after the fact (copy, then truncate, every probe) loses the race against a fast writer: a server
writing 20 MiB/s grew its log to 668 MiB between two probes. So the bound is enforced while writing: the server's
stdout and stderr are a pipe, and this small process (one per server) writes what it reads to ``LOG``, rotating
``LOG`` -> ``LOG.1`` -> ... -> ``LOG.KEEP`` before a write would take it past ``--max-bytes``. No file ever
exceeds the bound, whatever the rate; a faster writer only rotates more often.

It runs as its own process, not as a thread of the agent, so that a server outlives a restart of the agent (its
pipe keeps a reader) and is adopted with its log intact. It ends when the server closes the pipe (the server and
every process it started have exited), and ignores SIGTERM and SIGINT so that it writes the server's last words
after a stop. Files are created 0600 (server logs may quote prompts). It imports only the standard library: it is
started as ``python -I logwriter.py``, with no environment to find the agent's packages.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

CHUNK = 1 << 16


class RotatingLog:
    """``path`` and its rotated copies ``path.1`` .. ``path.keep``, none larger than ``max_bytes``."""

    def __init__(self, path: str, max_bytes: int, keep: int) -> None:
        self.path, self.max_bytes, self.keep = path, max_bytes, keep
        self.fd = self._open()
        self.size = os.fstat(self.fd).st_size

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)

    def rotate(self) -> None:
        os.close(self.fd)
        self.fd = -1
        try:
            for index in range(self.keep - 1, 0, -1):
                older = f"{self.path}.{index}"
                if os.path.exists(older):
                    os.replace(older, f"{self.path}.{index + 1}")
            os.replace(self.path, f"{self.path}.1")
        finally:  # a failed rename (the directory removed) still leaves a file to write to, if one can be made
            self.fd, self.size = self._open(), 0

    def write(self, data: bytes) -> None:
        """Append ``data``; OSError when the disk refuses (the caller drops the data, the next write tries again)."""
        if self.fd < 0:  # the last rotation could not open a new file
            self.fd = self._open()
            self.size = os.fstat(self.fd).st_size
        view = memoryview(data)
        while view:
            room = self.max_bytes - self.size
            if room <= 0:
                self.rotate()
                continue
            part = view[:room]
            if len(view) > room:  # it does not all fit: cut after the last full line that does
                cut = bytes(part).rfind(b"\n") + 1
                if cut:
                    part = view[:cut]
                elif self.size:  # no line ends in the room left: the line starts the next file
                    self.rotate()
                    continue
                # else: a fresh file and a line longer than the bound; it is written in pieces
            written = os.write(self.fd, part)
            self.size += written
            view = view[written:]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)


def pump(source: int, log: RotatingLog) -> None:
    while True:
        try:
            data = os.read(source, CHUNK)
        except InterruptedError:
            continue
        if not data:
            return
        try:
            log.write(data)
        except OSError:  # a full disk, a removed directory: drop the output rather than stop reading
            continue  # (a reader that stops would block the server on a full pipe, or kill it with SIGPIPE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="write stdin to a size-bounded, rotated log file")
    parser.add_argument("--max-bytes", type=int, required=True)
    parser.add_argument("--keep", type=int, default=1)
    parser.add_argument("path")
    args = parser.parse_args(argv)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)  # ends at EOF: the server's last lines still reach the log
    os.umask(0o077)
    log = RotatingLog(args.path, max(args.max_bytes, 1024), max(args.keep, 1))
    try:
        pump(sys.stdin.fileno(), log)
    finally:
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
