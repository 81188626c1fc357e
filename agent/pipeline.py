"""The agent's pipeline: Model and InferenceService events in, supervised inference servers out.

Events update a store of objects; each event pokes the serving units it affects. Every unit has one worker
task, so its events are handled in order, and a poke only marks the unit dirty: however many events arrive
while the worker is busy, it then reconciles once against the latest spec. Different units run concurrently.
Per unit: source → resolve_budget → preflight → ledger admission → download → executor command → start → report.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import psutil
import structlog

from agent import logs, supervisor
from agent.budget import resolve_budget
from agent.calibrate import free_port
from agent.download import DownloadError, Progress
from agent.hookspecs import Executor
from agent.hostmem import HostMemory, detect_host_memory
from agent.kube.settings import KubeSettings
from agent.ledger import Ledger
from agent.llama_memlog import parse_memory_log
from agent.manifest import ModelSpec, ServiceSpec
from agent.metrics import Metrics
from agent.model_fetch import FetchSettings, ModelFetcher, cancellable, download_status, failure_status
from agent.model_store import ModelFiles, SourceError
from agent.plugin_manager import Plugins
from agent.preflight import Mode, Verdict
from agent.quantity import format_bytes
from agent.standalone import Event, EventType, Synced
from agent.statefile import ChildRecord
from agent.statefile import load as load_state
from agent.statefile import save as save_state
from agent.unit_state import UnitRuntime
from agent.units import ServingUnit

log = structlog.get_logger("metal_agent.pipeline")
CHILD_PHASES = ("Starting", "Ready")  # phases in which a unit has a process on record


@dataclass(frozen=True)
class AgentConfig:
    state_dir: Path
    memory_fraction: float | None = None
    mode: Mode = Mode.ENFORCE
    host_memory: int | None = None  # override of the detected total
    startup_timeout: float = 120.0
    grace_period: float = 10.0
    probe_interval: float = 5.0
    unhealthy_after: int = 3  # failed probes in a row before a restart
    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    crash_loop_after: int = 5  # failures without a healthy start in between
    ports: range | None = None  # fixed ports for servers (firewall rules, bookmarks); None: kernel-assigned
    kube: KubeSettings | None = None  # Kubernetes mode (run --kube): objects come from the API server
    model_store: Path | None = None  # downloads; None: STATE_DIR/models
    model_roots: tuple[Path, ...] = ()  # directories local model paths may lie in (besides the store)
    min_free_disk: int = 1 << 30  # a download must leave this much disk free
    # Kubernetes mode (agent/kube/report.py): how this host appears in the cluster.
    agent_name: str | None = None  # host label, Events' reportingInstance; None: the host name
    advertise_address: str | None = None  # the IP in EndpointSlices; None: the route to the API server
    register_endpoints: bool = True  # a Service and an EndpointSlice per served unit
    service_port: int = 8080


class Agent:
    def __init__(self, config: AgentConfig, plugins: Plugins) -> None:
        self.config, self.plugins = config, plugins
        self.executors: list[Executor] = plugins.executors()
        self.models: dict[tuple[str, str], ModelSpec] = {}
        self.services: dict[tuple[str, str], ServiceSpec] = {}
        self.runtimes: dict[str, UnitRuntime] = {}
        self.host = detect_host_memory(config.host_memory)
        self.ledger = Ledger(resolve_budget(self.host.total_bytes, None, None, config.memory_fraction).bytes)
        self.synced = False
        self.source_errors: dict[str, str] = {}  # invalid manifests: file -> message
        self.source_status: Callable[[], dict[str, Any]] | None = None  # the source's own state (the watch)
        self.report_status: Callable[[], dict[str, Any]] | None = None  # the Kubernetes reporter's counters
        self.state_path = config.state_dir / "children.json"
        # Children a previous agent started that are still running: adopted if their unit still wants them.
        self.adoptable: dict[str, ChildRecord] = {r.unit: r for r in load_state(self.state_path)}
        self._tasks: anyio.abc.TaskGroup | None = None
        self.metrics = Metrics(self.status)  # this agent's own registry, served on /metrics
        store = config.model_store or config.state_dir / "models"
        self.fetcher = ModelFetcher(FetchSettings(store, config.model_roots, config.min_free_disk))

    # -- events ---------------------------------------------------------------------------------------------
    async def run(self, events: AsyncIterable[Event | Synced]) -> None:
        async with anyio.create_task_group() as tasks:
            self._tasks = tasks
            async for event in events:
                if isinstance(event, Synced):
                    self.reap_unclaimed()
                    self.synced = True
                else:
                    self.apply(event)

    def apply(self, event: Event) -> None:
        obj = event.obj
        store: dict[Any, Any] = self.models if isinstance(obj, ModelSpec) else self.services
        key = (obj.namespace, obj.name)
        if event.type is EventType.DELETED:
            store.pop(key, None)
        else:
            store[key] = obj
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
            if done:
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
        if unit is None or not unit.wanted:
            await self._teardown(runtime)
            if unit is None and not missing_reason:  # the InferenceService itself is gone
                await self._set(runtime, "Deleted", "Deleted", "the InferenceService was deleted")  # reporters clean up
                return True
            phase, reason = ("Stopped", "Suspended") if unit else ("Pending", "ModelNotFound")
            await self._set(runtime, phase, reason, missing_reason or "replicas is 0 or suspend is true")
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
        verdict: Verdict = await self.plugins.first(
            "preflight", unit=unit, model_path=model_path, budget=budget, host=host, mode=str(self.config.mode)
        )
        runtime.verdict = verdict
        if not verdict.allowed:  # it does not fit its own budget: only a spec change can help
            self.metrics.rejected(str(verdict.reason))
            await self._set(runtime, "Failed", str(verdict.reason), verdict.message)
            return
        need = verdict.estimate.total_bytes if verdict.estimate else budget.bytes
        if not self._admit(runtime.key, need, host):
            if (runtime.phase, runtime.reason) != ("Pending", "InsufficientMemory"):  # counted once per wait
                self.metrics.rejected("WaitingForMemory")
            runtime.retry_at = time.monotonic() + self.config.probe_interval  # also poked when memory frees
            await self._set(runtime, "Pending", "InsufficientMemory", self._ledger_message(runtime.key, need))
            return
        self.metrics.admitted()
        if await self._adopt(runtime, unit):
            return
        executor, why_not = self._executor(unit)
        if executor is None:
            self.ledger.release(runtime.key)
            self.metrics.rejected("NoExecutor")
            await self._set(runtime, "Failed", "NoExecutor", why_not)
            return
        if files.remote and not await self._download(runtime, unit, files):
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
        if not done and self.ledger.release(runtime.key):
            self._repoke_waiting()
        runtime.download = None
        return done

    async def _download_failed(self, runtime: UnitRuntime, exc: SourceError | DownloadError) -> bool:
        phase, message = failure_status(exc, runtime, self.config.backoff_base, self.config.backoff_cap)
        await self._set(runtime, phase, exc.reason, message)
        return False

    async def _adopt(self, runtime: UnitRuntime, unit: ServingUnit) -> bool:
        """Take over the child a previous agent started for this unit, if it runs this spec and is healthy."""
        record = self.adoptable.pop(runtime.key, None)
        if record is None:
            return False
        child = record.child()
        if record.spec_hash == unit.spec_hash() and record.is_ours() and await supervisor.healthy(child):
            runtime.child = child
            runtime.actual = self._actual(child)
            await self._set(runtime, "Ready", "Adopted", f"adopted pid {child.pid} on port {child.port}")
            return True
        if record.is_ours():
            await supervisor.stop(child, self.config.grace_period)
        return False

    def reap_unclaimed(self) -> None:
        """After the first full listing: children whose unit no longer exists are stopped (if still ours)."""
        known = {f"{s.namespace}/{s.name}" for s in self.services.values()}
        for key in [k for k in self.adoptable if k not in known]:
            record = self.adoptable.pop(key)
            if record.is_ours():
                assert self._tasks is not None
                self._tasks.start_soon(supervisor.stop, record.child(), self.config.grace_period)
        self._save_state()

    def _save_state(self) -> None:
        records = [
            ChildRecord(r.key, r.spec_hash or "", c.pid, c.create_time, c.argv, c.port, str(c.log_path))
            for r in self.runtimes.values()
            if (c := r.child) is not None
        ]
        records += list(self.adoptable.values())  # not yet claimed: keep them on record
        save_state(self.state_path, records)

    def _admit(self, key: str, need: int, host: HostMemory) -> bool:
        # The OS must also have the memory now: a foreign process may hold what our ledger thinks is free.
        return need <= host.available_bytes + self.ledger.held.get(key, 0) and self.ledger.reserve(key, need)

    def _ledger_message(self, key: str, need: int) -> str:
        others = len([k for k in self.ledger.held if k != key])
        return (
            f"needs {format_bytes(need)}; the host budget {format_bytes(self.ledger.capacity)} has "
            f"{format_bytes(max(0, self.ledger.free_for(key)))} free ({others} other unit(s) running or starting); "
            "it starts when memory frees"
        )

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
            child = supervisor.start(
                launch, port, self.config.state_dir / "logs" / f"{runtime.key.replace('/', '_')}.log"
            )
        except Exception as exc:  # the plugin's message becomes the unit's reason
            self.ledger.release(runtime.key)
            await self._set(runtime, "Failed", "SpawnFailed", f"{executor.name}: {exc}")
            return
        runtime.child, runtime.executor = child, executor.name
        await self._set(runtime, "Starting", "Admitted", f"{executor.name} pid {child.pid} on port {port}")
        try:
            await supervisor.wait_ready(
                child, launch.health_path, self.config.startup_timeout, self.config.grace_period
            )
        except supervisor.StartupFailed as exc:
            runtime.child = None
            self.ledger.release(runtime.key)
            await self._failed_run(runtime, f"server {exc}")
            return
        self.metrics.server_started(executor.name, time.monotonic() - spawned_at)
        runtime.failures = runtime.unhealthy = 0
        runtime.actual = self._actual(child)
        await self._set(runtime, "Ready", "Ready", f"serving on http://127.0.0.1:{port}")

    async def _failed_run(self, runtime: UnitRuntime, message: str) -> None:
        runtime.failures += 1
        runtime.restarts += 1
        self.metrics.restarted(runtime.key)
        delay = min(self.config.backoff_cap, self.config.backoff_base * 2 ** (runtime.failures - 1))
        runtime.retry_at = time.monotonic() + delay
        phase = "CrashLoop" if runtime.failures >= self.config.crash_loop_after else "Restarting"
        await self._set(runtime, phase, "Failed", f"{message} (retry in {delay:g} s)")
        self._repoke_waiting()

    async def _probe(self, runtime: UnitRuntime, unit: ServingUnit) -> None:
        child = runtime.child
        assert child is not None
        supervisor.bound_log(child.log_path)
        if not child.running():
            runtime.child = None
            self.ledger.release(runtime.key)
            tail = supervisor.tail_lines(child.log_path, 10)
            await self._failed_run(runtime, f"server exited with status {child.exit_code}; last log lines:\n{tail}")
            return
        if await supervisor.healthy(child):
            runtime.unhealthy = 0
            return
        runtime.unhealthy += 1
        if runtime.unhealthy >= self.config.unhealthy_after:
            await self._teardown(runtime)  # stop the old process before a new one starts
            await self._failed_run(runtime, f"server unhealthy for {runtime.unhealthy} probes")

    def _actual(self, child: supervisor.Child) -> dict[str, int]:
        report = parse_memory_log(supervisor.tail_lines(child.log_path, 400))
        actual = {"rss": psutil.Process(child.pid).memory_info().rss} if child.running() else {}
        for name in ("model_bytes", "kv_bytes", "output_bytes", "compute_bytes", "total_bytes"):
            value = getattr(report, name)
            if value is not None:
                actual[name.removesuffix("_bytes")] = value
        return actual

    async def _teardown(self, runtime: UnitRuntime) -> None:
        if runtime.child is not None:
            await supervisor.stop(runtime.child, self.config.grace_period)
            runtime.child = None
        runtime.actual = {}
        if self.ledger.release(runtime.key):
            self._repoke_waiting()

    def _repoke_waiting(self) -> None:
        """Memory was freed: units waiting for it try again."""
        for other in self.runtimes.values():
            if other.phase == "Pending" and other.reason == "InsufficientMemory":
                other.retry_at = time.monotonic()
                other.poke()

    async def _set(self, runtime: UnitRuntime, phase: str, reason: str, message: str) -> None:
        children_changed = runtime.phase in CHILD_PHASES or phase in CHILD_PHASES
        runtime.phase, runtime.reason, runtime.message = phase, reason, message
        if children_changed:
            self._save_state()
        log.info("unit status", unit=runtime.key, phase=phase, reason=reason, message=message)
        unit, _ = self.current_unit(runtime.key)
        await self.plugins.each("report", unit=unit, status=runtime.status())

    def set_source_errors(self, errors: dict[str, str]) -> None:
        self.source_errors = errors

    async def shutdown(self) -> None:
        """Stop every child within one grace period."""
        async with anyio.create_task_group() as tasks:
            for runtime in list(self.runtimes.values()):
                if runtime.child is not None:
                    tasks.start_soon(supervisor.stop, runtime.child, self.config.grace_period)
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
                {**runtime.status(), "reserved_bytes": self.ledger.held.get(runtime.key, 0)}
                for runtime in sorted(self.runtimes.values(), key=lambda r: r.key)
            ],
            "manifest_errors": dict(self.source_errors),
            **({"watch": self.source_status()} if self.source_status else {}),
            **({"report": self.report_status()} if self.report_status else {}),
        }
