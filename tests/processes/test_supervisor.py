"""Supervision of real child processes: readiness, startup failures with the log tail, stopping (logs elsewhere)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import anyio
import psutil
import pytest

from agent.hookspecs import Launch
from agent.processes import supervisor
from agent.processes.ports import free_port

pytestmark = pytest.mark.anyio


def python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


SERVER = """
import http.server, sys, time
start = time.monotonic()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if time.monotonic() - start > float(sys.argv[2]) else 503); self.end_headers()
    def log_message(self, *a): pass
print("loading model", flush=True)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


async def test_ready_after_503_while_loading(tmp_path: Path) -> None:
    port = free_port()
    child = supervisor.start(Launch(argv=[*python(SERVER), str(port), "0.3"]), port, tmp_path / "c.log")
    try:
        with anyio.fail_after(20):
            await supervisor.wait_ready(child, "/health", timeout=15, grace=1)
        assert await supervisor.healthy(child)
    finally:
        await supervisor.stop(child, grace=1)
    assert not child.running()


async def test_exit_while_starting_reports_the_log_tail(tmp_path: Path) -> None:
    child = supervisor.start(
        Launch(argv=python("print('error: model file is corrupt'); raise SystemExit(3)")),
        free_port(),
        tmp_path / "c.log",
    )
    with pytest.raises(supervisor.StartupFailed, match=r"exited with status 3(.|\n)*model file is corrupt"):
        await supervisor.wait_ready(child, "/health", timeout=15, grace=1)


async def test_startup_timeout_stops_the_child(tmp_path: Path) -> None:
    port = free_port()
    child = supervisor.start(Launch(argv=[*python(SERVER), str(port), "1000"]), port, tmp_path / "c.log")
    with pytest.raises(supervisor.StartupFailed, match=r"not healthy within 0.5 s(.|\n)*loading model"):
        await supervisor.wait_ready(child, "/health", timeout=0.5, grace=1)
    assert not child.running()


async def test_stop_kills_a_child_that_ignores_sigterm_and_its_group(tmp_path: Path) -> None:
    stubborn = """
    import signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    code = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); signal.pause()"
    grandchild = subprocess.Popen([sys.executable, "-c", code])
    print(grandchild.pid, flush=True)
    signal.pause()
    """
    log = tmp_path / "c.log"
    child = supervisor.start(Launch(argv=python(stubborn)), free_port(), log)
    with anyio.fail_after(10):
        while not log.read_text().strip():
            await anyio.sleep(0.02)
    grandchild = psutil.Process(int(log.read_text().split()[0]))
    with anyio.fail_after(10):
        await supervisor.stop(child, grace=0.3)
    assert not child.running()
    grandchild.wait(timeout=5)  # killed with its group
    assert not grandchild.is_running()
