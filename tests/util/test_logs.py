"""Logging: both renderers, the standard library through the same handler, the level, unit context, no locals."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog

from agent import cli
from agent.estimate.tinymodel import TinyShape, write_tiny_gguf
from agent.hookspecs import Executor, Launch, hookimpl
from agent.sources.manifest import ModelSpec, ServiceSpec
from agent.sources.standalone import Event, EventType
from agent.sources.units import ServingUnit
from agent.testing import build_agent
from agent.util import logs

SECRET = "kubeconfig-token-7f3a9c"  # must never reach a log line
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line]


def fail_with_a_secret_local() -> None:
    token = SECRET  # a local variable, as a kubeconfig loader's frame would hold one
    raise RuntimeError(f"cannot reach the API server ({len(token)}-character token)")


def test_json_lines_when_stderr_is_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("info")
    structlog.get_logger("metal_agent.test").info("unit status", unit="d/s", phase="Ready", bytes=12)
    out, err = capsys.readouterr()
    [line] = json_lines(err)
    assert out == ""  # stdout stays for command output
    assert line["event"] == "unit status" and line["level"] == "info" and line["logger"] == "metal_agent.test"
    assert (line["unit"], line["phase"], line["bytes"]) == ("d/s", "Ready", 12)
    assert line["timestamp"].endswith("Z")


def test_coloured_console_when_stderr_is_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    logs.configure("info")  # auto: a terminal gets the console renderer
    structlog.get_logger("metal_agent.test").warning("memory is short", unit="d/s")
    logging.getLogger("aiohttp.client").warning("connection reset by %s", "peer")
    raw = terminal.getvalue()
    assert ANSI.search(raw)
    first, second = ANSI.sub("", raw).splitlines()
    assert "[warning" in first and "memory is short" in first and "unit=d/s" in first
    assert "[warning" in second and "connection reset by peer" in second and "aiohttp.client" in second
    with pytest.raises(json.JSONDecodeError):
        json.loads(first)


def test_no_color_and_forced_formats(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setenv("NO_COLOR", "1")
    logs.configure("info", "console")
    structlog.get_logger().info("plain")
    assert "plain" in terminal.getvalue() and not ANSI.search(terminal.getvalue())
    logs.configure("info", "json")  # JSON even on a terminal when asked for
    structlog.get_logger().info("structured")
    assert json_lines(terminal.getvalue().split("\n", 1)[1])[0]["event"] == "structured"


def test_standard_library_records_share_the_renderer_and_the_level(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("warning", "json")
    log = structlog.get_logger("metal_agent.test")
    for name in ("aiohttp.access", "kubernetes_asyncio.client.rest", "asyncio"):
        logging.getLogger(name).info("filtered %s", name)
        logging.getLogger(name).warning("kept %s", name)
    log.info("filtered")
    log.warning("kept")
    lines = json_lines(capsys.readouterr().err)
    assert [(line["logger"], line["event"], line["level"]) for line in lines] == [
        ("aiohttp.access", "kept aiohttp.access", "warning"),
        ("kubernetes_asyncio.client.rest", "kept kubernetes_asyncio.client.rest", "warning"),
        ("asyncio", "kept asyncio", "warning"),
        ("metal_agent.test", "kept", "warning"),
    ]
    logs.configure("debug", "json")
    logging.getLogger("kubernetes_asyncio").debug("now shown")
    log.debug("also shown")
    assert [line["event"] for line in json_lines(capsys.readouterr().err)] == ["now shown", "also shown"]


def test_configure_twice_keeps_one_handler(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("info", "json")
    logs.configure("info", "json")
    logging.getLogger("x").warning("once")
    assert len(json_lines(capsys.readouterr().err)) == 1


@pytest.mark.parametrize("fmt", ["json", "console"])
@pytest.mark.parametrize("through", ["structlog", "stdlib"])
def test_tracebacks_never_show_local_variables(
    fmt: str, through: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stderr", Terminal())  # a terminal: where rich or better-exceptions would show locals
    logs.configure("info", fmt)
    try:
        fail_with_a_secret_local()
    except RuntimeError:
        if through == "structlog":
            structlog.get_logger("metal_agent.test").exception("reconcile failed")
        else:
            logging.getLogger("kubernetes_asyncio.config").exception("reconcile failed")
    text = sys.stderr.getvalue()
    assert "fail_with_a_secret_local" in text and "cannot reach the API server" in text  # the traceback is there
    assert SECRET not in text


def test_bad_levels_and_formats_name_the_flag_or_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["--log-level", "verbose", "plugins"]) == 2
    assert capsys.readouterr().err == (
        'error: --log-level: "verbose" is not a log level; use one of debug, info, warning, error, critical\n'
    )
    monkeypatch.setenv(logs.LEVEL_ENV, "loud")
    assert cli.main(["plugins"]) == 2
    assert capsys.readouterr().err.startswith(f'error: {logs.LEVEL_ENV}: "loud" is not a log level')
    monkeypatch.delenv(logs.LEVEL_ENV)
    assert cli.main(["plugins", "--log-format", "xml"]) == 2
    assert capsys.readouterr().err.startswith('error: --log-format: "xml" is not a log format; use one of auto')


def test_level_from_flag_before_or_after_the_command_beats_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(logs.LEVEL_ENV, "ERROR")
    assert cli.main(["plugins"]) == 0
    assert logging.getLogger().level == logging.ERROR
    assert cli.main(["--log-level", "debug", "plugins"]) == 0
    assert logging.getLogger().level == logging.DEBUG
    assert cli.main(["plugins", "--log-level", "Warning"]) == 0
    assert logging.getLogger().level == logging.WARNING
    assert "llamacpp" in capsys.readouterr().out  # the command's own output is still on stdout


class Chatty:
    """An executor whose command() logs, through structlog and the standard library, from the unit's worker."""

    name = "chatty"

    def accepts(self, unit: ServingUnit) -> str | None:
        return None

    def command(self, unit: ServingUnit, model_path: Path, port: int) -> Launch:
        structlog.get_logger("chatty").info("building command")
        logging.getLogger("chatty.stdlib").warning("stdlib inside the worker")
        return Launch(argv=[sys.executable, "-c", "raise SystemExit(1)"])


class ChattyPlugin:
    @hookimpl
    def register_executors(self, register: Callable[[Executor], None]) -> None:
        register(Chatty())


@pytest.mark.anyio
async def test_lines_of_a_units_worker_carry_its_unit_executor_and_pid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    logs.configure("info", "json")
    agent = build_agent(
        tmp_path / "state", ChattyPlugin(), backoff_base=60, startup_timeout=10, grace_period=1, model_roots=(tmp_path,)
    )
    model = ModelSpec(name="m", namespace="d", source=str(write_tiny_gguf(tmp_path / "m.gguf", TinyShape())))
    events = [
        Event(EventType.ADDED, model),
        Event(EventType.ADDED, ServiceSpec(name="s", namespace="d", model_ref="m")),
    ]

    async def stream() -> Any:
        for event in events:
            yield event
        await anyio.sleep_forever()

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(agent.run, stream())
            while (runtime := agent.runtimes.get("d/s")) is None or runtime.phase != "Restarting":
                await anyio.sleep(0.01)  # between checks of the condition
            tasks.cancel_scope.cancel()
    structlog.get_logger("metal_agent.test").info("outside any worker")
    lines = json_lines(capsys.readouterr().err)
    by_event = {line["event"]: line for line in lines}
    building, stdlib = by_event["building command"], by_event["stdlib inside the worker"]
    assert building["unit"] == stdlib["unit"] == "d/s" and stdlib["logger"] == "chatty.stdlib"
    assert "pid" not in building  # no process yet
    starting = next(line for line in lines if line.get("phase") == "Starting")
    assert starting["unit"] == "d/s" and starting["executor"] == "chatty" and starting["pid"] > 0
    assert f"chatty pid {starting['pid']} on port" in starting["message"]  # the pid of the process it started
    restarting = next(line for line in lines if line.get("phase") == "Restarting")
    assert restarting["executor"] == "chatty" and "pid" not in restarting  # the process is gone
    assert "unit" not in by_event["outside any worker"]
