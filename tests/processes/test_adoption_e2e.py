"""`metal-agent run` end to end with a stand-in llama-server: servers found by their mark after the agent is killed
(a torn state file, a wrapper that execs the server), and a delete or an edit that wins over a server still loading.
The stand-in records each launch and answers 503 while it "loads", so no test needs llama.cpp.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from agent_process import AgentProcess, manifest
from fake_servers import marked_servers

from agent.estimate.tinymodel import TinyShape, write_tiny_gguf

FAKE_LLAMA_SERVER = """#!{python}
# llama-server stand-in: records "PID CTX" per launch, answers 503 for {load} s (loading), then 200.
import http.server, os, sys, time
args = sys.argv[1:]
with open({launches!r}, "a") as launches:
    launches.write(f"{{os.getpid()}} {{args[args.index('--ctx-size') + 1]}}\\n")
start = time.monotonic()
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if time.monotonic() - start >= {load} else 503)
        self.end_headers()
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(args[args.index("--port") + 1])), Health).serve_forever()
"""

EXEC_WRAPPER = """#!{python}
# A wrapper as users write them: it prepares, then execs the real server (same pid, another command line).
import os, pathlib, sys, time
go = pathlib.Path({go!r})
while not go.exists():
    time.sleep(0.05)
os.execv({python!r}, [{python!r}, {server!r}, *sys.argv[1:]])
"""


def executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


class Setup:
    def __init__(self, tmp_path: Path, load: float = 0) -> None:
        self.tmp = tmp_path
        self.manifests, self.models, self.state = tmp_path / "manifests", tmp_path / "models", tmp_path / "state"
        self.manifests.mkdir()
        self.launches = tmp_path / "launches"
        self.server = executable(
            tmp_path / "llama-server",
            FAKE_LLAMA_SERVER.format(python=sys.executable, launches=str(self.launches), load=load),
        )
        self.agents = 0

    def unit(self, name: str, ctx: int = 2048) -> None:
        model = self.models / f"{name}.gguf"
        if not model.exists():
            write_tiny_gguf(model, TinyShape(n_layer=2, n_embd=64))
        temp = self.manifests / f".{name}.tmp"
        temp.write_text(manifest(name, model, ctx=ctx))
        temp.rename(self.manifests / f"{name}.yaml")  # the watcher never reads half a file

    def agent(self, server: Path | None = None) -> AgentProcess:
        log = self.tmp / "agent.log"
        if log.exists():  # keep each agent's log for a failure's report
            self.agents += 1
            log.rename(self.tmp / f"agent-{self.agents}.log")
        return AgentProcess(self.manifests, self.state, "--llama-server", str(server or self.server))

    def launched(self) -> list[str]:
        return self.launches.read_text().splitlines() if self.launches.exists() else []


@pytest.fixture
def layout(tmp_path: Path) -> Iterator[Callable[[float], Setup]]:
    """The test's layout, given how long its servers load; a server it launched still running at the end is
    killed (the test has failed already: each checks that none is left)."""
    made: list[Setup] = []

    def make(load: float = 0) -> Setup:
        made.append(Setup(tmp_path, load))
        return made[-1]

    yield make
    for setup in made:
        launched = [int(line.split()[0]) for line in setup.launched()]
        for pid in {*marked_servers(setup.state), *launched}:
            with contextlib.suppress(OSError, psutil.Error):
                if str(setup.tmp) in " ".join(psutil.Process(pid).cmdline()):  # still one of the test's servers
                    os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def wait_for(condition: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)  # between checks of the condition


def kill(agent: AgentProcess) -> None:
    """SIGKILL the agent: its servers run on in their own sessions."""
    agent.proc.kill()
    agent.proc.wait()
    agent.close()


def phases(agent: AgentProcess) -> dict[str, tuple[str, str, int | None]]:
    return {u["unit"].split("/")[1]: (u["phase"], u["reason"], u["pid"]) for u in agent.status()["units"]}


def test_a_torn_state_file_with_three_live_servers_adopts_them_by_their_mark(layout: Callable[[float], Setup]) -> None:
    setup = layout(0)
    for name in "abc":
        setup.unit(name)
    first = setup.agent()
    first.wait(lambda: {p for p, _, _ in phases(first).values()} == {"Ready"} and len(phases(first)) == 3)
    pids = {name: pid for name, (_, _, pid) in phases(first).items()}
    kill(first)
    children = setup.state / "children.json"
    children.write_bytes(children.read_bytes()[:-10])  # torn
    second = setup.agent()
    try:
        second.wait(lambda: phases(second) == {n: ("Ready", "Adopted", pid) for n, pid in pids.items()})
        assert sorted(setup.launched()) == sorted(f"{pid} 2048" for pid in pids.values())  # none started twice
        assert marked_servers(setup.state) == sorted(pids.values())
    finally:
        second.close()  # SIGTERM: the adopted servers stop with it
    assert second.proc.returncode == 0
    assert not any(alive(pid) for pid in pids.values()) and marked_servers(setup.state) == []
    assert "state file unreadable" in (setup.tmp / "agent.log").read_text()


def test_a_wrapper_that_execs_the_server_is_adopted_not_duplicated(layout: Callable[[float], Setup]) -> None:
    setup = layout(0)
    go = setup.tmp / "go"
    wrapper = executable(
        setup.tmp / "llama-wrapper",
        EXEC_WRAPPER.format(python=sys.executable, go=str(go), server=str(setup.server)),
    )
    setup.unit("a")
    first = setup.agent(wrapper)
    first.wait(lambda: phases(first).get("a", ("",))[0] == "Starting")
    go.touch()  # the wrapper execs the server: the command line the state file recorded is no more
    first.wait(lambda: phases(first).get("a", ("",))[0] == "Ready")
    pid = phases(first)["a"][2]
    kill(first)
    second = setup.agent(wrapper)
    try:
        second.wait(lambda: phases(second) == {"a": ("Ready", "Adopted", pid)})
        assert setup.launched() == [f"{pid} 2048"] and marked_servers(setup.state) == [pid]
    finally:
        second.close()
    assert not alive(pid) and marked_servers(setup.state) == []


LOAD_S = 5.0  # how long the stand-in "loads": a delete must win well before
GRACE_S = 3.0  # AgentProcess's --grace-period


def test_a_unit_deleted_while_loading_is_stopped_at_once_and_never_ready(layout: Callable[[float], Setup]) -> None:
    setup = layout(LOAD_S)
    setup.unit("a")
    agent = setup.agent()
    try:
        agent.wait(lambda: phases(agent).get("a", ("",))[0] == "Starting")
        pid = phases(agent)["a"][2]
        assert pid is not None and agent.status()["host"]["reserved_bytes"] > 0
        wait_for(lambda: len(setup.launched()) == 1)  # it runs and loads
        (setup.manifests / "a.yaml").unlink()
        deleted_at = time.monotonic()
        released = stopped = None
        while time.monotonic() < deadline_after(deleted_at) or released is None or stopped is None:
            status = agent.status()
            assert all(u["phase"] != "Ready" for u in status["units"]), status["units"]
            now = time.monotonic() - deleted_at
            if released is None and status["host"]["reserved_bytes"] == 0 and not status["units"]:
                released = now
            if stopped is None and not alive(pid):
                stopped = now
            assert now < LOAD_S + 10, f"released after {released} s, stopped after {stopped} s"
            time.sleep(0.05)  # between polls of the status
        assert stopped is not None and stopped < GRACE_S
        assert released is not None and released < GRACE_S
        assert setup.launched() == [f"{pid} 2048"] and marked_servers(setup.state) == []
    finally:
        agent.close()


def deadline_after(deleted_at: float) -> float:
    """Watch past the moment the server would have loaded: it must not show Ready then either."""
    return deleted_at + LOAD_S + 1


def test_a_unit_edited_while_loading_replaces_its_server_at_once_and_starts_the_new_spec_once(
    layout: Callable[[float], Setup],
) -> None:
    setup = layout(LOAD_S)
    setup.unit("a", ctx=2048)
    agent = setup.agent()
    try:
        agent.wait(lambda: phases(agent).get("a", ("",))[0] == "Starting")
        old = phases(agent)["a"][2]
        assert old is not None
        wait_for(lambda: len(setup.launched()) == 1)  # it runs and loads
        setup.unit("a", ctx=4096)
        edited_at = time.monotonic()
        stopped = None
        while (now := phases(agent)["a"])[:2] != ("Ready", "Ready") or now[2] == old:
            assert now[2] != old or now[0] != "Ready", "the old spec's server became Ready"
            if stopped is None and not alive(old):
                stopped = time.monotonic() - edited_at
            assert time.monotonic() - edited_at < 2 * LOAD_S + 10, agent.status()["units"]
            time.sleep(0.05)  # between polls of the status
        new = phases(agent)["a"][2]
        assert stopped is not None and stopped < GRACE_S
        assert new != old and setup.launched() == [f"{old} 2048", f"{new} 4096"]
        assert marked_servers(setup.state) == [new]
    finally:
        agent.close()
    assert marked_servers(setup.state) == []
