"""The memory-pressure watchdog: thresholds validated, levels with hysteresis, the macOS kernel level."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from agent.cli import main
from agent.engine.pipeline import AgentConfig
from agent.estimate.hostmem import HostMemoryUnknown
from agent.memory.pressure import Level, Sample, Thresholds, Watchdog, classify, kernel_pressure_level
from agent.util.quantity import InvalidValue

GiB = 1 << 30


def at(percent: float, kernel: int | None = None) -> Sample:
    return Sample(100 * GiB, int(percent * GiB), kernel)


@pytest.mark.parametrize(
    ("warning", "critical", "hysteresis", "problem"),
    [
        (0.1, 0.2, 0.05, "critical < warning"),
        (0.2, 0.0, 0.05, "0 < critical"),
        (1.0, 0.1, 0.0, "warning < 1"),
        (0.2, 0.1, -0.01, "hysteresis must be >= 0"),
        (0.9, 0.1, 0.2, "warning + hysteresis below 1"),
        (float("nan"), 0.1, 0.05, "must be a number"),
    ],
)
def test_invalid_thresholds_name_the_setting(warning: float, critical: float, hysteresis: float, problem: str) -> None:
    with pytest.raises(InvalidValue, match="memory pressure") as error:
        Thresholds(warning, critical, hysteresis)
    assert problem.split()[0] in str(error.value)


def test_agent_config_validates_pressure_settings() -> None:
    with pytest.raises(InvalidValue, match="critical"):
        AgentConfig(state_dir=None, pressure_warning=0.1, pressure_critical=0.3)  # type: ignore[arg-type]
    with pytest.raises(InvalidValue, match="interval"):
        AgentConfig(state_dir=None, pressure_interval=0)  # type: ignore[arg-type]


def test_levels_enter_at_the_threshold_and_leave_only_past_the_hysteresis() -> None:
    t = Thresholds(warning=0.20, critical=0.10, hysteresis=0.05)
    assert classify(at(50), Level.NORMAL, t) is Level.NORMAL
    assert classify(at(20), Level.NORMAL, t) is Level.WARNING  # at the threshold
    assert classify(at(10), Level.WARNING, t) is Level.CRITICAL
    assert classify(at(12), Level.CRITICAL, t) is Level.CRITICAL  # not yet 15 %
    assert classify(at(16), Level.CRITICAL, t) is Level.WARNING
    assert classify(at(24), Level.WARNING, t) is Level.WARNING  # not yet 25 %
    assert classify(at(26), Level.WARNING, t) is Level.NORMAL
    assert classify(at(26), Level.CRITICAL, t) is Level.NORMAL  # a big jump leaves both at once


def test_readings_around_a_threshold_do_not_flap() -> None:
    t = Thresholds()
    level, changes = Level.NORMAL, 0
    for percent in [19.5, 20.5, 19.8, 21, 22, 19.9, 24.9, 20.1] * 5:
        new = classify(at(percent), level, t)
        changes += new is not level
        level = new
    assert changes == 1 and level is Level.WARNING


def test_the_macos_kernel_level_raises_the_level() -> None:
    t = Thresholds()
    assert classify(at(60, kernel=1), Level.NORMAL, t) is Level.NORMAL
    assert classify(at(60, kernel=2), Level.NORMAL, t) is Level.WARNING
    assert classify(at(60, kernel=4), Level.NORMAL, t) is Level.CRITICAL
    assert classify(at(5, kernel=1), Level.NORMAL, t) is Level.CRITICAL  # the fraction still counts
    assert kernel_pressure_level(lambda argv: "4\n") == 4
    assert kernel_pressure_level(lambda argv: "garbage") is None
    assert "kernel pressure critical" in at(60, kernel=4).describe()


def test_watchdog_steps_through_its_provider_and_survives_a_failing_read() -> None:
    readings: list[Sample | Exception] = [at(50), at(15), HostMemoryUnknown("psutil broke"), at(8), at(30)]

    def provider() -> Sample:
        item = readings.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    watchdog = Watchdog(provider, Thresholds(), interval=0.5)
    levels = []
    for _ in range(5):
        stepped = watchdog.step()
        levels.append(stepped[2] if stepped else None)
    assert levels == [Level.NORMAL, Level.WARNING, None, Level.CRITICAL, Level.NORMAL]
    assert watchdog.reading.transitions == 3 and watchdog.reading.error is None
    status = watchdog.reading.status(watchdog.thresholds, watchdog.interval)
    assert status["level"] == "normal" and status["available_fraction"] == 0.3


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--pressure-warning", "0.1", "--pressure-critical", "0.2"], "--pressure-critical"),
        (["--pressure-warning", "lots"], '--pressure-warning: "lots" is not a number'),
        (["--pressure-critical", "1.5"], "--pressure-critical"),
        (["--pressure-hysteresis", "-0.1"], "--pressure-hysteresis"),
        (["--pressure-interval", "0"], "--pressure-interval"),
    ],
)
def test_run_refuses_bad_pressure_flags_naming_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    argv = ["run", "--manifests", str(tmp_path), "--state-dir", str(tmp_path / "state"), *flags]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error


@pytest.mark.anyio
async def test_the_watchdog_outlives_a_failing_provider_and_a_failing_handler() -> None:
    readings: list[Sample | Exception] = [RuntimeError("odd psutil"), at(50), at(50), at(50)]
    handled: list[Sample] = []

    def provider() -> Sample:
        item = readings.pop(0) if len(readings) > 1 else readings[0]
        if isinstance(item, Exception):
            raise item
        return item

    async def handler(sample: Sample, before: Level, level: Level) -> None:
        handled.append(sample)
        if len(handled) == 1:
            raise ValueError("a bug in the handler")

    watchdog = Watchdog(provider, Thresholds(), interval=0.01)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(watchdog.run, handler)
            while len(handled) < 3:
                await anyio.sleep(0.01)
            tasks.cancel_scope.cancel()
    assert watchdog.reading.error is None and watchdog.reading.sample == at(50)
