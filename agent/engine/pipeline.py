"""The agent's pipeline: Model and InferenceService events in, supervised inference servers out.

Events update a store of objects; each event pokes the serving units it affects. Every unit has one worker
task, so its events are handled in order, and a poke only marks the unit dirty: however many events arrive
while the worker is busy, it then reconciles once against the latest spec. Different units run concurrently.
Per unit: executor spec check → source → resolve_budget → preflight → ledger admission → download → executor
command → start → report.
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
from agent.engine.memory_guard import Measured, MemoryGuard
from agent.engine.metrics import Metrics
from agent.engine.model_fetch import FetchSettings, ModelFetcher, cancellable, download_status, failure_status
from agent.engine.ondemand import IDLE, OnDemand
from agent.engine.plugin_manager import Plugins
from agent.engine.unit_state import UnitRuntime
from agent.estimate.budget import resolve_budget
from agent.estimate.hostmem import detect_host_memory
from agent.estimate.preflight import Reason, Verdict
from agent.hookspecs import Executor, spec_problem
from agent.memory import context_auto, gpus
from agent.memory.admission import EVICTED, Admission, Outcome
from agent.memory.footprint import keep_report, measure_with
from agent.memory.pressure import Provider, Watchdog, system_provider
from agent.models.download import DownloadError, Progress
from agent.models.model_store import ModelFiles, SourceError
from agent.processes import marker, supervisor
from agent.processes.adoption import recover
from agent.processes.ports import free_port
from agent.processes.state_keeper import StateKeeper
from agent.processes.statefile import ChildRecord
from agent.sources.manifest import ModelSpec, ServiceSpec
from agent.sources.standalone import Event, EventType, Synced
from agent.sources.units import ServingUnit
from agent.util import logs
from agent.util.quantity import format_bytes
from agent.util.redact import redact_text

log = structlog.get_logger("metal_agent.pipeline")
CHILD_PHASES = ("Starting", "Ready")  # phases in which a unit has a process on record


def _reserved_from(runtime: UnitRuntime) -> str:
    """What the ledger holds for a unit: its estimate, its measurement, or the larger of the two."""
    footprint = runtime.footprint
    if footprint is None:
        return "estimate"
    return "measured" if footprint.authoritative else "max(estimate, measured)"


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
            self.admission.set_gpus(gpus.budgets(self._host_budget))  # a GPU's total by the host's fraction
        self.synced = False
        self.source_errors: dict[str, str] = {}  # invalid manifests: file -> message
        self.source_status: Callable[[], dict[str, Any]] | None = None  # the source's own state (the watch)
        self.report_status: Callable[[], dict[str, Any]] | None = None  # the Kubernetes reporter's counters
        self.state_path = config.state_dir / "children.json"
        # Children a previous agent started that are still running (on record or found by their mark): adopted
        # if their unit still wants them; strays (a unit's second server) are stopped when the agent runs.
        self.state_id = marker.state_id(config.state_dir)
        recovered = recover(self.state_path, self.state_id, self._log_path)
        self.adoptable: dict[str, ChildRecord] = recovered.adoptable
        self.strays = recovered.strays
        self._tasks: anyio.abc.TaskGroup | None = None
        self.metrics = Metrics(self.status)  # this agent's own registry, served on /metrics
        self.state = StateKeeper(self.state_path, self.metrics.state_save_failed)  # a failed save never stops us
        self.memory.on_evict = self.metrics.evicted
        store = config.model_store or config.state_dir / "models"
        self.fetcher = ModelFetcher(
            FetchSettings(store, config.model_roots, config.min_free_disk, file_mode=config.model_file_mode)
        )
        self.ondemand = OnDemand(self)  # on-demand units, the /v1 endpoint's waits (agent/service/proxy.py)

    # -- events ---------------------------------------------------------------------------------------------
    async def run(self, events: AsyncIterable[Event | Synced]) -> None:
        async with anyio.create_task_group() as tasks:
            self._tasks = tasks
            for record in self.strays:
                self._stop_leftover(record)
            tasks.start_soon(self.memory.watchdog.run, self.memory.on_sample, name="memory pressure watchdog")
            tasks.start_soon(self.state.retry_loop, self._save_state, name="state file retries")
            tasks.start_soon(self.ondemand.run, name="on-demand idle timer")
            async for event in events:
                if isinstance(event, Synced):
                    self.reap_unclaimed()
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
                await self._set(runtime, "Failed", "InternalError", str(exc))
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
            if (unit is not None or self.synced) and (record := self.adoptable.pop(runtime.key, None)):
                self._stop_leftover(record)  # a previous agent's server for a unit that wants none now
            if runtime.child is not None:  # stopping takes up to the grace period: never Ready meanwhile
                if unit is None and not missing_reason:  # deleted: shown locally, nothing written to a gone object
                    runtime.phase, runtime.reason = "Stopping", "Deleted"
                    runtime.message = "the InferenceService was deleted; its server is stopping"
                else:
                    await self._set(runtime, "Stopping", "Stopping", "the server is stopping: the unit is not wanted")
            await self._teardown(runtime)
            runtime.spec_hash = None  # whatever comes back (the same spec included) starts afresh
            if unit is None and not missing_reason:  # the InferenceService itself is gone
                await self._set(runtime, "Deleted", "Deleted", "the InferenceService was deleted")  # reporters clean up
                return True
            phase, reason = ("Stopped", "Suspended") if unit else ("Pending", "ModelNotFound")
            await self._set(runtime, phase, reason, missing_reason or "replicas is 0 or suspend is true")
            return False
        if not self.ondemand.wanted(unit):  # on demand, no request wants it: no server, no memory
            await self._idle(runtime, unit)
            return False
        spec_hash = unit.spec_hash()
        if runtime.spec_hash == spec_hash:
            if runtime.child:
                await self._probe(runtime, unit)
            elif runtime.retry_at is not None and time.monotonic() >= runtime.retry_at:
                await self._start(runtime, unit)  # a restart after a crash, or memory may have freed
            return False
        await self._teardown(runtime)  # a changed spec replaces the old server: stop it first, memory is shared
        runtime.spec_hash = spec_hash
        runtime.failures = runtime.restarts = 0
        await self._start(runtime, unit)
        return False

    async def _start(self, runtime: UnitRuntime, unit: ServingUnit) -> None:
        runtime.retry_at = None
        executor, _ = self._executor(unit)
        if executor is not None and (problem := spec_problem(executor, unit)):  # e.g. extraArgs off the allowlist
            self.metrics.rejected("InvalidSpec")
            await self._set(runtime, "Failed", "InvalidSpec", f"{executor.name}: {problem}")
            return
        try:
            files = self.fetcher.files(unit.model)
            await self.fetcher.plan(files)  # a remote model is sized from its header before any download
        except (SourceError, DownloadError) as exc:
            self.metrics.rejected(exc.reason)
            await self._download_failed(runtime, exc)
            return
        model_path = files.path
        host = detect_host_memory(self.config.host_memory)
        try:
            budget = await self.plugins.first(
                "resolve_budget", unit=unit, host=host, agent_fraction=self.config.memory_fraction
            )
        except ValueError as exc:
            self.metrics.rejected("InvalidSpec")
            await self._set(runtime, "Failed", "InvalidSpec", str(exc))
            return
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
            await self._set(runtime, "Failed", str(verdict.reason), verdict.message)
            return
        estimate = verdict.estimate
        need = estimate.total_bytes if estimate else budget.bytes
        device_need = 0
        if estimate is not None and estimate.device_bytes is not None:  # a GPU server: host and device ledgers
            need, device_need = estimate.host_bytes or 0, estimate.device_bytes
        if await self._adopt(runtime, unit, need):  # its memory is in use already: it does not queue
            self.metrics.admitted()
            return
        spec = unit.service
        decision = self.admission.request(
            runtime.key, need, spec.priority, spec.eviction_protection, self.memory.available(), device_need,
            max(1, unit.model.gpu_count or 1),
        )  # fmt: skip
        self.memory.wake_granted()  # units ahead of this one may have been admitted too
        if decision.outcome is Outcome.NEVER_FITS:
            self.metrics.rejected(decision.reason)
            await self._set(runtime, "Failed", decision.reason, decision.message)
            return
        if decision.outcome is Outcome.WAITING:  # woken when the queue admits it
            if (runtime.phase, runtime.reason) != ("Pending", decision.reason):  # counted once per wait
                waiting = "WaitingForMemory" if decision.reason == "InsufficientMemory" else decision.reason
                self.metrics.rejected(waiting)
            await self._set(runtime, "Pending", decision.reason, decision.message)
            return
        self.metrics.admitted()
        runtime.warning = None
        if runtime.evict_message is not None:
            return  # chosen for eviction since: the worker handles that next
        executor, why_not = self._executor(unit)
        if executor is None:
            self.memory.release(runtime.key)
            self.metrics.rejected("NoExecutor")
            await self._set(runtime, "Failed", "NoExecutor", why_not)
            return
        if files.remote and not await self._download(runtime, unit, files):
            return
        if self._superseded(runtime, unit):  # deleted or changed while it was checked: never spawned
            self.memory.release(runtime.key)
            return
        await self._launch(runtime, unit, executor, model_path)

    async def _download(self, runtime: UnitRuntime, unit: ServingUnit, files: ModelFiles) -> bool:
        """Fetch a remote model while holding its reservation; False (memory released) when it did not finish."""

        async def report(records: list[Progress], publish: bool) -> None:
            runtime.download, runtime.message = download_status(records), "; ".join(p.text() for p in records)
            if publish:  # the first time and every log interval: logs and report hooks; the API sees every update
                await self._set(runtime, "Downloading", "Downloading", runtime.message)

        try:
            fetch = lambda: self.fetcher.fetch(files, unit.model.sha256, report)  # noqa: E731
            done = await cancellable(fetch, runtime, unit, lambda: self.current_unit(runtime.key)[0])
        except DownloadError as exc:
            done = await self._download_failed(runtime, exc)
        if not done:
            self.memory.release(runtime.key)
        runtime.download = None
        return done

    async def _download_failed(self, runtime: UnitRuntime, exc: SourceError | DownloadError) -> bool:
        phase, message = failure_status(exc, runtime, self.config.backoff_base, self.config.backoff_cap)
        await self._set(runtime, phase, exc.reason, message)
        return False

    async def _adopt(self, runtime: UnitRuntime, unit: ServingUnit, need: int) -> bool:
        """Take over the child a previous agent started for this unit if it runs this spec (healthy or loading)."""
        record = self.adoptable.pop(runtime.key, None)
        if record is None:
            return False
        child = record.child()
        if record.spec_hash == unit.spec_hash() and record.is_ours():
            self.admission.hold(runtime.key, need, unit.service.priority, unit.service.eviction_protection)
            runtime.child = child
            adopting, _ = self._executor(unit)
            runtime.executor = adopting.name if adopting else None  # it measures the server
            await self._set(runtime, "Starting", "Adopted", f"adopting pid {child.pid} on port {child.port}")
            if await self._until_ready(runtime, unit, record.health_path):
                await self._set(runtime, "Ready", "Adopted", f"adopted pid {child.pid} on port {child.port}")
            return True
        if record.is_ours():
            await supervisor.stop(child, self.config.grace_period)
        return False

    def reap_unclaimed(self) -> None:
        """After the first full listing: children whose unit no longer exists, has no Model or is suspended are
        stopped (if still ours)."""
        for key in [k for k in self.adoptable if not self._wants_a_server(k)]:
            self._stop_leftover(self.adoptable.pop(key))
        self._save_state()

    def _wants_a_server(self, key: str) -> bool:
        unit, _ = self.current_unit(key)
        return unit is not None and unit.wanted

    def _stop_leftover(self, record: ChildRecord) -> None:
        """Stop a previous agent's server that no unit takes over, if it is still provably ours."""
        if record.is_ours():
            assert self._tasks is not None
            self._tasks.start_soon(supervisor.stop, record.child(), self.config.grace_period)

    def _log_path(self, key: str) -> Path:
        return self.config.state_dir / "logs" / f"{key.replace('/', '_')}.log"

    def _save_state(self) -> None:
        records = [
            ChildRecord(
                r.key, r.spec_hash or "", c.pid, c.create_time, c.argv, c.port, str(c.log_path), c.health_path, c.marker
            )
            for r in self.runtimes.values()
            if (c := r.child) is not None
        ]
        records += list(self.adoptable.values())  # not yet claimed: keep them on record
        self.state.save(records)

    def _executor(self, unit: ServingUnit) -> tuple[Executor | None, str]:
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
            mark = marker.child_env(self.state_id, runtime.key, unit.spec_hash(), port, launch.health_path)
            logs_bound = supervisor.LogSettings(self.config.log_max_size, self.config.log_keep)
            child = supervisor.start(
                launch, port, self._log_path(runtime.key), logs_bound, self.config.server_env, mark
            )
        except Exception as exc:  # the plugin's message becomes the unit's reason
            self.memory.release(runtime.key)
            await self._set(runtime, "Failed", "SpawnFailed", f"{executor.name}: {exc}")
            return
        runtime.child, runtime.executor = child, executor.name
        await self._set(runtime, "Starting", "Admitted", f"{executor.name} pid {child.pid} on port {port}")
        if await self._until_ready(runtime, unit, launch.health_path):
            self.metrics.server_started(executor.name, time.monotonic() - spawned_at)
            await self._set(runtime, "Ready", "Ready", f"serving on http://127.0.0.1:{port}")

    async def _until_ready(self, runtime: UnitRuntime, unit: ServingUnit, health_path: str) -> bool:
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
        await self._teardown(runtime)
        runtime.retry_at = None
        self.metrics.rejected("ExceedsBudget")
        await self._set(runtime, "Failed", "ExceedsBudget", message)

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
        await self._set(runtime, phase, "Failed", f"{message} (retry in {delay:g} s)")

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
        if await supervisor.healthy(child):
            runtime.unhealthy = 0
            self._measure(runtime, child)
            judged = self.memory.measured(runtime, loaded=False)
            if judged is Measured.EXCEEDS_BUDGET:
                await self._exceeds_budget(runtime)
            elif judged is Measured.WARNED:  # a new warning: reporters turn it into an Event
                await self._set(runtime, runtime.phase, runtime.reason, runtime.message)
            return
        runtime.unhealthy += 1
        if runtime.unhealthy >= self.config.unhealthy_after:
            await self._teardown(runtime)  # stop the old process before a new one starts
            await self._failed_run(runtime, f"server unhealthy for {runtime.unhealthy} probes")

    async def _teardown(self, runtime: UnitRuntime, evicted: str | None = None) -> None:
        claim = self.admission.holders.get(runtime.key)
        if runtime.child is not None:
            await supervisor.stop(runtime.child, self.config.grace_period)
            runtime.child = None
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
        await self._teardown(runtime, evicted=message)
        runtime.retry_at = None
        await self._set(runtime, "Pending", EVICTED, message)

    async def _idle(self, runtime: UnitRuntime, unit: ServingUnit) -> None:
        """An on-demand unit nobody asks for: stop its server if any; its status says Idle with model and budget."""
        await self._teardown(runtime)
        runtime.spec_hash = None  # the next request starts it afresh
        runtime.retry_at = None
        host = detect_host_memory(self.config.host_memory)
        try:
            budget = unit.model.budget(host.total_bytes, self.config.memory_fraction)
        except ValueError as exc:
            await self._set(runtime, "Failed", "InvalidSpec", str(exc))
            return
        message = self.ondemand.idle_message(unit, f"{format_bytes(budget.bytes)} ({budget.source})")
        runtime.verdict = Verdict(Reason.FITS, allowed=True, message=message, budget=budget)  # the budget shows
        if (runtime.phase, runtime.reason, runtime.message) != (IDLE, IDLE, message):
            await self._set(runtime, IDLE, IDLE, message)

    async def _set(self, runtime: UnitRuntime, phase: str, reason: str, message: str) -> None:
        children_changed = runtime.phase in CHILD_PHASES or phase in CHILD_PHASES
        message = redact_text(message)  # no URL secrets in a status, a log line or an Event, whatever said it
        runtime.phase, runtime.reason, runtime.message = phase, reason, message
        if phase == "Failed" and (record := self.adoptable.pop(runtime.key, None)):
            self._stop_leftover(record)  # a previous agent's server for a unit that cannot run now
        if children_changed:
            self._save_state()
        log.info("unit status", unit=runtime.key, phase=phase, reason=reason, message=message)
        self.ondemand.on_status(runtime)  # waiting requests wake; a unit waiting for memory may get idle units'
        unit, _ = self.current_unit(runtime.key)
        await self.plugins.each("report", unit=unit, status={**runtime.status(), **self.ondemand.unit_status(runtime)})

    def set_source_errors(self, errors: dict[str, str]) -> None:
        self.source_errors = errors

    async def shutdown(self) -> None:
        """Stop every child within one grace period, with the previous agent's servers no unit took over yet."""
        leftovers = [r.child() for r in [*self.adoptable.values(), *self.strays] if r.is_ours()]
        self.adoptable.clear()
        async with anyio.create_task_group() as tasks:
            for child in [*(r.child for r in self.runtimes.values() if r.child is not None), *leftovers]:
                tasks.start_soon(supervisor.stop, child, self.config.grace_period)
        await self.fetcher.close()

    def status(self) -> dict[str, Any]:
        host = detect_host_memory(self.config.host_memory)
        return {
            "host": {
                "total_bytes": host.total_bytes,
                "available_bytes": host.available_bytes,
                "budget_bytes": self.ledger.capacity,
                "reserved_bytes": self.ledger.used,
                "budget_source": "agent" if self.config.memory_fraction else "adaptive",
            },
            "units": [
                {
                    **runtime.status(),
                    "reserved_bytes": self.ledger.held.get(runtime.key, 0),
                    "reserved_from": _reserved_from(runtime),
                    "reserved_gpu_bytes": {
                        str(index): ledger.held[runtime.key]
                        for index, ledger in sorted(self.admission.gpu_ledgers.items())
                        if runtime.key in ledger.held
                    }
                    or None,
                    **self.ondemand.unit_status(runtime),
                }
                for runtime in sorted(self.runtimes.values(), key=lambda r: r.key)
            ],
            "manifest_errors": dict(self.source_errors),
            **({"watch": self.source_status()} if self.source_status else {}),
            **({"report": self.report_status()} if self.report_status else {}),
            **self.memory.status(),
            **self.state.status(),
            "cuda_context_overhead": gpus.CONTEXT_OVERHEAD.status(),
        }
