"""``metal-agent status``: the table and the errors when no agent answers."""

from __future__ import annotations

import pytest

from agent.calibrate import free_port
from agent.cli import main
from agent.cmd_status import render

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


def test_table_shows_units_memory_and_problems() -> None:
    text = render(STATUS)
    assert "budget 16.0 GiB (adaptive), reserved 4.0 GiB (25%)" in text
    header, row_a, row_b = text.splitlines()[2:5]
    assert header.split() == ["UNIT", "PHASE", "REASON", "BUDGET", "ESTIMATE", "ACTUAL", "PID", "ENDPOINT", "RESTARTS"]
    assert "8.0 GiB (model-budget)" in row_a and "http://127.0.0.1:8080" in row_a and "3.0 GiB" in row_a
    assert row_b.split()[:3] == ["default/b", "Pending", "InsufficientMemory"]
    assert "default/b: needs 20.0 GiB" in text and "invalid manifest /m/bad.yaml" in text


def test_no_agent_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--api", f"http://127.0.0.1:{free_port()}"]) == 2
    assert capsys.readouterr().err.startswith("error: cannot reach the agent")
