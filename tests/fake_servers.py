"""Tiny real inference-server stand-ins for pipeline tests: real processes on real ports, no model needed.

One script serves every case: ``/health`` answers 200 (``healthy``), 503 forever (``loading``), or 200 for a
number of seconds and 503 after (``"0.5"``); ``ballast_mib`` makes the process hold that much more memory.
``crash`` prints ``boom`` and exits with status 3 at once. ``marked_servers`` lists what an agent's mark is on.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from agent import marker, supervisor
from agent.hookspecs import Executor, Launch, hookimpl
from agent.units import ServingUnit

SERVER = """
import http.server, sys, time
if sys.argv[2] == "crash":
    print("boom"); raise SystemExit(3)
port, mode, ballast = int(sys.argv[1]), sys.argv[2], b"x" * (int(sys.argv[3]) << 20)
start = time.monotonic()
def code():
    if mode in ("healthy", "loading"):
        return 200 if mode == "healthy" else 503
    return 200 if time.monotonic() - start < float(mode) else 503
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(code()); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def server_argv(port: int, mode: str = "healthy", ballast_mib: int | str = 0) -> list[str]:
    return [sys.executable, "-c", SERVER, str(port), mode, str(ballast_mib)]


class FakeServer:
    """Serves the units whose ``runtime`` is ``runtime`` (default: the name); ``extraArgs: [N]`` adds N MiB."""

    def __init__(self, name: str, mode: str = "healthy", runtime: str | None = None) -> None:
        self.name, self.mode, self.runtime = name, mode, runtime or name

    def accepts(self, unit: ServingUnit) -> str | None:
        return None if unit.service.runtime == self.runtime else "not mine"

    def command(self, unit: ServingUnit, model_path: Path, port: int) -> Launch:
        ballast = unit.service.extra_args[0] if unit.service.extra_args else "0"
        return Launch(argv=server_argv(port, self.mode, ballast))


class Executors:
    """A plugin registering the given executors (``load_plugins(extra=[Executors(...)])``)."""

    def __init__(self, *executors: Executor) -> None:
        self.executors = executors

    @hookimpl
    def register_executors(self, register: Callable[[Executor], None]) -> None:
        for executor in self.executors:
            register(executor)


def exec_done(child: supervisor.Child, timeout: float = 10) -> supervisor.Child:
    """``child`` once the OS shows its command line and environment: for a moment after ``exec`` both read empty,
    and a leftover a test hands to a new agent must look like one that has been running."""
    deadline = time.monotonic() + timeout
    while not psutil.Process(child.pid).cmdline():
        assert time.monotonic() < deadline, f"pid {child.pid} shows no command line"
        time.sleep(0.005)  # between checks of the condition
    return child


def marked_servers(state_dir: Path) -> list[int]:
    """The live processes carrying the mark of the agent on ``state_dir`` (what would be orphaned or doubled)."""
    state = marker.state_id(state_dir)
    return sorted(pid for pid in psutil.pids() if _marked(pid, state))


def _marked(pid: int, state: str) -> bool:
    try:
        process = psutil.Process(pid)  # not process_iter's cache, which can hold a recycled pid's old process
        return marker.read(process, state) is not None and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
