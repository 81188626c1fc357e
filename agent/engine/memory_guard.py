"""The agent's side of memory: the admission queue and the pressure watchdog wired to its serving units.

The guard never stops a process itself: it marks a unit for eviction and wakes its worker, which tears the
server down (and cancels a start in progress), so each unit's process is only ever touched by its own worker.
Admissions from the queue are handed over the same way: the memory is reserved at once, the worker is woken
and checks again (the OS's available memory, and each GPU's free memory for a GPU server) just before launch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any

import anyio
import structlog

from agent.engine.unit_state import UnitRuntime
from agent.estimate.preflight import Mode
from agent.memory import gpus
from agent.memory.admission import Admission, Claim
from agent.memory.footprint import Footprint
from agent.memory.pressure import Level, Sample, Thresholds, Watchdog
from agent.util.quantity import format_bytes

log = structlog.get_logger("metal_agent.memory")
EXCEEDS_BUDGET_HINT = (
    "reduce contextSize or parallelSlots, quantize the KV cache (cacheTypeK/V), or raise the Model's memoryBudget "
    "(or memoryFraction); extraArgs that change memory also count"
)


def describe_sources(footprint: Footprint) -> str:
    status = footprint.status()
    parts = [f"host from {status['host']['source']}"]
    if footprint.uses_device:
        parts.append(f"GPU from {status['device_source'] or 'nothing'}")
    return ", ".join(parts)


FRESH_S = 0.1  # how old a reading of available memory admission may use
GPU_READ_WAIT_S = 2.0  # the longest the watchdog or a start waits for the GPUs' free memory


class Measured(StrEnum):
    """What a new measurement means for its unit."""

    FINE = "Fine"
    WARNED = "Warned"  # a new warning (above its reservation or, in warn mode, its budget, beyond the tolerance)
    EXCEEDS_BUDGET = "ExceedsBudget"  # enforce mode: over its own budget beyond the tolerance, to be stopped


def budgeted_bytes(footprint: Footprint) -> int:
    """The measured figure a unit's budget limits: device memory for a GPU server, all of it otherwise."""
    return footprint.device_bytes if footprint.uses_device else footprint.total_bytes


def ledger_bytes(footprint: Footprint) -> int:
    """The measured figure the host ledger holds (a GPU server's device memory has a ledger per GPU)."""
    return footprint.host_bytes if footprint.uses_device else footprint.total_bytes


class MemoryGuard:
    def __init__(
        self,
        admission: Admission,
        watchdog: Watchdog,
        runtimes: dict[str, UnitRuntime],
        budget_of: Callable[[int], int],
        eviction: bool,
        mode: Mode = Mode.ENFORCE,
        tolerance: float = 0.02,
    ) -> None:
        self.admission, self.watchdog, self.runtimes = admission, watchdog, runtimes
        self.budget_of, self.eviction = budget_of, eviction
        self.mode, self.tolerance = mode, tolerance
        self._fresh: tuple[float, int] | None = None  # (when, bytes): the last reading of available memory
        self._reading_gpus = False  # a read of the GPUs' free memory is running (in a worker thread)
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

    async def observe_gpus(self) -> None:
        """Read what each GPU has free now (NVML, else nvidia-smi: a subprocess, so off the event loop) for
        admission; where no GPU answers, or not within ``GPU_READ_WAIT_S``, the last reading stands.

        A wedged driver can hang nvidia-smi for seconds: the caller (the pressure watchdog, a start) stops waiting
        and goes on, and no second read starts while that one runs."""
        if self._reading_gpus:
            return
        self._reading_gpus = True

        def read() -> dict[int, int] | None:
            try:
                return gpus.free_memory()
            finally:
                self._reading_gpus = False  # from the thread, even when nobody waits for it any more

        free = None
        with anyio.move_on_after(GPU_READ_WAIT_S):
            free = await anyio.to_thread.run_sync(read, abandon_on_cancel=True)
        if free is not None:
            self.admission.observe_gpus(free)

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
        if self.admission.gpu_ledgers:
            await self.observe_gpus()  # a card's other tenants may have freed what a waiter needs, or taken more
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
    def measured(self, runtime: UnitRuntime, loaded: bool) -> Measured:
        """Put the unit's measured memory in the ledger and judge it against its reservation and its budget.

        The ledger holds the measurement when it is authoritative for every kind of memory the server uses,
        else the larger of the estimate and the measurement. A footprint that pushes the ledger over the host
        budget evicts by the usual order; in enforce mode a server over its own budget (beyond the tolerance)
        is to be stopped (``EXCEEDS_BUDGET``: the worker stops it). One above its reservation is warned about
        (``ExceedsReservation``) only beyond the same tolerance, a share of the reservation: an estimate a few
        hundred KiB short is no news.
        """
        footprint = runtime.footprint
        claim = self.admission.holders.get(runtime.key)
        if footprint is None or claim is None:
            return Measured.FINE
        measured = ledger_bytes(footprint)
        if measured <= 0 and not footprint.uses_device:
            return Measured.FINE
        verdict = runtime.verdict
        budget = verdict.budget.bytes if verdict is not None and verdict.budget is not None else None
        used = budgeted_bytes(footprint)
        over_budget = ""
        if budget is not None and used > budget * (1 + self.tolerance):
            over_budget = (
                f"measured footprint {format_bytes(used)} ({describe_sources(footprint)}) exceeds its budget "
                f"{format_bytes(budget)} by {format_bytes(used - budget)} (tolerance {self.tolerance:.0%}); "
                + EXCEEDS_BUDGET_HINT
            )
            log.warning("footprint exceeds budget", unit=runtime.key, measured=used, budget=budget, mode=self.mode)
            if self.mode is Mode.ENFORCE:  # stopped next, which frees what it holds: nobody is evicted for it
                runtime.exceeded = over_budget
                return Measured.EXCEEDS_BUDGET
        trusted = footprint.authoritative
        if loaded:
            self.admission.settle(runtime.key, measured, trusted, footprint)
            self.memory_freed()  # the estimate may have been generous
        else:
            self.admission.observe(runtime.key, measured, trusted, footprint)
        self.evict_if_over()
        if over_budget:  # warn mode
            if runtime.warning is None or runtime.warning["reason"] != "ExceedsBudget":
                runtime.warning = {"reason": "ExceedsBudget", "message": over_budget}
                return Measured.WARNED
            return Measured.FINE
        reservations = [("", measured, claim.need)]
        if footprint.uses_device and claim.device_need > 0:
            reservations.append(("GPU ", footprint.device_bytes, claim.device_need))
        for kind, figure, reserved in reservations:
            if figure > reserved * (1 + self.tolerance) and runtime.warning is None:
                message = (
                    f"measured {kind}footprint {format_bytes(figure)} exceeds its {kind}reservation "
                    f"{format_bytes(reserved)} by {format_bytes(figure - reserved)} (tolerance {self.tolerance:.0%}); "
                    "the ledger now holds the measured footprint"
                )
                runtime.warning = {"reason": "ExceedsReservation", "message": message}
                log.warning("footprint exceeds reservation", unit=runtime.key, measured=figure, reserved=reserved)
                return Measured.WARNED
        return Measured.FINE

    def evict_if_over(self) -> None:
        """Holdings over a budget (footprints above their reservations): evict by the usual order until they fit."""
        for ledger, what in self.admission.ledgers():
            staying = ledger.used - sum(ledger.held.get(k, 0) for k in self.admission.evicting)
            if staying > ledger.capacity:
                victims = self.admission.evict_for(staying - ledger.capacity, ledger)
                self.evict(
                    victims,
                    f"measured footprints took the {what} ledger to {format_bytes(staying)}, over its budget "
                    f"{format_bytes(ledger.capacity)}",
                    "OverBudget",
                )

    def status(self) -> dict[str, Any]:
        reading = self.watchdog.reading.status(self.thresholds, self.watchdog.interval)
        return {"pressure": {**reading, "eviction": self.eviction}, "admission": self.admission.status()}
