"""The state file's records: each field checked, a bad record skipped with a warning that names it (and quotes
little of it), and ownership proven by pid, create time and the mark (which survives exec) or the command line."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest
from structlog.testing import capture_logs

from agent.hookspecs import Launch
from agent.processes import marker, supervisor
from agent.processes.statefile import ChildRecord, load, parse, save

GOOD: dict[str, Any] = {
    "unit": "ns/a", "spec_hash": "h", "pid": 4242, "create_time": 1.5, "argv": ["llama-server", "-m", "x"],
    "port": 8080, "log_path": "/tmp/a.log", "health_path": "/health",
}  # fmt: skip


def parsed(*records: Any) -> tuple[list[ChildRecord], list[dict[str, Any]]]:
    with capture_logs() as logs:
        result = parse(json.dumps({"version": 1, "children": list(records)}), "children.json")
    return result, logs


def test_a_saved_record_reads_back_and_unknown_fields_are_ignored(tmp_path: Path) -> None:
    record = ChildRecord(**GOOD, marker="abc")
    save(tmp_path / "children.json", [record])
    assert parse((tmp_path / "children.json").read_text(), "x") == [record]
    assert parsed({**GOOD, "from_a_newer_agent": [1]})[0] == [ChildRecord(**GOOD)]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("pid", "abc"), ("pid", -1), ("pid", 0), ("pid", 1.5), ("pid", True), ("pid", 2**63), ("pid", None),
        ("create_time", "now"), ("create_time", -1), ("create_time", None), ("port", 0), ("port", 70000),
        ("port", "80"), ("argv", []), ("argv", "llama-server"), ("argv", [1]), ("unit", "no-namespace"),
        ("unit", "a/b/c"), ("unit", ""), ("unit", {"ns": "a"}), ("spec_hash", 5), ("log_path", ""),
        ("health_path", "health"), ("marker", 7),
    ],
)  # fmt: skip
def test_a_bad_field_skips_its_record_with_a_warning_naming_it(field: str, value: Any) -> None:
    records, logs = parsed({**GOOD, field: value}, {**GOOD, "unit": "ns/b"})
    assert [r.unit for r in records] == ["ns/b"]  # the good one is kept
    (warning,) = [e for e in logs if e["log_level"] == "warning"]
    assert warning["event"] == "state record skipped" and warning["record"] == 0 and field in warning["reason"]


def test_a_warning_quotes_at_most_a_few_hundred_characters_of_the_file() -> None:
    records, logs = parsed({**GOOD, "unit": "ns/" + "x" * 100_000 + "/y"}, {**GOOD, "pid": [[[[[[["deep"]]]]]]]})
    assert records == [] and len(logs) == 2 and all(len(str(e)) < 1000 for e in logs)


def test_a_file_of_many_bad_records_warns_a_few_lines_not_one_per_record() -> None:
    records, logs = parsed(*[{**GOOD, "pid": -1}] * 100_000, GOOD)
    assert records == [ChildRecord(**GOOD)] and len(logs) == 11
    assert logs[-1]["event"] == "more state records skipped" and logs[-1]["count"] == 99_990


@pytest.mark.parametrize(
    "text",
    ['{"version": 1, "children": [', "[" * 100_000 + "]" * 100_000, "", "null", '"x"', "{}", '{"children": []}'],
)
def test_a_file_of_another_shape_means_no_records_and_one_warning(text: str) -> None:
    with capture_logs() as logs:
        assert parse(text, "children.json") == []
    assert [e["log_level"] for e in logs] == ["warning"] and logs[0]["path"] == "children.json"


def test_an_unreadable_state_file_is_a_warning(tmp_path: Path) -> None:
    (tmp_path / "children.json").mkdir()
    with capture_logs() as logs:
        assert load(tmp_path / "children.json") == [] and load(tmp_path / "missing.json") == []
    assert [e["event"] for e in logs] == ["state file unreadable: servers are found by their mark"]


@pytest.fixture
def execed(tmp_path: Path) -> Iterator[supervisor.Child]:
    """A server started with a mark whose first program execs another: its command line changes, its pid not."""
    then = "import time; time.sleep(60)"
    code = f"import os, sys, time; time.sleep(0.2); os.execv(sys.executable, [sys.executable, '-c', {then!r}, 'real'])"
    mark = marker.child_env(marker.state_id(tmp_path), "ns/a", "h", 1, "/health")
    child = supervisor.start(Launch(argv=[sys.executable, "-c", code]), 1, tmp_path / "a.log", mark=mark)
    try:
        yield child
    finally:
        anyio.run(supervisor.stop, child, 1.0)


def test_a_marked_process_stays_ours_across_exec(tmp_path: Path, execed: supervisor.Child) -> None:
    process = psutil.Process(execed.pid)
    deadline = time.monotonic() + 10
    while process.cmdline()[-1:] != ["real"]:
        assert time.monotonic() < deadline, process.cmdline()
        time.sleep(0.02)  # between checks of the condition
    assert process.cmdline()[-1:] == ["real"]  # exec'd: the recorded command line no longer matches
    fields = {**GOOD, "pid": execed.pid, "create_time": execed.create_time, "argv": execed.argv}
    state = marker.state_id(tmp_path)
    assert ChildRecord(**fields, marker=state).is_ours()
    assert ChildRecord(**fields).mismatch() == f"another command line: {process.cmdline()!r}"
    assert not ChildRecord(**fields, marker=marker.state_id(tmp_path / "other")).is_ours()
    assert not ChildRecord(**{**fields, "unit": "ns/b"}, marker=state).is_ours()  # marked for another unit
    assert not ChildRecord(**{**fields, "create_time": 1.0}, marker=state).is_ours()  # a recycled pid
