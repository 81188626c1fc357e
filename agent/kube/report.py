"""The Kubernetes reporter: the ``report`` hook that writes what the agent does back to the cluster.

``report`` itself only records the unit's latest status and queues an Event, so the pipeline never waits on the
API server. A background task then brings each InferenceService up to date, one write per change:

- the status by a merge patch on ``/status`` (a real API server rejects the client's default patch type for
  custom resources), holding only the difference from what is there: an identical status writes nothing;
- the Service and EndpointSlice of the unit (``agent.kube.endpoints``), removed when it stops or is deleted.

Statuses coalesce (the latest wins), so a burst of transitions costs one write. The agent's own status writes
do not start another reconcile: a write to the status subresource never changes ``metadata.generation`` or the
spec, and the unit's spec hash (``agent.units``) covers the specs only, so the watch sees nothing to do.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog
from kubernetes_asyncio.client import CustomObjectsApi

from agent.hookspecs import hookimpl
from agent.kube.calls import DEFAULT_RETRY, MERGE_PATCH, NotFound, Retry, call
from agent.kube.endpoints import Endpoints, Target, detect_host_ip, label_value
from agent.kube.events import Event, EventRecorder
from agent.kube.model_status import ModelFacts
from agent.kube.status import SCHEDULING_REASONS, build_status, managed, merge_patch, strip_nulls
from agent.manifest import GROUP, VERSION
from agent.pipeline import AgentConfig
from agent.plugin_manager import Plugins
from agent.units import ServingUnit

log = structlog.get_logger("metal_agent.kube.report")
PLURAL = "inferenceservices"
DELETED = "Deleted"  # the phase the pipeline reports when the InferenceService is gone
WARNING_PHASES = frozenset({"Failed", "CrashLoop", "Restarting"})
ACTIONS = {"Pending": "Admit", "Starting": "Start", "Ready": "Serve", "Restarting": "Restart", "Stopped": "Stop"}


def default_host_name() -> str:
    return socket.gethostname().split(".")[0] or "localhost"


@dataclass(frozen=True)
class ReporterSettings:
    host_name: str = field(default_factory=default_host_name)  # labels, Events' reportingInstance, status.agent
    host_ip: str | None = None  # the address the cluster reaches this host at; None: the route to the API server
    endpoints: bool = True  # register a Service and an EndpointSlice per served unit
    service_port: int = 8080  # the Service's port (the EndpointSlice points at the server's own port)
    events: bool = True
    event_queue: int = 1024  # a burst (every unit at start) fits; beyond it Events are dropped and counted
    concurrency: int = 8  # objects written at once
    retry: Retry = DEFAULT_RETRY
    retry_after: float = 5.0  # seconds before a failed write is tried again


def reporter_settings(config: AgentConfig) -> ReporterSettings:
    """The reporter's settings from the agent's configuration (``metal-agent run`` flags)."""
    return ReporterSettings(
        host_name=config.agent_name or default_host_name(),
        host_ip=config.advertise_address,
        endpoints=config.register_endpoints,
        service_port=config.service_port,
    )


@dataclass
class _Desired:
    unit: ServingUnit | None
    status: dict[str, Any]


class KubeReporter:
    """Register with ``register_reporter``; run ``run()`` in a task group; ``shutdown()`` before exit."""

    def __init__(self, api_client: Any, settings: ReporterSettings) -> None:
        self.settings, self.api_client = settings, api_client
        self.host = label_value(settings.host_name)
        # Any: the bundled stubs omit the generated methods' keyword arguments (_content_type).
        self.custom: Any = CustomObjectsApi(api_client)
        self.host_ip = settings.host_ip
        self._api_url: str = getattr(getattr(api_client, "configuration", None), "host", "") or ""
        self.endpoints = Endpoints(api_client, self.host, settings.service_port, settings.retry)
        self.events = EventRecorder(
            api_client, f"metal-agent-{self.host}", self._uid, settings.event_queue, retry=settings.retry
        )
        self.desired: dict[str, _Desired] = {}
        self.written: dict[str, dict[str, Any]] = {}  # the status on the server, as far as this agent knows
        self.uids: dict[str, str] = {}
        self.models = ModelFacts(self.custom, settings.retry)
        self.swept: set[str] = set()  # units whose leftover endpoints (from a killed agent) were removed
        self.last_event: dict[str, tuple[str, str, str]] = {}
        self.dirty: set[str] = set()
        self.status_writes = 0
        self._wake = anyio.Event()
        self._idle = anyio.Event()
        self._idle.set()
        self._busy = 0

    # -- the hook --------------------------------------------------------------------------------------------
    @hookimpl
    def report(self, unit: ServingUnit | None, status: dict[str, Any]) -> None:
        key = str(status.get("unit") or "")
        if "/" not in key:
            return
        self.desired[key] = _Desired(unit, dict(status))
        self.dirty.add(key)
        if self._idle.is_set():
            self._idle = anyio.Event()
        self._wake.set()
        if self.settings.events:
            self._event(key, status)

    def _event(self, key: str, status: dict[str, Any]) -> None:
        phase, reason, message = str(status.get("phase")), str(status.get("reason") or ""), str(status.get("message"))
        if phase == DELETED or self.last_event.get(key) == (phase, reason, message):
            return
        self.last_event[key] = (phase, reason, message)
        warning = phase in WARNING_PHASES or reason in SCHEDULING_REASONS
        why = "CrashLoop" if phase == "CrashLoop" else (reason or phase)
        action = ACTIONS.get(phase, "Admit" if reason in SCHEDULING_REASONS else "Start")
        namespace, name = key.split("/", 1)
        self.events.emit(Event(namespace, name, "Warning" if warning else "Normal", why, action, message))

    async def _uid(self, namespace: str, name: str) -> str | None:
        """The InferenceService's uid (for Events' ``regarding``), read once if the status writer has not yet."""
        key = f"{namespace}/{name}"
        if key not in self.uids:
            try:
                obj = await self._get(key, namespace, name)
            except NotFound:
                return None
            if isinstance(obj, dict) and (uid := (obj.get("metadata") or {}).get("uid")):
                self.uids[key] = uid
        return self.uids.get(key)

    async def _get(self, key: str, namespace: str, name: str) -> Any:
        """The InferenceService as the API has it; None when it could not be read. Raises NotFound."""
        return await call(
            f"get {key}",
            lambda: self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name),
            self.settings.retry,
        )

    # -- the background writer ------------------------------------------------------------------------------
    async def run(self) -> None:
        """Write statuses and endpoints, and send Events, until cancelled."""
        if self.host_ip is None:
            self.host_ip = await anyio.to_thread.run_sync(detect_host_ip, self._api_url)
            log.info("advertising this host's address", address=self.host_ip, host=self.host)
            if self.settings.endpoints and ipaddress.ip_address(self.host_ip).is_loopback:
                log.warning(
                    "the route to the API server is loopback (a tunnel?): set --advertise-address so "
                    "the cluster can reach this host's servers",
                    address=self.host_ip,
                )
        limiter = anyio.CapacityLimiter(self.settings.concurrency)
        async with anyio.create_task_group() as tasks:
            if self.settings.events:
                tasks.start_soon(self.events.run)
            while True:
                await self._wake.wait()
                self._wake = anyio.Event()
                batch, self.dirty = self.dirty, set()
                self._busy += 1
                async with anyio.create_task_group() as round_:
                    for key in sorted(batch):
                        round_.start_soon(self._sync_limited, limiter, tasks, key)
                self._busy -= 1
                if not self.dirty and not self._busy:
                    self._idle.set()

    def stats(self) -> dict[str, Any]:
        """For the agent's /status: what was written, what waits, what failed."""
        events = self.events
        return {
            "host": self.host,
            "address": self.host_ip,
            "status_writes": self.status_writes,
            "pending": len(self.dirty),
            "events": {
                "sent": events.sent,
                "aggregated": events.aggregated,
                "dropped": events.dropped,
                "failed": events.failed,
                "queued": events.pending,
            },
            "endpoint_conflicts": sorted(f"{ns}/{name}" for ns, name in self.endpoints.conflicts),
        }

    async def wait_idle(self) -> None:
        """Until every reported status is written (or failed and scheduled again)."""
        await self._idle.wait()

    async def _sync_limited(self, limiter: anyio.CapacityLimiter, tasks: anyio.abc.TaskGroup, key: str) -> None:
        async with limiter:
            try:
                done = await self._sync(key)
            except Exception:  # a bug must cost one object's status, not the reporter
                log.exception("status write failed", unit=key)
                done = False
        if not done:
            tasks.start_soon(self._again, key)

    async def _again(self, key: str) -> None:
        await anyio.sleep(self.settings.retry_after)
        if key in self.desired:
            self.dirty.add(key)
            self._wake.set()

    def _forget(self, key: str, processed: _Desired) -> None:
        """The object is gone. A status reported for it since (a new object of that name) is kept."""
        if self.desired.get(key) is processed:
            del self.desired[key]
        for table in (self.written, self.uids, self.last_event):
            table.pop(key, None)
        self.swept.discard(key)

    async def _sync(self, key: str) -> bool:
        """Bring one InferenceService's status and endpoints up to date; False to try again later."""
        desired = self.desired.get(key)
        if desired is None:
            return True
        namespace, name = key.split("/", 1)
        phase = desired.status.get("phase")
        if phase == DELETED:
            if self.settings.endpoints:
                await self.endpoints.remove(namespace, name)
            self._forget(key, desired)
            return True
        if key not in self.written:
            found = await self._read(key, namespace, name)
            if found is None:  # gone: nothing to write
                self._forget(key, desired)
                return True
            if not found:
                return False  # unreadable for now: try again
        endpoint, registered = await self._endpoints(key, desired)
        if desired.unit is not None:
            await self.models.write(desired.unit)
        unit = desired.unit
        port = desired.status.get("port")
        new = strip_nulls(
            build_status(
                desired.status,
                self.written[key],
                generation=unit.service.generation if unit else None,
                suspended=bool(unit and unit.service.suspend),
                host=self.host,
                endpoint=endpoint,
                host_endpoint=self._host_url(port) if port else None,
            )
        )
        patch = merge_patch(self.written[key], new)
        if not patch:
            return registered
        try:
            result = await call(
                f"patch {key}/status",
                lambda: self.custom.patch_namespaced_custom_object_status(
                    GROUP, VERSION, namespace, PLURAL, name, {"status": patch}, _content_type=MERGE_PATCH
                ),
                self.settings.retry,
            )
        except NotFound:  # deleted; the pipeline reports that too
            self._forget(key, desired)
            return True
        if result is None:
            return False
        self.written[key] = new
        self.status_writes += 1
        return registered

    async def _read(self, key: str, namespace: str, name: str) -> bool | None:
        """The object's current status (to diff against) and uid (for owner references and Events).

        None when it does not exist, False when it could not be read.
        """
        try:
            obj = await self._get(key, namespace, name)
        except NotFound:
            return None
        if not isinstance(obj, dict):
            return False
        self.written[key] = managed(obj.get("status") or {})
        self.uids[key] = (obj.get("metadata") or {}).get("uid") or ""
        return True

    def _host_url(self, port: int) -> str:
        ip = self.host_ip or "127.0.0.1"
        return f"http://[{ip}]:{port}" if ":" in ip else f"http://{ip}:{port}"

    async def _endpoints(self, key: str, desired: _Desired) -> tuple[str | None, bool]:
        """Register (or unregister) the unit's endpoint: the URL to report, and False to try again later.

        A name taken by someone else's object is not retried (the next status change tries again).
        """
        namespace, name = key.split("/", 1)
        phase, port = desired.status.get("phase"), desired.status.get("port")
        if not self.settings.endpoints:
            return (self._host_url(port) if port else None), True
        if phase == "Stopped":
            await self.endpoints.remove(namespace, name)
            return None, True
        if not port and (namespace, name) not in self.endpoints.applied:
            if key not in self.swept:  # a previous agent, killed, may have left this unit's endpoint marked ready
                self.swept.add(key)
                await self.endpoints.remove(namespace, name)
            return None, True
        # No server now (a restart, a budget too small): the Service and its ClusterIP stay, the address goes.
        ready = phase == "Ready" and bool(port)
        target = Target(
            namespace, name, self.host_ip or "127.0.0.1", int(port) if port else None, ready, self.uids.get(key)
        )
        conflicted = (namespace, name) in self.endpoints.conflicts
        if await self.endpoints.ensure(target):
            return self.endpoints.url(namespace, name), True
        if (namespace, name) not in self.endpoints.conflicts:
            return None, False  # the API failed (logged): try again
        if not conflicted and self.settings.events:
            note = f"a Service or EndpointSlice named for {name} exists and is not metal-agent's on {self.host}"
            self.events.emit(Event(namespace, name, "Warning", "EndpointConflict", "Register", note))
        return None, True

    # -- stop ------------------------------------------------------------------------------------------------
    async def _stopped(self, key: str, limiter: anyio.CapacityLimiter) -> None:
        desired = self.desired.get(key)
        status: dict[str, Any] = dict(desired.status) if desired else {"unit": key}
        status.update(
            phase="Pending",
            reason="AgentStopped",
            message=f"metal-agent on {self.host} stopped; the service resumes when it starts again",
            port=None,
            endpoint=None,
            actual=None,
        )
        self.desired[key] = _Desired(desired.unit if desired else None, status)
        async with limiter:
            if self.settings.endpoints:
                namespace, name = key.split("/", 1)
                await self.endpoints.remove(namespace, name)
            await self._sync(key)

    async def shutdown(self, timeout: float = 10.0) -> None:
        """The agent is stopping (its servers with it): endpoints removed, statuses say so, within ``timeout``."""
        limiter = anyio.CapacityLimiter(self.settings.concurrency)
        with anyio.move_on_after(timeout, shield=True):
            async with anyio.create_task_group() as tasks:
                for key in list(self.written):
                    tasks.start_soon(self._stopped, key, limiter)
        self.events.close()

    async def close(self, timeout: float = 10.0) -> None:
        """``shutdown()``, then release the API client."""
        await self.shutdown(timeout)
        with anyio.CancelScope(shield=True):
            await self.api_client.close()


def register_reporter(plugins: Plugins, api_client: Any, settings: ReporterSettings | None = None) -> KubeReporter:
    """Build the reporter and register its ``report`` hook; the caller runs ``reporter.run()`` beside the agent."""
    reporter = KubeReporter(api_client, settings or ReporterSettings())
    plugins.manager.register(reporter, name="kube-reporter")
    return reporter


def start_reporter(plugins: Plugins, configuration: Any, config: AgentConfig) -> KubeReporter:
    """``run --kube``: a reporter with its own API client (``close()`` releases it after ``shutdown()``)."""
    from kubernetes_asyncio.client import ApiClient

    return register_reporter(plugins, ApiClient(configuration), reporter_settings(config))
