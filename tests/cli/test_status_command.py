"""``metal-agent status``: the table, and a real agent started from a config file found through it."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_process import AgentProcess, manifest

from agent.cli import main
from agent.cli.cmd_status import COLUMNS, render
from agent.estimate.tinymodel import TinyShape, write_tiny_gguf
from agent.processes.ports import free_port

METAL_AGENT = Path(sys.executable).parent / "metal-agent"
STATUS = {
    "host": {"total_bytes": 32 << 30, "available_bytes": 20 << 30, "budget_bytes": 16 << 30,
             "reserved_bytes": 4 << 30, "budget_source": "adaptive"},
    "units": [
        {"unit": "default/a", "phase": "Ready", "reason": "Ready", "message": "serving", "restarts": 0,
         "budget": {"bytes": 8 << 30, "source": "model-budget"}, "estimate": {"total": 4 << 30},
         "actual": {"rss": 3 << 30}, "pid": 42, "port": 8080, "endpoint": "http://127.0.0.1:8080"},
        {"unit": "default/b", "phase": "Pending", "reason": "InsufficientMemory", "message": "needs 20.0 GiB",
         "restarts": 0, "budget": None, "estimate": None, "actual": None, "pid": None, "port": None, "endpoint": None},
    ],
    "manifest_errors": {"/m/bad.yaml": "spec.hardware.memoryFraction: 1.5 is out of range"},
}  # fmt: skip


def table(text: str) -> list[dict[str, str]]:
    """The unit table as rows of column -> cell (cells are separated by two or more spaces)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("MODEL"))
    header = re.split(r"\s{2,}", lines[start])
    assert tuple(header) == COLUMNS
    rows = []
    for line in lines[start + 1 :]:
        cells = re.split(r"\s{2,}", line)
        if len(cells) != len(header):
            break
        rows.append(dict(zip(header, cells, strict=True)))
    return rows


def test_table_shows_units_memory_and_problems() -> None:
    text = render(STATUS)
    assert "budget 16.0 GiB (adaptive), reserved 4.0 GiB (25%)" in text
    a, b = table(text)
    assert a == {"MODEL": "default/a", "PHASE": "Ready", "REASON": "Ready", "BUDGET (SOURCE)": "8.0 GiB (model-budget)",
                 "ESTIMATE": "4.0 GiB", "ACTUAL": "3.0 GiB", "PID": "42", "PORT": "8080",
                 "ENDPOINT": "http://127.0.0.1:8080", "RESTARTS": "0"}  # fmt: skip
    assert [b[c] for c in ("MODEL", "PHASE", "REASON", "BUDGET (SOURCE)", "PID", "PORT", "ENDPOINT")] == [
        "default/b", "Pending", "InsufficientMemory", "-", "-", "-", "-"]  # fmt: skip
    assert "default/b: needs 20.0 GiB" in text and "invalid manifest /m/bad.yaml" in text


def test_no_agent_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--api", f"http://127.0.0.1:{free_port()}"]) == 2
    assert capsys.readouterr().err.startswith("error: cannot reach the agent")


def test_the_address_comes_from_the_configuration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    monkeypatch.setenv("METAL_AGENT_API_PORT", str(port))
    assert main(["status"]) == 2
    assert capsys.readouterr().err.startswith(f"error: cannot reach the agent at http://127.0.0.1:{port}:")
    file = tmp_path / "config.toml"
    file.write_text('[api]\nhost = "0.0.0.0"\nport = 1234\n')
    monkeypatch.delenv("METAL_AGENT_API_PORT")
    assert main(["status", "--config", str(file)]) == 2  # a wildcard listener is reached on loopback
    assert "at http://127.0.0.1:1234:" in capsys.readouterr().err
    file.write_text("[api]\nprot = 1234\n")
    assert main(["status", "--config", str(file)]) == 2
    assert capsys.readouterr().err == f"error: {file}: unknown key api.prot (did you mean api.port?)\n"


class ConfiguredAgent(AgentProcess):
    """`metal-agent run --config FILE` through the console script: every setting from the file."""

    def __init__(self, config: Path, port: int) -> None:
        self.port = port
        self.log = (config.parent / "agent.log").open("wb")
        self.proc = subprocess.Popen(
            [str(METAL_AGENT), "run", "--config", str(config)], stdout=self.log, stderr=subprocess.STDOUT
        )


@pytest.fixture
def configured_agent(tmp_path: Path) -> Iterator[tuple[ConfiguredAgent, Path]]:
    (tmp_path / "manifests").mkdir()
    write_tiny_gguf(tmp_path / "a.gguf", TinyShape(n_layer=2, n_embd=64))
    (tmp_path / "manifests" / "a.yaml").write_text(manifest("a", tmp_path / "a.gguf"))
    (tmp_path / "manifests" / "b.yaml").write_text(manifest("b", tmp_path / "a.gguf", budget="1Mi"))
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(
        f'[agent]\nmanifests = "manifests"\nstate_dir = "state"\npoll_interval = 0.2\n[api]\nport = {port}\n'
        '[memory]\nhost_memory = "16Gi"\nfraction = 0.005\n[servers]\nstartup_timeout = 30\ngrace_period = 3\n'
        '[models]\nroots = ["."]\nstore = "store"\n'
    )
    process = ConfiguredAgent(config, port)
    yield process, config
    process.close()


@pytest.mark.llama
def test_status_of_a_running_agent_as_table_and_json(
    configured_agent: tuple[ConfiguredAgent, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    process, config = configured_agent
    process.wait(lambda: (process.unit("a") or {}).get("phase") == "Ready")
    process.wait(lambda: (process.unit("b") or {}).get("phase") == "Failed")
    assert (config.parent / "state" / "agent.lock").is_file()  # state_dir relative to the config file
    assert main(["status", "--config", str(config), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    a = next(u for u in status["units"] if u["unit"] == "default/a")
    assert status["host"]["total_bytes"] == 16 << 30 and status["host"]["budget_source"] == "agent"
    assert main(["status", "--config", str(config)]) == 0
    text = capsys.readouterr().out
    rows = {row["MODEL"]: row for row in table(text)}
    assert rows["default/a"]["PHASE"] == "Ready" and rows["default/a"]["PID"] == str(a["pid"])
    assert rows["default/a"]["PORT"] == str(a["port"]) and rows["default/a"]["ENDPOINT"] == a["endpoint"]
    assert rows["default/a"]["BUDGET (SOURCE)"] == "512.0 MiB (model-budget)"
    assert rows["default/a"]["ACTUAL"] != "-" and rows["default/a"]["ESTIMATE"] != "-"
    assert [rows["default/b"][c] for c in ("PHASE", "REASON", "PID", "ENDPOINT")] == [
        "Failed", "InsufficientMemory", "-", "-"]  # fmt: skip
    assert "default/b: " in text
    assert main(["status", "--config", str(config), "--endpoint", "default/a"]) == 0
    assert capsys.readouterr().out.strip() == a["endpoint"]
    assert main(["status", "--config", str(config), "--endpoint", "default/b"]) == 1


def test_run_fails_with_status_1_when_the_api_port_is_taken(tmp_path: Path) -> None:
    (tmp_path / "manifests").mkdir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            [str(METAL_AGENT), "run", "--manifests", str(tmp_path / "manifests"), "--state-dir",
             str(tmp_path / "state"), "--api-port", str(port)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1].startswith(f"error: cannot serve the local API on 127.0.0.1:{port}: ")


def test_on_demand_units_show_their_state_last_request_and_idle_timer() -> None:
    from agent.cli.cmd_status import on_demand_line

    base = {"unit": "default/lazy", "context_size": 8192}
    idle = {**base, "on_demand": {"state": "Idle", "in_flight": 0, "last_request": None, "idle_timeout_s": 600.0,
                                  "stops_in_s": None}}  # fmt: skip
    assert on_demand_line(idle, 1000.0) == (
        "default/lazy: on demand, Idle (context 8192); last request never; idle timeout 10m"
    )
    ready = {**base, "on_demand": {**idle["on_demand"], "state": "Ready", "last_request": 988.0, "stops_in_s": 588}}  # type: ignore[dict-item]
    assert on_demand_line(ready, 1000.0).endswith("Ready (context 8192); last request 12s ago; stops in 9m48s unused")
    busy = {**base, "on_demand": {**ready["on_demand"], "in_flight": 2, "stops_in_s": None}}  # type: ignore[dict-item]
    assert on_demand_line(busy, 1000.0).endswith("; serving 2 request(s)")
    row = {**ready, "phase": "Ready", "reason": "Ready", "message": "", "restarts": 0, "budget": None,
           "estimate": None, "actual": None, "pid": 7, "port": 1, "endpoint": None}  # fmt: skip
    status = {**STATUS, "units": [*STATUS["units"], row]}  # type: ignore[list-item]
    assert "default/lazy: on demand, Ready" in render(status)


def test_table_shows_gpu_ledgers_and_the_measured_gpu_footprint() -> None:
    gpu_unit = {**STATUS["units"][0], "measured": {"total_bytes": 9 << 30}}  # type: ignore[index]
    status = {**STATUS, "units": [gpu_unit], "admission": {"gpus": {"0": {"budget_bytes": 100 << 30,
                                                                            "reserved_bytes": 9 << 30}}}}  # fmt: skip
    text = render(status)
    assert "GPU 0: budget 100.0 GiB, reserved 9.0 GiB\n" in text  # an older agent's status: no device figure
    status["admission"]["gpus"]["0"]["device_free_bytes"] = 30 << 30  # type: ignore[index]
    assert "GPU 0: budget 100.0 GiB, reserved 9.0 GiB; 30.0 GiB free on the device" in render(status)
    assert table(text)[0]["ACTUAL"] == "9.0 GiB"  # host plus GPU memory, not the RSS alone
