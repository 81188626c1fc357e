"""A fake Kubernetes API server for tests: kmock serves the HTTP, the real kubernetes-asyncio client talks to it.

kmock (0.8) is the HTTP server, request parser and Status-error renderer (`kmock.KubernetesScaffold`); its own
stateful `KubernetesEmulator` lacks what a watch client depends on, so this handler serves the resources itself
(overriding `_handle`, as kmock's emulator does) and fills these gaps:

- `?watch=True`: kubernetes-asyncio sends Python's spelling; kmock only recognises `watch=true` (here: any case,
  and `1`);
- create answers **201 Created** (kmock: 200), and 409 AlreadyExists for a name in use;
- **resourceVersion**: one global monotonic counter, set on every object and on lists' `metadata`
  (kmock: the literal `'...'`); a no-op write does not bump it; `uid`, `creationTimestamp` and `generation`
  (bumped when anything but metadata and status changes, never by a status write) are set as a real server does;
- **watch from a resourceVersion** replays the retained history after it (kmock replays every object as
  ADDED on every watch); without one (or with `0`) it sends the current objects as ADDED, then live changes;
- **410 Gone**: a watch from a resourceVersion older than the retained history gets an `ERROR` event carrying a
  Status with code 410 (reason `Expired`), as a real API server sends it; the history is bounded
  (`history_limit`) and `compact()` forgets it at once; `gone_next_watch(mode="event"|"http")` forces it
  (`http`: an HTTP 410 answer); `restart()` plays an API server restart after a compaction (watches dropped,
  429 `storage is (re)initializing` for a few requests, then 410 for an old resourceVersion);
- **allowWatchBookmarks** → `BOOKMARK` events (every `bookmark_interval` seconds, before a `timeoutSeconds`
  end, and on `send_bookmarks()`), whose resourceVersion never skips an undelivered event;
- **timeoutSeconds** ends the stream cleanly;
- **labelSelector** (`=`, `==`, `!=`, `in`, `notin`, `key`, `!key`) and `fieldSelector` (`metadata.name`,
  `metadata.namespace`) on list and watch; a watched object that stops matching is sent as DELETED, one that
  starts matching as ADDED (as the real watch cache does);
- the **status subresource** (`.../status`): only `status` changes there, and the main endpoint ignores `status`
  (for custom resources and Services); PATCH accepts `application/merge-patch+json` and JSON-patch lists; a
  `application/json-patch+json` body that is not a list answers **400 BadRequest** "json: cannot unmarshal
  object into Go value of type jsonpatch.Patch" (what current API servers answer; very old ones answered 500),
  and strategic-merge-patch on a custom resource answers **415 UnsupportedMediaType**, both as a real server;
- PUT of a custom resource without `metadata.resourceVersion` is 422 (custom resources allow no unconditional
  update) and a stale one is 409 Conflict;
- **every request is recorded** (`requests`: method, path, query, content type, parsed body, verb, status);
- **faults**: `fail_next(n, status=500)` answers the next n requests with a Status error, `disconnect_watches()`
  aborts every open watch connection mid-stream (the client sees a broken payload, not a clean end).

- **admission as strict as a real server** (`kubeapi_rules.py`, from kube-apiserver v1.36.2's measured answers):
  CRD defaults, pruning and schema + CEL validation of custom resources, Service defaults, routable EndpointSlice
  addresses, Event required fields / time format / note length / series count / immutability, 404 for a
  namespace that does not exist (`create_namespace`; `apply` creates it), uid and resourceVersion preconditions
  on delete, and finalizers: a delete of an object with finalizers only sets `deletionTimestamp`, and removing the
  last finalizer (`remove_finalizers`) completes it; an injected 429 says `storage is (re)initializing`;
  `Accept: ...;as=Table` answers a Table of the CRD's printer columns.

Not emulated (not needed by the agent): list pagination (`limit` is ignored), server-side apply (415),
authentication.

Layout: `kubeapi_store.py` (objects, resourceVersions, history, selectors, patches), `kubeapi_handler.py` (the
kmock handler: HTTP verbs, watch streams, faults, request log) and this module (the `KubeAPI` fixture object).

The server runs on its own event loop in a thread, so synchronous tests (which drive an agent subprocess) and
async tests (which use the client in their own loop) can use it alike; the helpers are thread-safe.
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kmock
import yaml
from kubeapi_handler import CLOSE, DROP, Failure, FakeKubeHandler, RecordedRequest
from kubeapi_store import BY_KIND, JSON, RESOURCES, Resource, Store

__all__ = ["KubeAPI", "RecordedRequest"]


@dataclass
class KubeAPI:
    """The fixture object: the fake API server running in a thread, with thread-safe helpers for tests."""

    history_limit: int = 10_000
    bookmark_interval: float = 5.0
    store: Store = field(init=False)
    handler: FakeKubeHandler = field(init=False)
    url: str = field(init=False, default="")
    _thread: threading.Thread | None = field(init=False, default=None)
    _stop: asyncio.Event | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.store = Store(history_limit=self.history_limit)
        self.handler = FakeKubeHandler(self.store, self.bookmark_interval)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> KubeAPI:
        ready = threading.Event()
        failure: list[BaseException] = []

        async def serve() -> None:
            self._stop = asyncio.Event()
            self.handler.loop = asyncio.get_running_loop()
            try:
                async with self.handler, kmock.Server(self.handler) as server:
                    self.url = str(server.url).rstrip("/")
                    ready.set()
                    await self._stop.wait()
                    self.handler.post_all(CLOSE)
                    await asyncio.sleep(0)  # let the watch streams see CLOSE and end cleanly
            except BaseException as error:  # reported to start() instead of dying silently in the thread
                failure.append(error)
                ready.set()

        self._thread = threading.Thread(target=asyncio.run, args=(serve(),), name="fake-kube-api", daemon=True)
        self._thread.start()
        ready.wait(timeout=30)
        if failure or not self.url:
            raise RuntimeError(f"the fake Kubernetes API did not start: {failure}")
        return self

    def stop(self) -> None:
        if self._thread is not None and self._stop is not None and self.handler.loop is not None:
            self.handler.loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout=30)
            self._thread = None

    def __enter__(self) -> KubeAPI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ client configuration

    def configuration(self) -> Any:
        """A kubernetes_asyncio Configuration pointing at this server."""
        from kubernetes_asyncio.client import Configuration

        config = Configuration(host=self.url)
        config.api_key = {"authorization": "Bearer fake-token"}
        return config

    def write_kubeconfig(self, path: Path, *, context: str = "fake", namespace: str = "default") -> Path:
        """A kubeconfig file whose context `context` points at this server (for agent subprocesses)."""
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": context,
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "fake-token"}}],
            "contexts": [{"name": context, "context": {"cluster": "fake", "user": "fake", "namespace": namespace}}],
        }  # fmt: skip
        path.write_text(yaml.safe_dump(config))
        return path

    # ------------------------------------------------------------ objects

    def apply(self, obj: JSON, *, admit: bool = True) -> JSON:
        """Create or replace like `kubectl apply`: spec, labels and annotations as given; status if given.

        The namespace is created if needed (a test's setup). ``admit=False`` plants an object the server's
        admission would refuse now, as one stored before its CRD was tightened."""
        resource = _resolve(obj.get("kind", ""), obj.get("apiVersion"))
        meta = obj.get("metadata") or {}
        namespace = meta.get("namespace", "default") if resource.namespaced else ""
        with self.store.lock:
            if namespace:
                self.store.namespaces.add(namespace)
            self.store.admission, admission = admit, self.store.admission
            try:
                return self._apply(resource, namespace, obj, meta)
            finally:
                self.store.admission = admission

    def _apply(self, resource: Resource, namespace: str, obj: JSON, meta: JSON) -> JSON:
        with self.store.lock:
            if (resource, namespace, meta["name"]) not in self.store.objects:
                result = self.store.create(resource, namespace, {k: v for k, v in obj.items() if k != "status"})
            else:

                def replace(current: JSON) -> JSON:
                    body = {k: copy.deepcopy(v) for k, v in obj.items() if k != "status"}
                    body["metadata"] = {**current["metadata"], **meta}
                    body["metadata"].pop("resourceVersion", None)
                    return body

                result = self.store.update(resource, namespace, meta["name"], replace)
            if "status" in obj:
                result = self.store.update(resource, namespace, meta["name"], lambda c: {**c, "status": obj["status"]},
                                           status=True)  # fmt: skip
        return result

    def get(self, kind: str, name: str, namespace: str = "default", api_version: str | None = None) -> JSON | None:
        resource = _resolve(kind, api_version)
        with self.store.lock:
            obj = self.store.objects.get((resource, namespace if resource.namespaced else "", name))
            return copy.deepcopy(obj) if obj is not None else None

    def list(self, kind: str, namespace: str | None = None, api_version: str | None = None) -> list[JSON]:
        return self.store.list(_resolve(kind, api_version), namespace, None)[0]

    def delete(self, kind: str, name: str, namespace: str = "default", api_version: str | None = None) -> JSON:
        """As `kubectl delete`: an object with finalizers only gets its deletionTimestamp."""
        resource = _resolve(kind, api_version)
        return self.store.delete(resource, namespace if resource.namespaced else "", name)

    def remove_finalizers(self, kind: str, name: str, namespace: str = "default") -> JSON:
        """What the finalizers' controller does at the end: a held delete then completes."""
        resource = _resolve(kind)

        def without(current: JSON) -> JSON:
            current["metadata"].pop("finalizers", None)
            return current

        return self.store.update(resource, namespace if resource.namespaced else "", name, without)

    def create_namespace(self, name: str) -> None:
        with self.store.lock:
            self.store.namespaces.add(name)

    def delete_namespace(self, name: str) -> None:
        """Forget a namespace (its objects stay, as during a namespace's termination): creates in it answer 404."""
        with self.store.lock:
            self.store.namespaces.discard(name)

    @property
    def resource_version(self) -> int:
        return self.store.rv

    # ------------------------------------------------------------ requests and faults

    @property
    def requests(self) -> list[RecordedRequest]:
        return list(self.handler.recorded)

    def clear_requests(self) -> None:
        """Forget the request log (a test's setup is not what it counts)."""
        with self.store.lock:
            self.handler.recorded.clear()

    def requests_where(self, **fields: Any) -> list[RecordedRequest]:
        return [r for r in self.requests if all(getattr(r, k) == v for k, v in fields.items())]

    def fail_next(self, n: int = 1, status: int = 500, when: Callable[[RecordedRequest], bool] | None = None) -> None:
        """The next n requests (matching `when`, default: every resource request) answer `status`."""
        with self.store.lock:
            self.handler.failures.append(Failure(n, status, when or (lambda r: r.verb is not None)))

    def clear_faults(self) -> None:
        """Forget pending injected failures and forced 410s."""
        with self.store.lock:
            self.handler.failures.clear()
            self.handler.gone_next.clear()

    def disconnect_watches(self) -> int:
        """Abort every open watch connection mid-stream; returns how many there were."""
        return self.handler.post_all(DROP)

    def end_watches(self) -> int:
        """End every open watch stream cleanly, as a server-side timeout does."""
        return self.handler.post_all(CLOSE)

    def gone_next_watch(self, n: int = 1, mode: str = "event", resource: str | None = None) -> None:
        """The next n watches (of `resource`, a plural, or of any) answer 410 Gone: an ERROR event with a Status of
        code 410 in a 200 stream, as a real API server sends it (`event`), or an HTTP 410 (`http`)."""
        assert mode in ("event", "http")
        with self.store.lock:
            self.handler.gone_next.extend([(mode, resource)] * n)

    def compact(self) -> None:
        """Forget the event history: a watch from any resourceVersion older than the current one gets 410 Gone."""
        self.store.compact()

    def restart(self, unavailable: int = 3) -> None:
        """What a kube-apiserver restart after an etcd compaction looks like to clients: open watches drop, the
        next `unavailable` requests answer 429 `storage is (re)initializing`, and a watch resumed from an old
        resourceVersion gets 410 Expired."""
        self.compact()
        self.fail_next(unavailable, status=429)
        with self.store.lock:
            watched = [watch.resource.plural for watch in self.handler.watches]
        for plural in watched:  # each watch resumes from a resourceVersion now compacted
            self.gone_next_watch(1, resource=plural)
        self.disconnect_watches()

    def send_bookmarks(self) -> int:
        return self.handler.post_all("bookmark")

    @property
    def open_watches(self) -> int:
        with self.store.lock:
            return len(self.handler.watches)

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not met within {timeout} s")
            time.sleep(0.02)  # polling interval of the condition, not a wait for an outcome


def _resolve(kind: str, api_version: str | None = None) -> Resource:
    """A resource by kind (`Model`), plural (`models`) or `apiVersion` + kind; Event alone means core v1."""
    if api_version is not None and (api_version, kind) in BY_KIND:
        return BY_KIND[(api_version, kind)]
    for resource in RESOURCES:
        if kind in (resource.kind, resource.plural) and (api_version in (None, resource.api_version)):
            return resource
    raise KeyError(f"the fake API does not serve {api_version or ''} {kind}")
