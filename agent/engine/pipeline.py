"""The agent's pipeline: Model and InferenceService events in, supervised inference servers out.

Events update a store of objects; each event pokes the serving units it affects. Every unit has one worker
task, so its events are handled in order, and a poke only marks the unit dirty: however many events arrive
while the worker is busy, it then reconciles once against the latest spec. Different units run concurrently.
Per unit: executor spec check → source → resolve_budget → preflight → ledger admission → download → executor
command → start → report.

This module is that per-unit reconcile. The parts with a design of their own live beside it: the model files
(download_stage.py), the children on record and a previous agent's servers (handover.py), on-demand units and
their idle state (ondemand.py), memory pressure and measured footprints (memory_guard.py), the status document
(agent_status.py).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterable, Callable
from pathlib import Path
from typing import Any

import anyio
import structlog

from agent.config.agent_config import AgentConfig as AgentConfig  # re-exported: callers build it beside Agent
from agent.engine.agent_status import agent_status
from agent.engine.download_stage import DownloadStage
from agent.engine.handover import Handover
from agent.engine.memory_guard import Measured, MemoryGuard
from agent.engine.metrics import Metrics
from agent.engine.model_fetch import FetchSettings, ModelFetcher, cancellable
from agent.engine.ondemand import OnDemand
from agent.engine.plugin_manager import Plugins
from agent.engine.unit_state import UnitRuntime
from agent.estimate.budget import resolve_budget
from agent.estimate.hostmem import detect_host_memory
from agent.estimate.preflight import Verdict
from agent.hookspecs import Executor, spec_problem
from agent.memory import context_auto, gpus
from agent.memory.admission import EVICTED, Admission, Outcome
from agent.memory.footprint import keep_report, measure_with
from agent.memory.pressure import Provider, Watchdog, system_provider
from agent.models.model_store import ModelFiles
from agent.processes import marker, supervisor
from agent.processes.ports import free_port
from agent.sources.manifest import ModelSpec, ServiceSpec
from agent.sources.standalone import Event, EventType, Synced
from agent.sources.units import ServingUnit
from agent.util import logs
from agent.util.redact import redact_text

log = structlog.get_logger("metal_agent.pipeline")
CHILD_PHASES = ("Starting", "Ready")  # phases in which a unit has a process on record


class Agent:
    def __init__(self, config: AgentConfig, plugins: Plugins, memory: Provider | None = None) -> None:
        self.config, self.plugins = config, plugins
        self.executors: list[Executor] = plugins.executors()
        self.models: dict[tuple[str, str], ModelSpec] = {}
        self.services: dict[tuple[str, str], ServiceSpec] = {}
        self.runtimes: dict[str, UnitRuntime] = {}
        # ``memory`` samples the host (tests simulate pressure or a foreign process with it).
        memory = memory or system_provider(config.host_memory)
        self.admission = Admission(self._host_budget(memory().total_bytes))
        self.ledger = self.admission.ledger
        watchdog = Watchdog(memory, config.thresholds(), config.pressure_interval)
        self.memory = MemoryGuard(
            self.admission, watchdog, self.runtimes, self._host_budget, config.eviction, config.mode,
            config.budget_tolerance,
        )  # fmt: skip
        if any(getattr(executor, "uses_device", False) for executor in self.executors):
            capacities, free = gpus.budgets(self._host_budget)  # a GPU's total by the host's fraction
            self.admission.set_gpus(capacities)
            if free is not None:  # a first reading: units arriving together may all be weighed on it
                self.admission.observe_gpus(free)
        self.synced = False
        self.source_errors: dict[str, str] = {}  # invalid manifests: file -> message
        self.source_status: Callable[[], dict[str, Any]] | None = None  # the source's own state (the watch)
        self.report_status: Callable[[], dict[str, Any]] | None = None  # the Kubernetes reporter's counters
        self._tasks: anyio.abc.TaskGroup | None = None
        self.metrics = Metrics(self.status)  # this agent's own registry, served on /metrics
        self.handover = Handover(self)  # children on record: ours saved, a previous agent's adopted or stopped
        self.memory.on_evict = self.metrics.evicted
        store = config.model_store or config.state_dir / "models"
        self.fetcher = ModelFetcher(
            FetchSettings(store, config.model_roots, config.min_free_disk, file_mode=config.model_file_mode)
        )
        self.downloads = DownloadStage(self)  # a remote model sized before admission, downloaded after
        self.ondemand = OnDemand(self)  # on-demand units, the /v1 endpoint's waits (agent/service/proxy.py)

    # -- events ---------------------------------------------------------------------------------------------
    async def run(self, events: AsyncIterable[Event | Synced]) -> None:
        async with anyio.create_task_group() as tasks:
            self._tasks = tasks
            self.handover.start(tasks)
            tasks.start_soon(self.memory.watchdog.run, self.memory.on_sample, name="memory pressure watchdog")
            tasks.start_soon(self.ondemand.run, name="on-demand idle timer")
            async for event in events:
                if isinstance(event, Synced):
                    self.handover.reap_unclaimed()
                    self.synced = True
                else:
                    self.apply(event)

    def _host_budget(self, total_bytes: int) -> int:
        return resolve_budget(total_bytes, None, None, self.config.memory_fraction).bytes

    def apply(self, event: Event) -> None:
        obj = event.obj
        store: dict[Any, Any] = self.models if isinstance(obj, ModelSpec) else self.services
        key = (obj.namespace, obj.name)
        if event.type is EventType.DELETED:
            store.pop(key, None)
        else:
            store[key] = obj
        self.ondemand.routes = None  # the /v1 model and Service names are looked up afresh
        if isinstance(obj, ServiceSpec):
            affected = {f"{obj.namespace}/{obj.name}"}
        else:
            affected = {f"{s.namespace}/{s.name}" for s in self.services.values() if (s.namespace, s.model_ref) == key}
        for unit_key in affected:
            self._runtime(unit_key).notify()

    def _runtime(self, key: str) -> UnitRuntime:
        runtime = self.runtimes.get(key)
        if runtime is None:
            runtime = self.runtimes[key] = UnitRuntime(key)
            assert self._tasks is not None
            self._tasks.start_soon(self._worker, runtime, name=f"unit {key}")
        return runtime

    def current_unit(self, key: str) -> tuple[ServingUnit | None, str]:
        namespace, name = key.split("/", 1)
        service = self.services.get((namespace, name))
        if service is None:
            return None, ""
        model = self.models.get((namespace, service.model_ref))
        if model is None:
            return None, f"Model {namespace}/{service.model_ref} not found"
        return ServingUnit(service=service, model=model), ""

    # -- one worker per unit --------------------------------------------------------------------------------
    async def _worker(self, runtime: UnitRuntime) -> None:
        logs.bind_unit(runtime.key, runtime.log_context)  # every line this task logs names the unit and its process
        while True:
            with anyio.move_on_after(self._next_wake(runtime)):
                await runtime.wake.wait()
            runtime.wake = anyio.Event()
            event_at, runtime.event_at = runtime.event_at, None
            try:
                done = await self.reconcile(runtime)
            except Exception as exc:  # a bug in one unit must not stop the others
                log.exception("reconcile failed", unit=runtime.key)
                await self.set_status(runtime, "Failed", "InternalError", str(exc))
                done = False
            if event_at is not None:
                self.metrics.reconciled(time.monotonic() - event_at)
            if done and self.current_unit(runtime.key) == (None, ""):  # not re-added while it was stopping
                self.metrics.forget_unit(runtime.key)
                self.runtimes.pop(runtime.key, None)
                return

    def _next_wake(self, runtime: UnitRuntime) -> float:
        if runtime.retry_at is not None:
            return max(0.0, runtime.retry_at - time.monotonic())
        return self.config.probe_interval if runtime.child else float("inf")

    async def reconcile(self, runtime: UnitRuntime) -> bool:
        """Bring one unit to its spec; True when the unit is gone and its worker can end."""
        unit, missing_reason = self.current_unit(runtime.key)
        if runtime.evict_message is not None:
            await self._evict(runtime)  # then on as for any stopped unit: it waits, or is gone, suspended or changed
        if unit is None or not unit.wanted:
            if unit is not None or self.synced:
                self.handover.stop_leftover(runtime.key)  # a previous agent's server for a unit that wants none now
            if runtime.child is not None:  # stopping takes up to the grace period: never Ready meanwhile
                if unit is None and not missing_reason:  # deleted: shown locally, nothing written to a gone object
                    runtime.phase, runtime.reason = "Stopping", "Deleted"
                    runtime.message = "the InferenceService was deleted; its server is stopping"
                else:
                    await self.set_status(
                        runtime, "Stopping", "Stopping", "the server is stopping: the unit is not wanted"
                    )
            await self.teardown(runtime)
            runtime.spec_hash = None  # whatever comes back (the same spec included) starts afresh
            if unit is None and not missing_reason:  # the InferenceService itself is gone: reporters clean up
                await self.set_status(runtime, "Deleted", "Deleted", "the InferenceService was deleted")
                return True
            phase, reason = ("Stopped", "Suspended") if unit else ("Pending", "ModelNotFound")
            await self.set_status(runtime, phase, reason, missing_reason or "replicas is 0 or suspend is true")
            return False
        if not self.ondemand.wanted(unit):  # on demand, no request wants it: no server, no memory
            await self.ondemand.idle(runtime, unit)
            return False
        spec_hash = unit.spec_hash()
        if runtime.spec_hash == spec_hash:
            if runtime.child:
                await self._probe(runtime, unit)
            elif runtime.retry_at is not None and time.monotonic() >= runtime.retry_at:
                await self._start(runtime, unit)  # a restart after a crash, or memory may have freed
            return False
        await self.teardown(runtime)  # a changed spec replaces the old server: stop it first, memory is shared
        runtime.spec_hash = spec_hash
        runtime.failures = runtime.restarts = 0
        await self._start(runtime, unit)
        return False

    async def _start(self, runtime: UnitRuntime, unit: ServingUnit) -> None:
        runtime.retry_at = None
        checked = await self._check(runtime, unit)
        if checked is None:
            return
        unit, files, need, device_need = checked
        if await self.handover.adopt(runtime, unit, need):  # its memory is in use already: it does not queue
            self.metrics.admitted()
            return
        spec = unit.service
        if device_need:  # what the GPUs have free now: other processes on a card count
            await self.memory.observe_gpus()
        decision = self.admission.request(
            runtime.key, need, spec.priority, spec.eviction_protection, self.memory.available(), device_need,
            max(1, unit.model.gpu_count or 1),
        )  # fmt: skip
        self.memory.wake_granted()  # units ahead of this one may have been admitted too
        if decision.outcome is Outcome.NEVER_FITS:
            self.metrics.rejected(decision.reason)
            await self.set_status(runtime, "Failed", decision.reason, decision.message)
            return
        if decision.outcome is Outcome.WAITING:  # woken when the queue admits it
            if (runtime.phase, runtime.reason) != ("Pending", decision.reason):  # counted once per wait
                waiting = "WaitingForMemory" if decision.reason == "InsufficientMemory" else decision.reason
                self.metrics.rejected(waiting)
            await self.set_status(runtime, "Pending", decision.reason, decision.message)
            return
        self.metrics.admitted()
        runtime.warning = None
        if runtime.evict_message is not None:
            return  # chosen for eviction since: the worker handles that next
        executor, why_not = self.executor_for(unit)
        if executor is None:
            self.memory.release(runtime.key)
            self.metrics.rejected("NoExecutor")
            await self.set_status(runtime, "Failed", "NoExecutor", why_not)
            return
        if files.remote and not await self.downloads.fetch(runtime, unit, files):
            return
        if self._superseded(runtime, unit):  # deleted or changed while it was checked: never spawned
            self.memory.release(runtime.key)
            return
        await self._launch(runtime, unit, executor, files.path)

    async def _check(self, runtime: UnitRuntime, unit: ServingUnit) -> tuple[ServingUnit, ModelFiles, int, int] | None:
        """Spec, model files, budget, context and pre-flight: the unit as it will run (its context chosen), its
        files, and the host and device bytes it needs; None when it cannot start (its status says why)."""
        executor, _ = self.executor_for(unit)
        if executor is not None and (problem := spec_problem(executor, unit)):  # e.g. extraArgs off the allowlist
            self.metrics.rejected("InvalidSpec")
            await self.set_status(runtime, "Failed", "InvalidSpec", f"{executor.name}: {problem}")
            return None
        files = await self.downloads.locate(runtime, unit)  # a remote model is sized from its header here
        if files is None:
            return None
        model_path = files.path
        host = detect_host_memory(self.config.host_memory)
        try:
            budget = await self.plugins.first(
                "resolve_budget", unit=unit, host=host, agent_fraction=self.config.memory_fraction
            )
        except ValueError as exc:
            self.metrics.rejected("InvalidSpec")
            await self.set_status(runtime, "Failed", "InvalidSpec", str(exc))
            return None
        # contextSize: auto: the largest context its budget and the ledger's free memory allow now.
        limit = min(budget.bytes, host.total_bytes, self.ledger.free_for(runtime.key))
        unit, chosen_context = context_auto.sized(unit, model_path, limit)
        if chosen_context is not None:
            self.ondemand.contexts[runtime.key] = chosen_context
        verdict: Verdict = await self.plugins.first(
            "preflight", thread=True, unit=unit, model_path=model_path, budget=budget, host=host,
            mode=str(self.config.mode),
        )  # fmt: skip
        runtime.verdict = verdict
        if not verdict.allowed:  # it does not fit its own budget: only a spec change can help
            self.metrics.rejected(str(verdict.reason))
            await self.set_status(runtime, "Failed", str(verdict.reason), verdict.message)
            return None
        estimate = verdict.estimate
        need = estimate.total_bytes if estimate else budget.bytes
        device_need = 0
        if estimate is not None and estimate.device_bytes is not None:  # a GPU server: host and device ledgers
            need, device_need = estimate.host_bytes or 0, estimate.device_bytes
        return unit, files, need, device_need

    def log_path(self, key: str) -> Path:
        """The file the unit's server writes its output to, in the state directory's ``logs``."""
        return self.config.state_dir / "logs" / f"{key.replace('/', '_')}.log"

    def executor_for(self, unit: ServingUnit) -> tuple[Executor | None, str]:
        """The first executor that accepts the unit; else None and why each one declined."""
        reasons = []
        for executor in self.executors:
            why_not = executor.accepts(unit)
            if why_not is None:
                return executor, ""
            reasons.append(f"{executor.name}: {why_not}")
        return None, "no executor accepts this model (" + "; ".join(reasons) + ")"

    async def _launch(self, runtime: UnitRuntime, unit: ServingUnit, executor: Executor, model_path: Path) -> None:
        spawned_at = time.monotonic()
        try:
            taken = frozenset(r.child.port for r in self.runtimes.values() if r.child)
            port = free_port(self.config.ports, taken)
            launch = executor.command(unit, model_path, port)
            claim = self.admission.holders.get(runtime.key)
            if claim is not None and claim.gpus:  # the GPUs admission reserved its device memory on
                env = {**launch.env, "CUDA_VISIBLE_DEVICES": ",".join(map(str, claim.gpus))}
                launch = dataclasses.replace(launch, env=env)
            mark = marker.child_env(self.handover.state_id, runtime.key, unit.spec_hash(), port, launch.health_path)
            logs_bound = supervisor.LogSettings(self.config.log_max_size, self.config.log_keep)
            child = supervisor.start(launch, port, self.log_path(runtime.key), logs_bound, self.config.server_env, mark)
        except Exception as exc:  # the plugin's message becomes the unit's reason
            self.memory.release(runtime.key)
            await self.set_status(runtime, "Failed", "SpawnFailed", f"{executor.name}: {exc}")
            return
        runtime.child, runtime.executor = child, executor.name
        await self.set_status(runtime, "Starting", "Admitted", f"{executor.name} pid {child.pid} on port {port}")
        if await self.until_ready(runtime, unit, launch.health_path):
            self.metrics.server_started(executor.name, time.monotonic() - spawned_at)
            await self.set_status(runtime, "Ready", "Ready", f"serving on http://127.0.0.1:{port}")

    async def until_ready(self, runtime: UnitRuntime, unit: ServingUnit, health_path: str) -> bool:
        """Wait for the starting child's health; then its measured memory replaces the estimate in the ledger.

        False, with the child left for the worker to stop at once, when the unit is deleted, suspended or changed
        meanwhile: a server still loading never outlives its unit's spec, nor shows Ready for a spec gone.
        """
        child = runtime.child
        assert child is not None
        timeout, grace = self.config.startup_timeout, self.config.grace_period
        try:
            with anyio.CancelScope() as runtime.launch_scope:  # an eviction cancels the wait
                wait = lambda: supervisor.wait_ready(child, health_path, timeout, grace)  # noqa: E731
                await cancellable(wait, runtime, unit, lambda: self.current_unit(runtime.key)[0])
        except supervisor.StartupFailed as exc:
            runtime.child = None
            self.memory.release(runtime.key)
            await self._failed_run(runtime, f"server {exc}")
            return False
        finally:
            runtime.launch_scope = None
        if runtime.evict_message is not None or self._superseded(runtime, unit):
            return False  # the worker stops it next (its wake event is still set)
        runtime.failures = runtime.unhealthy = 0
        self._measure(runtime, child)
        if self.memory.measured(runtime, loaded=True) is Measured.EXCEEDS_BUDGET:
            await self._exceeds_budget(runtime)
            return False
        return True

    def _measure(self, runtime: UnitRuntime, child: supervisor.Child) -> None:
        """Ask the server's executor what it really uses (host, GPU, llama.cpp's buffers)."""
        executor = next((e for e in self.executors if e.name == runtime.executor), None)
        runtime.footprint = keep_report(measure_with(executor, child.pid, child.log_path), runtime.footprint)
        runtime.actual = runtime.footprint.actual()

    async def _exceeds_budget(self, runtime: UnitRuntime) -> None:
        """Enforce mode: a server over its own budget is stopped; only a spec change starts it again."""
        message = runtime.exceeded or "its measured footprint exceeds its budget"
        await self.teardown(runtime)
        runtime.retry_at = None
        self.metrics.rejected("ExceedsBudget")
        await self.set_status(runtime, "Failed", "ExceedsBudget", message)

    def _superseded(self, runtime: UnitRuntime, unit: ServingUnit) -> bool:
        """Whether ``unit`` is no longer what its worker should run: deleted, not wanted, or another spec."""
        now = self.current_unit(runtime.key)[0]
        return now is None or not now.wanted or now.spec_hash() != unit.spec_hash()

    async def _failed_run(self, runtime: UnitRuntime, message: str) -> None:
        runtime.failures += 1
        runtime.restarts += 1
        self.metrics.restarted(runtime.key)
        delay = min(self.config.backoff_cap, self.config.backoff_base * 2 ** (runtime.failures - 1))
        runtime.retry_at = time.monotonic() + delay
        phase = "CrashLoop" if runtime.failures >= self.config.crash_loop_after else "Restarting"
        await self.set_status(runtime, phase, "Failed", f"{message} (retry in {delay:g} s)")

    async def _probe(self, runtime: UnitRuntime, unit: ServingUnit) -> None:
        child = runtime.child
        assert child is not None
        if not child.running():
            runtime.child = None
            self.memory.release(runtime.key)
            await supervisor.drain_log(child)
            tail = supervisor.tail_lines(child.log_path, 10)
            await self._failed_run(runtime, f"server exited with status {child.exit_code}; last log lines:\n{tail}")
            return
        if (status := supervisor.log_lost(child)) is not None:
            log.warning(
                "server_log_lost", unit=runtime.key, pid=child.pid, writer_status=status, log=str(child.log_path),
                detail="its log writer ended; the server serves on, its output is lost until it restarts",
            )  # fmt: skip
        if await supervisor.healthy(child):
            runtime.unhealthy = 0
            self._measure(runtime, child)
            judged = self.memory.measured(runtime, loaded=False)
            if judged is Measured.EXCEEDS_BUDGET:
                await self._exceeds_budget(runtime)
            elif judged is Measured.WARNED:  # a new warning: reporters turn it into an Event
                await self.set_status(runtime, runtime.phase, runtime.reason, runtime.message)
            return
        runtime.unhealthy += 1
        if runtime.unhealthy >= self.config.unhealthy_after:
            await self.teardown(runtime)  # stop the old process before a new one starts
            await self._failed_run(runtime, f"server unhealthy for {runtime.unhealthy} probes")

    async def teardown(self, runtime: UnitRuntime, evicted: str | None = None) -> None:
        """Stop the unit's server, if any, and release its memory (``evicted``: it waits again, keeping its place)."""
        claim = self.admission.holders.get(runtime.key)
        if runtime.child is not None:
            await supervisor.stop(runtime.child, self.config.grace_period)
            runtime.child = None
            if claim is not None and claim.gpus:  # its device memory is back: waiters are weighed on a fresh figure
                await self.memory.observe_gpus()
        runtime.actual, runtime.warning, runtime.footprint = {}, None, None
        if evicted is not None and claim is not None:
            self.admission.forget(runtime.key)
            self.admission.requeue(claim, EVICTED, evicted)  # it waits again, keeping its place
            self.memory.memory_freed()
        else:
            self.memory.release(runtime.key)

    async def _evict(self, runtime: UnitRuntime) -> None:
        """Stop the server the memory guard chose; the unit waits in the queue until memory allows."""
        message, runtime.evict_message = runtime.evict_message or "", None
        await self.teardown(runtime, evicted=message)
        runtime.retry_at = None
        await self.set_status(runtime, "Pending", EVICTED, message)

    async def set_status(self, runtime: UnitRuntime, phase: str, reason: str, message: str) -> None:
        """The unit's new status: logged, saved with its children, told to on-demand waiters and the reporters."""
        children_changed = runtime.phase in CHILD_PHASES or phase in CHILD_PHASES
        message = redact_text(message)  # no URL secrets in a status, a log line or an Event, whatever said it
        runtime.phase, runtime.reason, runtime.message = phase, reason, message
        if phase == "Failed":
            self.handover.stop_leftover(runtime.key)  # a previous agent's server for a unit that cannot run now
        if children_changed:
            self.handover.save()
        log.info("unit status", unit=runtime.key, phase=phase, reason=reason, message=message)
        self.ondemand.on_status(runtime)  # waiting requests wake; a unit waiting for memory may get idle units'
        unit, _ = self.current_unit(runtime.key)
        await self.plugins.each("report", unit=unit, status={**runtime.status(), **self.ondemand.unit_status(runtime)})

    def set_source_errors(self, errors: dict[str, str]) -> None:
        self.source_errors = errors

    async def shutdown(self) -> None:
        """Stop every child within one grace period, with the previous agent's servers no unit took over yet."""
        leftovers = self.handover.take_leftovers()
        async with anyio.create_task_group() as tasks:
            for child in [*(r.child for r in self.runtimes.values() if r.child is not None), *leftovers]:
                tasks.start_soon(supervisor.stop, child, self.config.grace_period)
        await self.fetcher.close()

    def status(self) -> dict[str, Any]:
        """The status document (/status, ``metal-agent status``, the gauges of /metrics)."""
        return agent_status(self)
