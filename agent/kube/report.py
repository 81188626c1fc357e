"""The Kubernetes reporter: the ``report`` hook that writes what the agent does back to the cluster.

``report`` itself only records the unit's latest status and queues an Event, so the pipeline never waits on the
API server. One worker per InferenceService (``agent.kube.reconcile``) then brings it up to date, latest status
wins, backing off on transient failures and not asking again after a permanent one until the status changes:

- the status by a merge patch on ``/status`` (a real API server rejects the client's default patch type for
  custom resources), holding only the difference from what is there: an identical status writes nothing;
- the Service and EndpointSlice of the unit (``agent.kube.endpoints``), removed when it stops or is deleted.
  A host without an address the cluster can reach (its route to the API server is loopback: kind, k3d, a
  tunnel) registers none and says so in an ``EndpointRegistered=False`` condition (``NoRoutableAddress``);
- during a delete held by finalizers (``deletionTimestamp`` set) one last status says ``Terminating``.

Text the cluster reads (conditions, Events) names the Service URL, never the server's loopback URL.
The agent's own status writes do not start another reconcile: a write to the status subresource never changes
``metadata.generation`` or the spec, and the unit's spec hash (``agent.sources.units``) covers the specs only.
"""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog
from kubernetes_asyncio.client import CustomObjectsApi

from agent.engine.pipeline import AgentConfig
from agent.engine.plugin_manager import Plugins
from agent.hookspecs import hookimpl
from agent.kube.calls import DEFAULT_RETRY, MERGE_PATCH, NotFound, Refused, Retry, call
from agent.kube.endpoints import Endpoints
from agent.kube.events import Event, EventRecorder
from agent.kube.model_status import ModelFacts
from agent.kube.reconcile import Outcome, Reconciler
from agent.kube.registration import Registration
from agent.kube.status import SCHEDULING_REASONS, TERMINATING, build_status, managed, merge_patch, strip_nulls
from agent.sources.manifest import GROUP, VERSION
from agent.sources.units import ServingUnit
from agent.util.kube_names import label_value

log = structlog.get_logger("metal_agent.kube.report")
PLURAL = "inferenceservices"
DELETED = "Deleted"  # the phase the pipeline reports when the InferenceService is gone (or being deleted)
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
    proxy_port: int | None = None  # the agent's cluster-facing /v1 port, where on-demand units' slices point
    events: bool = True
    event_queue: int = 1024  # a burst (every unit at start) fits; beyond it Events are dropped and counted
    concurrency: int = 8  # objects written at once
    retry: Retry = DEFAULT_RETRY  # quick retries within one write
    retry_after: float = 1.0  # the first backoff of an object's worker after a transient failure; it doubles
    retry_cap: float = 60.0  # up to this


def reporter_settings(config: AgentConfig) -> ReporterSettings:
    """The reporter's settings from the agent's configuration (``metal-agent run`` flags)."""
    return ReporterSettings(
        host_name=config.agent_name or default_host_name(),
        host_ip=config.advertise_address,
        endpoints=config.register_endpoints,
        service_port=config.service_port,
        proxy_port=config.proxy_port if config.register_endpoints else None,
    )


@dataclass
class _Desired:
    unit: ServingUnit | None
    status: dict[str, Any]


class KubeReporter:
    """Register with ``register_reporter``; run ``run()`` in a task group; ``shutdown()`` before exit."""

    def __init__(
        self, api_client: Any, settings: ReporterSettings, on_refused: Callable[[str], None] | None = None
    ) -> None:
        self.settings, self.api_client = settings, api_client
        self.host = label_value(settings.host_name)
        # Any: the bundled stubs omit the generated methods' keyword arguments (_content_type).
        self.custom: Any = CustomObjectsApi(api_client)
        self._api_url: str = getattr(getattr(api_client, "configuration", None), "host", "") or ""
        self.refusals: Counter[str] = Counter()  # permanent failures by the API's reason
        self._on_refused = on_refused
        self.endpoints = Endpoints(api_client, self.host, settings.service_port, settings.retry, self._refused)
        self.events = EventRecorder(
            api_client, f"metal-agent-{self.host}", self._uid, settings.event_queue, retry=settings.retry,
            on_refused=self._refused,
        )  # fmt: skip
        self.registration = Registration(
            self.endpoints, self.events, self.host, settings.host_ip, settings.endpoints, settings.events,
            settings.proxy_port,
        )  # fmt: skip
        self.reconciler = Reconciler(
            self._sync, concurrency=settings.concurrency, backoff_base=settings.retry_after,
            backoff_cap=settings.retry_cap,
        )  # fmt: skip
        self.desired: dict[str, _Desired] = {}
        self.written: dict[str, dict[str, Any]] = {}  # the status on the server, as far as this agent knows
        self.uids: dict[str, str] = {}
        self.models = ModelFacts(self.custom, settings.retry, self._refused)
        self.last_event: dict[str, tuple[str, str, str]] = {}
        self.status_writes = 0

    def _refused(self, reason: str) -> None:
        self.refusals[reason] += 1
        if self._on_refused is not None:
            self._on_refused(reason)

    # -- the hook --------------------------------------------------------------------------------------------
    @hookimpl
    def report(self, unit: ServingUnit | None, status: dict[str, Any]) -> None:
        key = str(status.get("unit") or "")
        if "/" not in key:
            return
        self.desired[key] = _Desired(unit, dict(status))
        self.reconciler.request(key)
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
        note = self.registration.cluster_text(key, status)
        self.events.emit(Event(namespace, name, "Warning" if warning else "Normal", why, action, note))

    async def _uid(self, namespace: str, name: str) -> str | None:
        """The InferenceService's uid (for Events' ``regarding``), read once if the status writer has not yet."""
        key = f"{namespace}/{name}"
        if key not in self.uids:
            try:
                obj = await self._get(key, namespace, name)
            except (NotFound, Refused):
                return None
            if isinstance(obj, dict) and (uid := (obj.get("metadata") or {}).get("uid")):
                self.uids[key] = uid
        return self.uids.get(key)

    async def _get(self, key: str, namespace: str, name: str) -> Any:
        """The InferenceService as the API has it; None when it could not be read. Raises NotFound, Refused."""
        return await call(
            f"get {key}",
            lambda: self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name),
            self.settings.retry,
        )

    # -- the background writer ------------------------------------------------------------------------------
    async def run(self) -> None:
        """Write statuses and endpoints, and send Events, until cancelled."""
        await self.registration.resolve_address(self._api_url)
        async with anyio.create_task_group() as tasks:
            if self.settings.events:
                tasks.start_soon(self.events.run)
            await self.reconciler.run(tasks)

    def stats(self) -> dict[str, Any]:
        """For the agent's /status: what was written, what waits, what failed."""
        events = self.events
        return {
            "host": self.host,
            "address": self.registration.host_ip,
            "endpoints": self.registration.mode,
            "proxy_port": self.settings.proxy_port,  # where on-demand units' EndpointSlices point
            "status_writes": self.status_writes,
            "pending": self.reconciler.busy,
            "backing_off": self.reconciler.backing_off,
            "refused": dict(self.refusals),
            "events": {
                "sent": events.sent,
                "aggregated": events.aggregated,
                "dropped": events.dropped,
                "failed": events.failed,
                "queued": events.pending,
            },
            "endpoint_conflicts": sorted(f"{ns}/{name}" for ns, name in self.endpoints.conflicts),
        }  # fmt: skip

    async def wait_idle(self) -> None:
        """Until every reported status is written, refused for good, or failed and waiting to be tried again."""
        await self.reconciler.wait_idle()

    def _forget(self, key: str, processed: _Desired) -> None:
        """The object is gone. A status reported for it since (a new object of that name) is kept."""
        if self.desired.get(key) is processed:
            del self.desired[key]
        for table in (self.written, self.uids, self.last_event):
            table.pop(key, None)
        self.registration.forget(key)

    async def _sync(self, key: str) -> Outcome:
        """Bring one InferenceService's status and endpoints up to date."""
        desired = self.desired.get(key)
        if desired is None:
            return Outcome.GONE
        namespace, name = key.split("/", 1)
        if desired.status.get("phase") == DELETED:
            return await self._deleted(key, desired)
        if key not in self.written:
            try:
                found = await self._read(key, namespace, name)
            except Refused as exc:  # e.g. 403: asking again cannot help until something changes
                self._refused(exc.reason)
                return Outcome.REFUSED
            if found is None:  # gone: nothing to write
                self._forget(key, desired)
                return Outcome.GONE
            if not found:
                return Outcome.RETRY
        endpoint, registration, condition = await self.registration.sync(key, desired.status, self.uids.get(key))
        if desired.unit is not None:
            await self.models.write(desired.unit)
        unit = desired.unit
        port = self.registration.endpoint_port(desired.status)
        new = strip_nulls(
            build_status(
                {**desired.status, "message": self.registration.cluster_text(key, desired.status)},
                self.written[key],
                generation=unit.service.generation if unit else None,
                suspended=bool(unit and unit.service.suspend),
                host=self.host,
                endpoint=endpoint,
                host_endpoint=self.registration.host_url(port) if port else None,
                endpoint_condition=condition,
                through_proxy=self.registration.through_proxy(desired.status),
            )
        )
        written = await self._patch_status(key, desired, new)
        if written is Outcome.GONE:
            return written
        for outcome in (Outcome.RETRY, Outcome.REFUSED):  # a transient failure anywhere is tried again
            if outcome in (written, registration):
                return outcome
        return Outcome.DONE

    async def _patch_status(self, key: str, desired: _Desired, new: dict[str, Any]) -> Outcome:
        patch = merge_patch(self.written[key], new)
        if not patch:
            return Outcome.DONE
        namespace, name = key.split("/", 1)
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
            return Outcome.GONE
        except Refused as exc:
            self._refused(exc.reason)
            return Outcome.REFUSED
        if result is None:
            return Outcome.RETRY
        self.written[key] = new
        self.status_writes += 1
        return Outcome.DONE

    async def _read(self, key: str, namespace: str, name: str) -> bool | None:
        """The object's current status (to diff against) and uid (for owner references and Events).

        None when it does not exist, False when it could not be read. Raises Refused.
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

    async def _deleted(self, key: str, desired: _Desired) -> Outcome:
        """The unit is gone. An object still there with ``deletionTimestamp`` (finalizers hold it) gets one last
        status that says so (no replica, no endpoint); then nothing more is written for it."""
        namespace, name = key.split("/", 1)
        if self.settings.endpoints:
            await self.endpoints.remove(namespace, name)
        try:
            obj = await self._get(key, namespace, name)
        except NotFound:
            obj = {}
        except Refused as exc:  # unreadable for good: nothing more can be said about it
            self._refused(exc.reason)
            obj = {}
        if obj is None:
            return Outcome.RETRY
        meta = obj.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            self.written.setdefault(key, managed(obj.get("status") or {}))
            held = ", ".join(meta.get("finalizers") or [])
            message = f"the InferenceService is being deleted; its server on {self.host} is stopped" + (
                f" (waiting for finalizers: {held})" if held else ""
            )
            status = {**desired.status, "phase": TERMINATING, "reason": TERMINATING, "message": message, "port": None,
                      "actual": None}  # fmt: skip
            new = strip_nulls(
                build_status(
                    status, self.written[key], generation=meta.get("generation"), suspended=False, host=self.host,
                    endpoint=None, host_endpoint=None,
                )
            )  # fmt: skip
            if await self._patch_status(key, desired, new) is Outcome.RETRY:
                return Outcome.RETRY
        self._forget(key, desired)
        return Outcome.GONE

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


def register_reporter(
    plugins: Plugins,
    api_client: Any,
    settings: ReporterSettings | None = None,
    on_refused: Callable[[str], None] | None = None,
) -> KubeReporter:
    """Build the reporter and register its ``report`` hook; the caller runs ``reporter.run()`` beside the agent."""
    reporter = KubeReporter(api_client, settings or ReporterSettings(), on_refused)
    plugins.manager.register(reporter, name="kube-reporter")
    return reporter


def start_reporter(
    plugins: Plugins, configuration: Any, config: AgentConfig, on_refused: Callable[[str], None] | None = None
) -> KubeReporter:
    """``run --kube``: a reporter with its own API client (``close()`` releases it after ``shutdown()``);
    ``on_refused`` counts the API's permanent refusals by reason (the agent's metric)."""
    from kubernetes_asyncio.client import ApiClient

    return register_reporter(plugins, ApiClient(configuration), reporter_settings(config), on_refused)
