"""Kubernetes Events about InferenceServices, sent in the background so that they can never hold up the agent.

``emit`` only puts the event on a bounded queue (a full queue drops the event and counts it); one task sends
them. A repeat of the same event (same object, type, reason, action and note) within the series window becomes
a ``series`` update of the first one (count and last time, events.k8s.io/v1), as client-go does, instead of a
new object each time. Only ``series`` is patched: an API server refuses changes to an Event's other fields.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio
import structlog
from kubernetes_asyncio.client import EventsV1Api

from agent.kube.calls import DEFAULT_RETRY, MERGE_PATCH, NotFound, Refused, Retry, call
from agent.sources.manifest import API_VERSION

log = structlog.get_logger("metal_agent.kube.events")
CONTROLLER = "llmkube.dev/metal-agent"
MAX_NOTE = 1024  # bytes, the API's limit
MAX_SERIES = 4096  # series remembered (least recently seen forgotten first)


def micro_time(at: datetime | None = None) -> str:
    """``metav1.MicroTime``: RFC 3339 with microseconds."""
    return (at or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _note(text: str) -> str:
    data = text.encode()
    return text if len(data) <= MAX_NOTE else data[: MAX_NOTE - 3].decode(errors="ignore") + "..."


@dataclass(frozen=True)
class Event:
    namespace: str
    name: str  # the InferenceService's
    type: str  # Normal or Warning
    reason: str
    action: str
    note: str

    @property
    def key(self) -> tuple[str, str, str, str, str, str]:
        """Identical events share a key (as in client-go): an API server lets a repeat change only ``series``."""
        return (self.namespace, self.name, self.type, self.reason, self.action, self.note)


@dataclass
class _Series:
    event_name: str
    count: int
    last_seen: float


class EventRecorder:
    def __init__(
        self,
        api_client: Any,
        instance: str,
        uid_of: Callable[[str, str], Awaitable[str | None]] | None = None,
        queue_size: int = 256,
        series_window: float = 600.0,
        retry: Retry = DEFAULT_RETRY,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self.api: Any = EventsV1Api(api_client)  # Any: the bundled stubs omit _content_type and dict bodies
        self.on_refused = on_refused or (lambda reason: None)
        self.instance, self.uid_of, self.series_window, self.retry = instance[:128], uid_of, series_window, retry
        self._send, self._receive = anyio.create_memory_object_stream[Event](queue_size)
        self.series: OrderedDict[tuple[str, ...], _Series] = OrderedDict()
        self.sent = self.aggregated = self.dropped = self.failed = 0
        self.queued = self.handled = 0  # every event put on the queue, and those whose delivery has ended

    def emit(self, event: Event) -> None:
        """Queue an event; never blocks and never raises (a full queue drops it)."""
        try:
            self._send.send_nowait(event)
            self.queued += 1
        except anyio.WouldBlock:
            self.dropped += 1
            if self.dropped & (self.dropped - 1) == 0:  # log the 1st, 2nd, 4th, 8th... drop, not every one
                log.warning("event queue full: events dropped", dropped=self.dropped, reason=event.reason)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            self.dropped += 1

    @property
    def pending(self) -> int:
        return self._receive.statistics().current_buffer_used

    @property
    def idle(self) -> bool:
        """Every queued event has been sent or has failed (none waits or is being sent)."""
        return self.handled == self.queued

    async def run(self) -> None:
        """Send queued events until cancelled."""
        async with self._receive:
            async for event in self._receive:
                try:
                    await self._deliver(event)
                except Exception:  # a bug here must not end event delivery, let alone the agent
                    self.failed += 1
                    log.exception("event not sent", reason=event.reason, object=f"{event.namespace}/{event.name}")
                finally:
                    self.handled += 1

    async def _deliver(self, event: Event) -> None:
        now = time.monotonic()
        series = self.series.get(event.key)
        if series is not None and now - series.last_seen <= self.series_window:
            series.count += 1
            series.last_seen = now
            self.series.move_to_end(event.key)
            repeat = {"series": {"count": series.count, "lastObservedTime": micro_time()}}
            try:
                done = await call(
                    f"patch event {event.namespace}/{series.event_name}",
                    lambda: self.api.patch_namespaced_event(
                        series.event_name, event.namespace, repeat, _content_type=MERGE_PATCH
                    ),
                    self.retry,
                )
            except NotFound:  # expired (events have a TTL) or deleted: start a new one
                done = None
            except Refused as exc:  # logged; a new event is still worth sending
                self.on_refused(exc.reason)
                done = None
            if done is not None:
                self.aggregated += 1
                return
        name = f"{event.name[:200]}.{time.time_ns():x}"
        regarding = {"apiVersion": API_VERSION, "kind": "InferenceService", "namespace": event.namespace}
        regarding["name"] = event.name
        if self.uid_of is not None and (uid := await self.uid_of(event.namespace, event.name)):
            regarding["uid"] = uid
        body = {
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": event.namespace},
            "eventTime": micro_time(),
            "reportingController": CONTROLLER,
            "reportingInstance": self.instance,
            "action": event.action,
            "reason": event.reason,
            "type": event.type,
            "note": _note(event.note),
            "regarding": regarding,
        }
        try:
            created = await call(
                f"create event {event.namespace}/{name}",
                lambda: self.api.create_namespaced_event(event.namespace, body),
                self.retry,
            )
        except NotFound:  # the namespace is gone
            created = None
        except Refused as exc:  # logged; an Event is never sent twice
            self.on_refused(exc.reason)
            created = None
        if created is None:
            self.failed += 1
            return
        self.sent += 1
        self.series[event.key] = _Series(name, 1, now)
        self.series.move_to_end(event.key)
        while len(self.series) > MAX_SERIES:
            self.series.popitem(last=False)

    def close(self) -> None:
        self._send.close()
