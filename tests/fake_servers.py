"""Tiny real inference-server stand-ins for pipeline tests: real processes on real ports, no model needed.

One script serves every case: ``/health`` answers 200 (``healthy``), 503 forever (``loading``), or 200 for a
number of seconds and 503 after (``"0.5"``); ``ballast_mib`` makes the process hold that much more memory.
``crash`` prints ``boom`` and exits with status 3 at once. With ``health_path`` the server answers only there
(404 elsewhere, as a server without ``/health`` does) and prints each path it is asked for.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from agent.hookspecs import Executor, Launch, hookimpl
from agent.units import ServingUnit

SERVER = """
import http.server, sys, time
if sys.argv[2] == "crash":
    print("boom"); raise SystemExit(3)
port, mode, ballast = int(sys.argv[1]), sys.argv[2], b"x" * (int(sys.argv[3]) << 20)
only = sys.argv[4] if len(sys.argv) > 4 else None
start = time.monotonic()
def code():
    if mode in ("healthy", "loading"):
        return 200 if mode == "healthy" else 503
    return 200 if time.monotonic() - start < float(mode) else 503
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if only is not None:
            print("GET", self.path, flush=True)
        self.send_response(404 if only not in (None, self.path) else code()); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def server_argv(port: int, mode: str = "healthy", ballast_mib: int | str = 0, only: str | None = None) -> list[str]:
    return [sys.executable, "-c", SERVER, str(port), mode, str(ballast_mib), *([only] if only else [])]


class FakeServer:
    """Serves the units whose ``runtime`` is ``runtime`` (default: the name); ``extraArgs: [N]`` adds N MiB."""

    def __init__(self, name: str, mode: str = "healthy", runtime: str | None = None, health_path: str = "") -> None:
        self.name, self.mode, self.runtime, self.health_path = name, mode, runtime or name, health_path

    def accepts(self, unit: ServingUnit) -> str | None:
        return None if unit.service.runtime == self.runtime else "not mine"

    def command(self, unit: ServingUnit, model_path: Path, port: int) -> Launch:
        ballast = unit.service.extra_args[0] if unit.service.extra_args else "0"
        if self.health_path:
            return Launch(argv=server_argv(port, self.mode, ballast, self.health_path), health_path=self.health_path)
        return Launch(argv=server_argv(port, self.mode, ballast))


class Executors:
    """A plugin registering the given executors (``load_plugins(extra=[Executors(...)])``)."""

    def __init__(self, *executors: Executor) -> None:
        self.executors = executors

    @hookimpl
    def register_executors(self, register: Callable[[Executor], None]) -> None:
        for executor in self.executors:
            register(executor)
