"""Serving on demand: which units a request needs running, which idle ones go to make room, and the idle timer.

An on-demand unit (``spec.onDemand: true``) is ``Idle`` — no process, no reservation — until a request names it.
The request *activates* it: its worker then runs it through the ordinary pipeline (budget, pre-flight, admission,
spawn) while the request waits for it to be Ready, bounded by ``request_wait``. Concurrent requests share the one
start: activating an active unit does nothing, and every waiter wakes on the unit's status changes.

When a unit waits for memory, idle on-demand units (active, no request in flight) are deactivated to make room:
lower priority first, then least recently used; ``evictionProtection`` units last; never an always-on unit, never
one serving a request. A deactivated unit's worker stops its server and releases its memory, which lets the
waiting unit in. A unit with no request for its ``idleTimeout`` is deactivated the same way.

Everything here runs on the event loop and never awaits while it decides, like the admission ledger; only the
unit's own worker ever touches its process (see agent/engine/pipeline.py).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from agent.engine.serving_metrics import ServingMetrics
from agent.engine.unit_state import UnitRuntime
from agent.estimate.hostmem import detect_host_memory
from agent.estimate.preflight import Reason, Verdict
from agent.memory.admission import PRIORITY_RANK
from agent.processes import supervisor
from agent.sources.units import ServingUnit
from agent.util.duration import format_duration
from agent.util.quantity import format_bytes

if TYPE_CHECKING:
    from agent.engine.pipeline import Agent

log = structlog.get_logger("metal_agent.ondemand")
IDLE = "Idle"
TICK_S = 0.2  # how often the idle timer looks (cheap: a pass over the on-demand units)
WAIT_PHASES = frozenset({"Pending", "Downloading", "Starting", "Restarting", "CrashLoop", IDLE})
RETRY_AFTER_S = 5
PENDING_POLL_S = 0.05
GONE_WAIT_S = 5.0  # how long a failed connection's server is watched for going away before the 502


def running_context(child: supervisor.Child | None) -> int | None:
    """The ``--ctx-size`` a server's command line gives it, if any."""
    argv = child.argv if child is not None else []
    for flag, value in itertools.pairwise(argv):
        if flag in ("--ctx-size", "-c") and value.isdigit():
            return int(value)
    return None


class Unavailable(Exception):
    """The unit cannot serve this request now (503 with Retry-After); the message says why and what holds memory."""

    def __init__(self, message: str, retry_after: int = RETRY_AFTER_S) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Gone(Exception):
    """The unit was deleted while the request waited (404)."""


@dataclass
class Demand:
    """One unit's requests: how many are in flight, when the last one came or went, and whether it should run."""

    active: bool = False  # a request asked for it: the worker keeps it running until it is deactivated
    in_flight: int = 0
    last_request: float | None = None  # monotonic
    last_request_wall: float | None = None  # epoch seconds, for the status
    changed: anyio.Event = field(default_factory=anyio.Event)  # set (and replaced) at each status change

    def touch(self) -> None:
        self.last_request, self.last_request_wall = time.monotonic(), time.time()

    def signal(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()


class OnDemand:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.demands: dict[str, Demand] = {}
        self.contexts: dict[str, int] = {}  # contextSize: auto, the value chosen at the unit's last start
        self.routes: Any = None  # the /v1 routing table (agent/service/proxy.py's Routes); None: stale
        self.metrics = ServingMetrics(agent.metrics.registry)

    def demand(self, key: str) -> Demand:
        found = self.demands.get(key)
        if found is None:
            found = self.demands[key] = Demand()
        return found

    # -- the pipeline's questions ---------------------------------------------------------------------------
    def wanted(self, unit: ServingUnit) -> bool:
        """Should the unit run now? Always-on units always; on-demand ones while a request activated them, or when
        a previous agent left a server for it (adopted, it then idles out as if it had just served a request)."""
        if not unit.service.on_demand:
            return True
        demand = self.demand(unit.key)
        if not demand.active and unit.key in self.agent.handover.adoptable:
            demand.active = True
            demand.touch()
        return demand.active

    # -- the idle state -------------------------------------------------------------------------------------
    async def idle(self, runtime: UnitRuntime, unit: ServingUnit) -> None:
        """An on-demand unit nobody asks for (its worker's reconcile): stop its server if any; its status says Idle
        with model and budget."""
        agent = self.agent
        await agent.teardown(runtime)
        runtime.spec_hash = None  # the next request starts it afresh
        runtime.retry_at = None
        host = detect_host_memory(agent.config.host_memory)
        try:
            budget = unit.model.budget(host.total_bytes, agent.config.memory_fraction)
        except ValueError as exc:
            await agent.set_status(runtime, "Failed", "InvalidSpec", str(exc))
            return
        message = self.idle_message(unit, f"{format_bytes(budget.bytes)} ({budget.source})")
        runtime.verdict = Verdict(Reason.FITS, allowed=True, message=message, budget=budget)  # the budget shows
        if (runtime.phase, runtime.reason, runtime.message) != (IDLE, IDLE, message):
            await agent.set_status(runtime, IDLE, IDLE, message)

    def idle_message(self, unit: ServingUnit, budget: str) -> str:
        return (
            f"on demand: no server until a request names it (model {unit.model.name}, budget {budget}, idle "
            f"timeout {format_duration(unit.service.idle_timeout)})"
        )

    def on_status(self, runtime: UnitRuntime) -> None:
        """Every status change of every unit (called by the pipeline): waiters wake; a unit that waits for memory
        may get it from idle on-demand units; a deleted unit's state goes."""
        demand = self.demands.get(runtime.key)
        if demand is not None:
            demand.signal()
        if runtime.phase == "Deleted":
            self.demands.pop(runtime.key, None)
            self.contexts.pop(runtime.key, None)
            self.metrics.forget_unit(runtime.key)
        elif runtime.phase == "Pending" and runtime.reason == "InsufficientMemory":
            self.make_room(runtime.key)
        if runtime.phase in (IDLE, "Stopped", "Failed"):
            self.contexts.pop(runtime.key, None)  # chosen afresh at its next start

    # -- making room ----------------------------------------------------------------------------------------
    def make_room(self, key: str) -> list[str]:
        """Deactivate idle on-demand units until ``key``'s claim fits (host memory and each GPU it needs); returns
        the keys chosen."""
        admission = self.agent.admission
        claim = admission.waiting.get(key)
        if claim is None or admission.blocked is not None:
            return []
        ledger = admission.ledger
        shortfall = claim.need - ledger.free_for(key)
        if shortfall <= 0:  # the ledger has room, the OS does not: what idle servers use is what it lacks
            shortfall = claim.need - self.agent.memory.available()
        # Memory already on its way back (on-demand units deactivated, their workers still stopping them) counts.
        stopping = self._stopping()
        shortfall -= sum(ledger.held.get(k, 0) for k in stopping if k != key)
        chosen: list[str] = []

        def enough() -> bool:  # host memory, and each GPU the unit needs (device and budget)
            return shortfall <= 0 and admission.gpus_fit_without(key, [*stopping, *chosen])

        if enough():
            return []
        for candidate in self._idle_candidates(key):
            chosen.append(candidate)
            shortfall -= ledger.held.get(candidate, 0)
            if enough():
                break
        if not enough():
            return []  # stopping every idle unit would not be enough: stop none, the unit waits as any other
        for candidate in chosen:
            held = format_bytes(ledger.held.get(candidate, 0))
            log.info("stopping an idle on-demand unit to make room", unit=candidate, footprint=held, for_unit=key)
            self.agent.metrics.evicted("MakeRoom")
            self._deactivate(candidate)
        return chosen

    def _stopping(self) -> list[str]:
        """On-demand units no request wants that still hold memory: their workers are stopping them."""
        stopping = []
        for key, demand in self.demands.items():
            unit, _ = self.agent.current_unit(key)
            if unit is not None and unit.service.on_demand and not demand.active and key in self.agent.ledger.held:
                stopping.append(key)
        return stopping

    def _idle_candidates(self, key: str) -> list[str]:
        """Idle on-demand units holding memory, in the order they go: unprotected, lower priority, least recent."""
        found = []
        for other, demand in self.demands.items():
            unit, _ = self.agent.current_unit(other)
            held = self.agent.ledger.held.get(other, 0)
            if other == key or unit is None or not unit.service.on_demand or not demand.active:
                continue
            if demand.in_flight or held <= 0 or other in self.agent.admission.evicting:
                continue
            rank = PRIORITY_RANK.get(unit.service.priority, PRIORITY_RANK["normal"])
            found.append((unit.service.eviction_protection, -rank, demand.last_request or 0.0, other))
        return [entry[-1] for entry in sorted(found)]

    def _deactivate(self, key: str) -> None:
        demand = self.demand(key)
        demand.active = False
        runtime = self.agent.runtimes.get(key)
        if runtime is not None:
            runtime.notify()

    # -- the idle timer -------------------------------------------------------------------------------------
    async def run(self) -> None:
        while True:
            await anyio.sleep(TICK_S)
            self.expire(time.monotonic())

    def expire(self, now: float) -> list[str]:
        """Deactivate on-demand units with no request in flight for their idle timeout; returns their keys."""
        expired = []
        for key, demand in list(self.demands.items()):
            if not demand.active or demand.in_flight or demand.last_request is None:
                continue
            unit, _ = self.agent.current_unit(key)
            if unit is None or not unit.service.on_demand:
                continue
            if now - demand.last_request >= unit.service.idle_timeout:
                log.info("idle timeout: stopping the unit", unit=key, idle=format_duration(now - demand.last_request))
                self.metrics.idle_stopped()
                self._deactivate(key)
                expired.append(key)
        return expired

    # -- requests -------------------------------------------------------------------------------------------
    @asynccontextmanager
    async def serving(self, key: str, avoid_pid: int | None = None) -> AsyncIterator[supervisor.Child]:
        """Hold a request on ``key`` while the body runs: yields its Ready server (starting it on demand; not the
        one with ``avoid_pid``, found gone); raises Unavailable (or Gone) when none is ready within ``request_wait``."""
        demand = self.demand(key)
        demand.in_flight += 1
        demand.touch()
        started = time.monotonic()
        ready = False
        try:
            child = await self._until_ready(key, demand, started + self.agent.config.request_wait, avoid_pid)
            ready = True
            self.metrics.waited(time.monotonic() - started)
            yield child
        finally:
            demand.in_flight -= 1
            demand.touch()  # the idle timer counts from the end of the last request
            runtime = self.agent.runtimes.get(key)
            gave_up = not ready and (runtime is None or runtime.phase not in ("Starting", "Ready", "Downloading"))
            if gave_up and demand.in_flight == 0 and demand.active:
                self._deactivate(key)  # nobody waits for it any more: it leaves the queue and goes back to Idle
            if demand.in_flight == 0:
                for waiting in list(self.agent.admission.waiting):  # it may be what a waiting unit needs gone
                    self.make_room(waiting)

    async def _until_ready(self, key: str, demand: Demand, deadline: float, avoid_pid: int | None) -> supervisor.Child:
        while True:
            changed = demand.changed  # taken before looking, so no change in between is missed
            unit, _ = self.agent.current_unit(key)
            runtime = self.agent.runtimes.get(key)
            if unit is None or runtime is None:
                raise Gone(f"the InferenceService {key} no longer exists")
            if not unit.wanted:
                raise Unavailable(f"{key} is not serving: replicas is 0 or suspend is true")
            if unit.service.on_demand and not demand.active:
                if runtime.child is None:
                    demand.active = True
                    self.metrics.cold_started(key)
                    log.info("cold start on request", unit=key)
                    runtime.notify()
                # else: its server is being stopped (idle, or to make room): once it is gone, it starts anew
            elif self._serves(runtime, avoid_pid):
                assert runtime.child is not None
                return runtime.child
            elif runtime.phase == "Failed" or runtime.phase not in WAIT_PHASES | {"Ready"}:
                raise Unavailable(f"{key} cannot start: {runtime.message}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Unavailable(self._why_waiting(key, runtime))
            # A change the worker has not applied yet (a new spec replaces the server) may end without a status
            # change to wake us: look again soon.
            pending = runtime.event_at is not None or avoid_pid is not None
            with anyio.move_on_after(min(remaining, PENDING_POLL_S) if pending else remaining):
                await changed.wait()

    async def went_away(self, key: str, child: supervisor.Child) -> bool:
        """After a connection to ``child`` failed: is it being replaced or stopped (looked at for a grace period)?"""
        with anyio.move_on_after(min(self.agent.config.grace_period + 1.0, GONE_WAIT_S)):
            while True:
                runtime = self.agent.runtimes.get(key)
                if runtime is None or runtime.child is not child or runtime.phase != "Ready" or not child.running():
                    return True
                await anyio.sleep(PENDING_POLL_S)
        return False

    @staticmethod
    def _serves(runtime: UnitRuntime, avoid_pid: int | None) -> bool:
        """Ready, with no change pending that would replace its server, and not the server found gone."""
        child = runtime.child
        return (
            runtime.phase == "Ready"
            and child is not None
            and child.pid != avoid_pid
            and runtime.evict_message is None
            and runtime.event_at is None
        )

    def _why_waiting(self, key: str, runtime: UnitRuntime) -> str:
        """The 503's message: the unit's own state and what holds the host budget."""
        wait = self.agent.config.request_wait
        text = f"{key} is not ready within {wait:g} s ({runtime.phase}"
        text += f": {runtime.message})" if runtime.message else ")"
        return text + "; " + self.holders_text()

    def holders_text(self) -> str:
        ledger = self.agent.ledger
        parts = []
        for holder, held in sorted(ledger.held.items(), key=lambda item: -item[1]):
            demand = self.demands.get(holder)
            busy = demand.in_flight if demand else 0
            parts.append(f"{holder} holds {format_bytes(held)} ({busy} request(s) in flight)")
        budget = f"host budget {format_bytes(ledger.capacity)}, {format_bytes(max(0, ledger.capacity - ledger.used))}"
        return f"{budget} free" + (": " + ", ".join(parts) if parts else "")

    # -- status ---------------------------------------------------------------------------------------------
    def unit_status(self, runtime: UnitRuntime) -> dict[str, Any]:
        """The on-demand and context fields of one unit's status (merged into Agent.status's unit entry)."""
        unit, _ = self.agent.current_unit(runtime.key)
        context = (
            running_context(runtime.child)  # what the server was started with (an adopted one included)
            or self.contexts.get(runtime.key)
            or (unit.settings.ctx_size if unit else None)
        )
        fields: dict[str, Any] = {"context_size": context, "on_demand": None}
        if unit is None or not unit.service.on_demand:
            return fields
        demand = self.demand(runtime.key)
        idle_in = None
        if demand.active and not demand.in_flight and demand.last_request is not None:
            idle_in = max(0.0, unit.service.idle_timeout - (time.monotonic() - demand.last_request))
        state = (
            runtime.phase if runtime.phase in (IDLE, "Starting", "Ready") else ("Starting" if demand.active else IDLE)
        )
        fields["on_demand"] = {
            "state": state,
            "active": demand.active,
            "in_flight": demand.in_flight,
            "last_request": demand.last_request_wall,
            "idle_timeout_s": unit.service.idle_timeout,
            "stops_in_s": None if idle_in is None else round(idle_in, 1),
        }
        return fields
