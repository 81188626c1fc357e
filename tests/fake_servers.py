"""Tiny real inference-server stand-ins for pipeline tests: real processes on real ports, no model needed.

One script serves every case: ``/health`` answers 200 (``healthy``), 503 forever (``loading``), 200 for a number of
seconds and 503 after (``"0.5"``), or 200 while ignoring SIGTERM (``stubborn``); ``ballast_mib`` makes the process
hold that much more memory. ``crash`` prints ``boom`` and exits with status 3 at once. With ``health_path`` the
server answers only there (404 elsewhere, as a server without ``/health`` does) and prints each path it is asked
for. ``marked_servers`` lists what an agent's mark is on.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from agent.hookspecs import Executor, Launch, hookimpl
from agent.processes import marker, supervisor
from agent.sources.units import ServingUnit

SERVER = """
import http.server, sys, time
if sys.argv[2] == "crash":
    print("boom"); raise SystemExit(3)
port, mode, ballast = int(sys.argv[1]), sys.argv[2], b"x" * (int(sys.argv[3]) << 20)
if mode == "stubborn":  # healthy, but ignores SIGTERM: only the SIGKILL after the grace period ends it
    import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); mode = "healthy"
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


# A stand-in for a CUDA llama-server: takes llama-server's flags, prints llama.cpp's buffer report (only at
# -lv 4 and above, as the real one does) with sizes from FAKE_LLAMA_* variables, and answers /health. What it
# "uses" on the GPU is whatever the test's fake NVML says: it can lie in both directions.
FAKE_LLAMA_SERVER = """
import http.server, os, sys
args = sys.argv[1:]
def flag(*names, default=None):
    for i, a in enumerate(args):
        if a in names and i + 1 < len(args):
            return args[i + 1]
    return default
port, verbosity = int(flag("--port")), int(flag("-lv", "--verbosity", "--log-verbosity", default="3"))
env = lambda name: float(os.environ.get("FAKE_LLAMA_" + name, "0"))
ballast = b"x" * (int(env("HOST_MIB")) << 20)
if verbosity >= 4:
    print("load_tensors: loading model tensors, this can take a while... (mmap = true)")
    print(f"load_tensors:   CPU_Mapped model buffer size = {env('EMBD_MIB'):10.2f} MiB")
    print(f"load_tensors:        CUDA0 model buffer size = {env('MODEL_MIB'):10.2f} MiB")
    print(f"llama_kv_cache:      CUDA0 KV buffer size = {env('KV_MIB'):10.2f} MiB")
    print(f"sched_reserve:      CUDA0 compute buffer size = {env('COMPUTE_MIB'):10.2f} MiB")
    print(f"sched_reserve:  CUDA_Host compute buffer size = {env('HOST_COMPUTE_MIB'):10.2f} MiB")
sys.stdout.flush()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def write_fake_llama_server(directory: Path) -> Path:
    """An executable ``llama-server`` stand-in in ``directory`` (see ``FAKE_LLAMA_SERVER``)."""
    path = directory / "fake-llama-server"
    path.write_text(f"#!{sys.executable}\n{FAKE_LLAMA_SERVER}")
    path.chmod(0o755)
    return path


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
