"""The agent killed (SIGKILL) while a server it launched is still loading, then restarted: the new agent adopts
that server instead of starting another, or stops it if its unit went away meanwhile. Real llama.cpp (xllamacpp)
behind a wrapper that holds the start until the test releases it.
"""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import psutil
import pytest
from agent_process import AgentProcess, manifest

from agent.estimate.tinymodel import TinyShape, write_tiny_gguf

pytestmark = pytest.mark.llama
REPO = Path(__file__).resolve().parents[2]

WRAPPER = """#!{python}
# llama-server that waits for a file before it loads: the window in which the agent is killed.
import os, pathlib, sys, time
with open({launches!r}, "a") as launches:
    launches.write(f"{{os.getpid()}}\\n")
go = pathlib.Path({go!r})
while not go.exists():
    time.sleep(0.05)
sys.path.insert(0, {repo!r})
from plugins.xllamacpp_server import main
sys.exit(main(sys.argv[1:]))
"""


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def setup(tmp_path: Path) -> tuple[Path, Path, Path, Path, Path]:
    manifests, models, state = tmp_path / "manifests", tmp_path / "models", tmp_path / "state"
    manifests.mkdir()
    write_tiny_gguf(models / "a.gguf", TinyShape(n_layer=2, n_embd=64))
    (manifests / "a.yaml").write_text(manifest("a", models / "a.gguf"))
    go, launches = tmp_path / "go", tmp_path / "launches"
    wrapper = tmp_path / "slow-llama-server"
    wrapper.write_text(WRAPPER.format(python=sys.executable, launches=str(launches), go=str(go), repo=str(REPO)))
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return manifests, state, wrapper, go, launches


def killed_mid_start(manifests: Path, state: Path, wrapper: Path) -> int:
    """Start an agent, kill it while its server is Starting; the server's pid (still running)."""
    first = AgentProcess(manifests, state, "--llama-server", str(wrapper))
    try:
        first.wait(lambda: (first.unit("a") or {}).get("phase") == "Starting")
        pid: int = first.unit("a")["pid"]  # type: ignore[index]
        first.proc.kill()
        first.proc.wait()
    finally:
        first.close()
        (state.parent / "agent.log").rename(state.parent / "first-agent.log")
    assert alive(pid)  # in its own session: the agent's death does not take it down
    return pid


def servers(models: Path) -> list[int]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if str(models) in " ".join(proc.info["cmdline"] or []) and proc.status() != psutil.STATUS_ZOMBIE:
            found.append(proc.pid)
    return found


def test_restarted_agent_adopts_a_server_that_was_still_loading(tmp_path: Path) -> None:
    manifests, state, wrapper, go, launches = setup(tmp_path)
    pid = killed_mid_start(manifests, state, wrapper)
    second = AgentProcess(manifests, state, "--llama-server", str(wrapper))
    try:
        second.wait(lambda: (second.unit("a") or {}).get("reason") == "Adopted")
        assert second.unit("a")["pid"] == pid  # type: ignore[index]
        go.touch()
        second.wait(lambda: (second.unit("a") or {}).get("phase") == "Ready")
        unit = second.unit("a")
        assert unit is not None and unit["pid"] == pid and unit["reason"] == "Adopted"
        assert unit["actual"]["kv"] == unit["estimate"]["kv_cache"]  # measured after the adopted load
        assert servers(tmp_path / "models") == [pid]
        assert launches.read_text().split() == [str(pid)]  # nothing started twice
    finally:
        second.close()
    assert not alive(pid)


def test_restarted_agent_stops_a_loading_server_whose_unit_was_deleted(tmp_path: Path) -> None:
    manifests, state, wrapper, _go, launches = setup(tmp_path)
    pid = killed_mid_start(manifests, state, wrapper)
    (manifests / "a.yaml").unlink()  # deleted while no agent runs
    second = AgentProcess(manifests, state, "--llama-server", str(wrapper))
    try:
        second.wait(lambda: not alive(pid))
        second.wait(lambda: second.status()["units"] == [])
        assert servers(tmp_path / "models") == [] and launches.read_text().split() == [str(pid)]
    finally:
        second.close()
