"""The memory-pressure watchdog: samples available memory and says when the host is short of it.

A sample is what the OS reports available (psutil, clamped by the cgroup limit on Linux; see ``hostmem``) and,
on macOS, the kernel's own pressure level (``sysctl kern.memorystatus_vm_pressure_level``: 1 normal, 2 warning,
4 critical), which sees compression and swap that "available" does not. The level is the worse of the two.

Levels have hysteresis so they do not flap: entering warning or critical happens at the threshold, leaving it
only once available memory is ``hysteresis`` above it. The agent blocks admissions from warning on and evicts at
critical (``pipeline``/``memory_guard``); this module only measures and classifies.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import IntEnum

import anyio
import structlog

from agent.estimate.hostmem import Sysctl, _run_sysctl, detect_host_memory
from agent.util.quantity import InvalidValue, format_bytes

log = structlog.get_logger("metal_agent.pressure")
KERNEL_LEVELS = {1: "normal", 2: "warning", 4: "critical"}


class Level(IntEnum):
    NORMAL = 0
    WARNING = 1
    CRITICAL = 2

    def __str__(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Sample:
    total_bytes: int
    available_bytes: int
    kernel_level: int | None = None  # macOS kern.memorystatus_vm_pressure_level; None elsewhere

    @property
    def available_fraction(self) -> float:
        return self.available_bytes / self.total_bytes if self.total_bytes > 0 else 0.0

    def describe(self) -> str:
        text = (
            f"{self.available_fraction:.1%} available ({format_bytes(self.available_bytes)} of "
            f"{format_bytes(self.total_bytes)})"
        )
        if self.kernel_level is not None:
            text += f", kernel pressure {KERNEL_LEVELS.get(self.kernel_level, str(self.kernel_level))}"
        return text


Provider = Callable[[], Sample]


@dataclass(frozen=True)
class Thresholds:
    """Fractions of host memory available at or below which pressure is warning / critical."""

    warning: float = 0.20
    critical: float = 0.10
    hysteresis: float = 0.05

    def __post_init__(self) -> None:
        for name in ("warning", "critical", "hysteresis"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise InvalidValue(f"memory pressure {name} (--pressure-{name}) must be a number, got {value!r}")
        if not 0 < self.critical < self.warning < 1:
            raise InvalidValue(
                "memory pressure thresholds (--pressure-warning, --pressure-critical) must satisfy "
                f"0 < critical < warning < 1, got critical "
                f"{self.critical!r} and warning {self.warning!r}"
            )
        if not 0 <= self.hysteresis < 1 - self.warning:
            raise InvalidValue(
                "memory pressure hysteresis (--pressure-hysteresis) must be >= 0 and leave warning + hysteresis "
                f"below 1, got "
                f"{self.hysteresis!r} with warning {self.warning!r}"
            )


def classify(sample: Sample, previous: Level, thresholds: Thresholds) -> Level:
    """The pressure level of ``sample``, given the level before it (for hysteresis)."""
    fraction = sample.available_fraction
    if fraction <= thresholds.critical:
        by_fraction = Level.CRITICAL
    elif fraction <= thresholds.warning:
        by_fraction = Level.WARNING
    else:
        by_fraction = Level.NORMAL
    # Leaving a level needs a margin above its threshold; until then the previous level holds.
    if (
        previous is Level.CRITICAL
        and by_fraction < Level.CRITICAL
        and fraction <= thresholds.critical + thresholds.hysteresis
    ):
        by_fraction = Level.CRITICAL
    elif (
        previous >= Level.WARNING
        and by_fraction is Level.NORMAL
        and fraction <= thresholds.warning + thresholds.hysteresis
    ):
        by_fraction = Level.WARNING
    by_kernel = {4: Level.CRITICAL, 2: Level.WARNING}.get(sample.kernel_level or 1, Level.NORMAL)
    return max(by_fraction, by_kernel)


def kernel_pressure_level(sysctl: Sysctl | None = None) -> int | None:
    """macOS's memory pressure level (1, 2 or 4); None where it cannot be read."""
    try:
        return int((sysctl or _run_sysctl)(["sysctl", "-n", "kern.memorystatus_vm_pressure_level"]).strip())
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def system_provider(override_total: int | None = None, platform: str = sys.platform) -> Provider:
    """Samples this host: the same total and available memory the ledger's budget comes from."""

    def sample() -> Sample:
        host = detect_host_memory(override_total)
        kernel = kernel_pressure_level() if platform == "darwin" else None
        return Sample(host.total_bytes, host.available_bytes, kernel)

    return sample


@dataclass
class Reading:
    """The watchdog's state, for ``/status``."""

    level: Level = Level.NORMAL
    sample: Sample | None = None
    since: float = 0.0  # wall-clock time the level was entered
    transitions: int = 0
    error: str | None = None  # the last sampling error, if the last sample failed

    def status(self, thresholds: Thresholds, interval: float) -> dict[str, object]:
        sample = self.sample
        return {
            "level": str(self.level),
            "available_bytes": sample.available_bytes if sample else None,
            "total_bytes": sample.total_bytes if sample else None,
            "available_fraction": round(sample.available_fraction, 4) if sample else None,
            "kernel_level": sample.kernel_level if sample else None,
            "since": self.since,
            "transitions": self.transitions,
            "thresholds": {
                "warning": thresholds.warning,
                "critical": thresholds.critical,
                "hysteresis": thresholds.hysteresis,
            },
            "interval_s": interval,
            "error": self.error,
        }


OnSample = Callable[[Sample, Level, Level], Awaitable[None]]  # sample, level before, level now


def check_interval(interval: object) -> float:
    if isinstance(interval, bool) or not isinstance(interval, int | float) or not math.isfinite(interval):
        raise InvalidValue(
            f"memory pressure sample interval (--pressure-interval) must be a number of seconds, got {interval!r}"
        )
    if interval <= 0:
        raise InvalidValue(f"memory pressure sample interval (--pressure-interval) must be positive, got {interval!r}")
    return float(interval)


class Watchdog:
    def __init__(self, provider: Provider, thresholds: Thresholds, interval: float) -> None:
        self.provider, self.thresholds, self.interval = provider, thresholds, check_interval(interval)
        self.reading = Reading(since=time.time())

    def step(self) -> tuple[Sample, Level, Level] | None:
        """Take one sample and classify it; None (level unchanged) when the OS could not be read."""
        try:
            sample = self.provider()
        except Exception as exc:  # HostMemoryUnknown, OSError, or whatever a provider raises: sample again later
            if self.reading.error is None:
                log.warning("memory pressure sample failed", error=str(exc))
            self.reading.error = str(exc)
            return None
        before = self.reading.level
        level = classify(sample, before, self.thresholds)
        self.reading.sample, self.reading.error = sample, None
        if level is not before:
            self.reading.level, self.reading.since = level, time.time()
            self.reading.transitions += 1
            log.warning("memory pressure changed", level=str(level), previous=str(before), reading=sample.describe())
        return sample, before, level

    async def run(self, on_sample: OnSample) -> None:
        """Sample forever; a failing sample or handler is logged and the watchdog goes on (it guards the host)."""
        while True:
            stepped = self.step()
            if stepped is not None:
                try:
                    await on_sample(*stepped)
                except Exception:
                    log.exception("memory pressure handler failed", reading=stepped[0].describe())
            await anyio.sleep(self.interval)
