"""The agent's side of memory: the admission queue and the pressure watchdog wired to its serving units.

The guard never stops a process itself: it marks a unit for eviction and wakes its worker, which tears the
server down (and cancels a start in progress), so each unit's process is only ever touched by its own worker.
Admissions from the queue are handed over the same way: the memory is reserved at once, the worker is woken
and checks again (the OS's available memory) just before launch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import psutil
import structlog

from agent import supervisor
from agent.admission import Admission, Claim
from agent.llama_memlog import parse_memory_log
from agent.pressure import Level, Sample, Thresholds, Watchdog
from agent.quantity import format_bytes
from agent.unit_state import UnitRuntime

log = structlog.get_logger("metal_agent.memory")
FRESH_S = 0.1  # how old a reading of available memory admission may use


def measure(child: supervisor.Child) -> dict[str, int]:
    """What a server uses: llama.cpp's reported buffers (from its log) and the process RSS."""
    report = parse_memory_log(supervisor.tail_lines(child.log_path, 400))
    try:
        actual = {"rss": psutil.Process(child.pid).memory_info().rss} if child.running() else {}
    except psutil.Error:  # it exited between the check and the read
        actual = {}
    for name in ("model_bytes", "kv_bytes", "output_bytes", "compute_bytes", "total_bytes"):
        value = getattr(report, name)
        if value is not None:
            actual[name.removesuffix("_bytes")] = value
    return actual


def footprint(actual: dict[str, int]) -> int:
    """A running server's measured memory: llama.cpp's reported buffers or the process RSS, whichever is larger."""
    return max(actual.get("total", 0), actual.get("rss", 0))


class MemoryGuard:
    def __init__(
        self,
        admission: Admission,
        watchdog: Watchdog,
        runtimes: dict[str, UnitRuntime],
        budget_of: Callable[[int], int],
        eviction: bool,
    ) -> None:
        self.admission, self.watchdog, self.runtimes = admission, watchdog, runtimes
        self.budget_of, self.eviction = budget_of, eviction
        self._fresh: tuple[float, int] | None = None  # (when, bytes): the last reading of available memory
        self.on_evict: Callable[[str], None] = lambda cause: None  # told each eviction's cause (the metrics)

    @property
    def thresholds(self) -> Thresholds:
        return self.watchdog.thresholds

    def available(self) -> int:
        """What the OS has available now: read again unless read within ``FRESH_S`` (a burst of arrivals reads it
        once); the last sample if it cannot be read."""
        now = time.monotonic()
        if self._fresh is not None and now - self._fresh[0] < FRESH_S:
            return self._fresh[1]
        try:
            available = self.watchdog.provider().available_bytes
        except Exception:  # the provider raises what the OS raises; fall back to the last good sample
            last = self.watchdog.reading.sample
            return last.available_bytes if last else 0
        self._fresh = (now, available)
        return available

    # -- waking workers -------------------------------------------------------------------------------------
    def wake_granted(self) -> None:
        for key in self.admission.take_new_grants():
            runtime = self.runtimes.get(key)
            if runtime is None:
                self.admission.forget(key)
                continue
            runtime.retry_at = time.monotonic()
            runtime.poke()

    def wake_waiting(self) -> None:
        """Waiters ask again (their reason may have changed: pressure, budget)."""
        for key in list(self.admission.waiting):
            runtime = self.runtimes.get(key)
            if runtime is not None:
                runtime.retry_at = time.monotonic()
                runtime.poke()

    def release(self, key: str) -> None:
        """The unit holds no memory any more (stopped, failed, deleted): waiting units may get it."""
        if self.admission.forget(key) or self.admission.waiting:
            self.memory_freed()

    def memory_freed(self) -> None:
        self.admission.grant(self.available())
        self.wake_granted()

    # -- the watchdog's callback ----------------------------------------------------------------------------
    async def on_sample(self, sample: Sample, before: Level, level: Level) -> None:
        self._fresh = (time.monotonic(), sample.available_bytes)
        capacity = self.budget_of(sample.total_bytes)
        if capacity != self.admission.ledger.capacity:
            log.warning("host budget changed", before=self.admission.ledger.capacity, after=capacity)
            victims = self.admission.set_capacity(capacity)
            self.evict(
                victims, f"the host budget shrank to {format_bytes(capacity)} ({sample.describe()})", "BudgetShrank"
            )
            self.wake_waiting()
        if level is not before:
            if level >= Level.WARNING:
                self.admission.block(f"memory pressure is {level}: {sample.describe()}")
            else:
                self.admission.unblock()
            self.wake_waiting()
        if level is Level.CRITICAL and self.eviction and not self.admission.evicting:
            need = self.to_free(sample)
            if need > 0:
                victims = self.admission.evict_for(need)
                self.evict(victims, f"evicted under critical memory pressure: {sample.describe()}", "MemoryPressure")
        self.admission.grant(sample.available_bytes)
        self.wake_granted()

    def to_free(self, sample: Sample) -> int:
        """Bytes to give back to be above the critical threshold again (one unit's worth if only the kernel says so)."""
        target = math.floor(self.thresholds.critical * sample.total_bytes) + 1
        need = target - sample.available_bytes
        return need if need > 0 else (1 if sample.kernel_level == 4 else 0)

    def evict(self, victims: list[Claim], why: str, cause: str) -> None:
        for claim in victims:
            self.on_evict(cause)
            runtime = self.runtimes.get(claim.key)
            held = self.admission.ledger.held.get(claim.key, 0)
            log.warning("evicting unit", unit=claim.key, footprint=held, reason=why)  # the worker logs the stop
            if runtime is None:
                self.admission.forget(claim.key)
                continue
            runtime.evict_message = f"{why}; footprint {format_bytes(held)}; it restarts when memory allows"
            if runtime.launch_scope is not None:
                runtime.launch_scope.cancel()  # a server still starting is stopped now, not after its timeout
            runtime.poke()

    # -- measured footprint ---------------------------------------------------------------------------------
    def measured(self, runtime: UnitRuntime, loaded: bool) -> bool:
        """Put the unit's measured memory in the ledger; True when it newly exceeds its reservation (the unit's
        ``warning`` and the log say so)."""
        measured = footprint(runtime.actual)
        claim = self.admission.holders.get(runtime.key)
        if measured <= 0 or claim is None:
            return False
        if loaded:
            self.admission.settle(runtime.key, measured)
            self.memory_freed()  # the estimate may have been generous
        else:
            self.admission.observe(runtime.key, measured)
        if measured > claim.need and runtime.warning is None:
            over = measured - claim.need
            message = (
                f"measured footprint {format_bytes(measured)} exceeds its reservation {format_bytes(claim.need)} "
                f"by {format_bytes(over)}; the ledger now holds the measured footprint"
            )
            runtime.warning = {"reason": "ExceedsReservation", "message": message}
            log.warning("footprint exceeds reservation", unit=runtime.key, measured=measured, reserved=claim.need)
            return True
        return False

    def status(self) -> dict[str, Any]:
        reading = self.watchdog.reading.status(self.thresholds, self.watchdog.interval)
        return {"pressure": {**reading, "eviction": self.eviction}, "admission": self.admission.status()}
