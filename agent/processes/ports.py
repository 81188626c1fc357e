"""Free TCP ports on the loopback interface, for the servers the agent starts and for tests that start their own."""

from __future__ import annotations

import socket


def free_port(candidates: range | None = None, taken: frozenset[int] = frozenset()) -> int:
    """A port nothing listens on: kernel-assigned, or the first free one of ``candidates`` not in ``taken``."""
    for port in candidates if candidates is not None else [0]:
        if port in taken:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            chosen: int = sock.getsockname()[1]
            return chosen
    raise OSError(f"no free port in {candidates.start}-{candidates.stop - 1}" if candidates else "no free port")
