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
  (`http`: an HTTP 410 answer);
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

Not emulated (not needed by the agent): finalizers and deletionTimestamp, list pagination (`limit` is ignored),
server-side apply (415), admission/validation of schemas, authentication.

The server runs on its own event loop in a thread, so synchronous tests (which drive an agent subprocess) and
async tests (which use the client in their own loop) can use it alike; the helpers are thread-safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp.web
import kmock
import yaml
from kmock import Request, Response
from kubeapi_store import (
    BY_KIND,
    BY_PATH,
    JSON,
    RESOURCES,
    ApiError,
    Change,
    Filter,
    Resource,
    Store,
    json_patch,
    labels_of,
    merge_patch,
    parse_label_selector,
)

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
STRATEGIC_PATCH = "application/strategic-merge-patch+json"


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    content_type: str | None
    body: Any
    verb: str | None  # get, list, watch, create, update, patch, delete (None for non-resource paths)
    resource: str | None  # the plural
    namespace: str | None
    name: str | None
    subresource: str | None
    status: int | None = None  # the HTTP status answered (200 for a watch stream that started)


@dataclass
class _Watch:
    resource: Resource
    namespace: str | None
    accepts: Filter
    queue: asyncio.Queue[Change | str | int]
    seen_rv: int
    transport: asyncio.BaseTransport | None


@dataclass
class _Failure:
    remaining: int
    status: int
    when: Callable[[RecordedRequest], bool]


CLOSE, DROP = "close", "drop"


class FakeKubeHandler(kmock.KubernetesScaffold):  # type: ignore[misc]
    """kmock's Kubernetes scaffold (discovery, Status errors, HTTP) plus the stateful resources above."""

    def __init__(self, store: Store, bookmark_interval: float) -> None:
        super().__init__()
        self.store = store
        self.bookmark_interval = bookmark_interval
        self.recorded: list[RecordedRequest] = []
        self.watches: list[_Watch] = []
        self.failures: list[_Failure] = []
        self.gone_next: list[str] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        store.listeners.append(self._on_change)

    def _on_change(self, change: Change) -> None:  # called under the store lock, from any thread
        for watch in self.watches:
            self._post(watch, change)

    def _post(self, watch: _Watch, item: Change | str | int) -> None:
        assert self.loop is not None
        self.loop.call_soon_threadsafe(watch.queue.put_nowait, item)

    async def _handle(self, request: Request) -> aiohttp.web.StreamResponse:
        params = dict(request.params)
        verb = _verb(request, params)
        record = RecordedRequest(
            method=str(request.method.value).upper(), path=request.url.path, query=params,
            content_type=(request.headers.get("Content-Type") or "").split(";")[0].strip() or None,
            body=request.data, verb=verb, resource=request.resource.plural if request.resource else None,
            namespace=request.namespace, name=request.name, subresource=request.subresource,
        )  # fmt: skip
        self.recorded.append(record)
        resource = _resource(request)
        try:
            self._inject_faults(record, params)
            if resource is None or verb is None:
                response = await super()._handle(request)
                record.status = response.status
                return response
            payload, status = self._serve(request, record, resource, verb, params)
            if verb == "watch" and status == 200:
                record.status = 200
                response = await Response(status=200, headers={"Content-Type": "application/json"}, payload=payload)(
                    request
                )
                return response
        except ApiError as error:
            payload, status = error.status(), error.code
        record.status = status
        result: aiohttp.web.StreamResponse = await Response(status=status, payload=payload)(request)
        return result

    def _inject_faults(self, record: RecordedRequest, params: dict[str, str]) -> None:
        with self.store.lock:  # the test thread arms faults while the server thread consumes them
            for failure in self.failures:
                if failure.when(record):
                    failure.remaining -= 1
                    self.failures[:] = [f for f in self.failures if f.remaining > 0]
                    raise ApiError(failure.status, "InternalError", f"injected failure (HTTP {failure.status})")
            if record.verb == "watch" and self.gone_next and self.gone_next[0] == "http":
                self.gone_next.pop(0)
                raise ApiError(410, "Expired", f"too old resource version: {params.get('resourceVersion')}")

    def _serve(
        self, request: Request, record: RecordedRequest, resource: Resource, verb: str, params: dict[str, str]
    ) -> tuple[Any, int]:
        namespace = request.namespace or ""
        name, sub = request.name, request.subresource
        if sub not in (None, "status") or (sub == "status" and not resource.status_subresource):
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({sub})")
        if verb == "list":
            items, rv = self.store.list(resource, request.namespace, _filter(params, name))
            return {"apiVersion": resource.api_version, "kind": f"{resource.kind}List",
                    "metadata": {"resourceVersion": str(rv)}, "items": items}, 200  # fmt: skip
        if verb == "watch":
            return self._watch(request, resource, params), 200
        if verb == "create":
            if not isinstance(request.data, dict):
                raise ApiError(400, "BadRequest", "the body of the request is not a JSON object")
            return self.store.create(resource, namespace, request.data), 201
        assert name is not None
        if verb == "get":
            return self.store.get(resource, namespace, name), 200
        if verb == "delete":
            return self.store.delete(resource, namespace, name), 200
        body = request.data
        if body is None:
            raise ApiError(400, "BadRequest", "the body of the request was not valid JSON")
        if verb == "update":
            if not isinstance(body, dict) or (body.get("metadata") or {}).get("name") != name:
                raise ApiError(400, "BadRequest", "the name of the object does not match the name on the URL")
            if resource.custom and not (body.get("metadata") or {}).get("resourceVersion"):
                raise ApiError(422, "Invalid", f'{resource.kind} "{name}" is invalid: metadata.resourceVersion: '
                                               "Invalid value: 0x0: must be specified for an update")  # fmt: skip
            return self.store.update(resource, namespace, name, lambda _: body, status=sub == "status"), 200
        change = _patcher(resource, record.content_type, body)
        return self.store.update(resource, namespace, name, change, status=sub == "status"), 200

    async def _watch(self, request: Request, resource: Resource, params: dict[str, str]) -> AsyncIterator[Any]:
        yield b""  # the headers go out at once, as on a real server, even when nothing happens
        raw = getattr(request, "_raw_request", None)
        accepts = _filter(params, request.name) or (lambda _: True)
        bookmarks = params.get("allowWatchBookmarks", "").lower() in ("true", "1")
        timeout = float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else None
        deadline = time.monotonic() + timeout if timeout is not None else None
        rv_param = params.get("resourceVersion") or "0"
        watch = _Watch(resource, request.namespace, accepts, asyncio.Queue(), 0, raw.transport if raw else None)
        with self.store.lock:
            try:
                if self.gone_next:
                    self.gone_next.pop(0)
                    raise ApiError(410, "Expired", f"too old resource version: {rv_param} ({self.store.rv})")
                if rv_param == "0":
                    current, _ = self.store.list(resource, request.namespace, accepts)
                    initial = [{"type": "ADDED", "object": obj} for obj in current]
                else:
                    initial = [e for c in self.store.since(int(rv_param)) if (e := self._event(watch, c))]
            except ApiError as error:
                yield {"type": "ERROR", "object": error.status()}
                return
            watch.seen_rv = self.store.rv
            self.watches.append(watch)
        try:
            for event in initial:
                yield event
            next_bookmark = time.monotonic() + self.bookmark_interval
            while True:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    break
                if bookmarks and now >= next_bookmark:
                    yield self._bookmark(watch)
                    next_bookmark = now + self.bookmark_interval
                wait = min(next_bookmark - now if bookmarks else 1.0, 1.0, (deadline or now + 1) - now)
                try:
                    item = await asyncio.wait_for(watch.queue.get(), timeout=max(wait, 0.001))
                except TimeoutError:
                    if watch.transport is not None and watch.transport.is_closing():
                        return  # the client went away
                    continue
                if item == DROP:
                    if watch.transport is not None:
                        watch.transport.abort()
                    return
                if item == CLOSE:
                    break
                if isinstance(item, int):
                    if bookmarks:
                        yield self._bookmark(watch)
                    continue
                assert isinstance(item, Change)
                watch.seen_rv = max(watch.seen_rv, item.rv)
                if event := self._event(watch, item):
                    yield event
            if bookmarks:
                yield self._bookmark(watch)
        finally:
            with self.store.lock, contextlib.suppress(ValueError):
                self.watches.remove(watch)

    def _event(self, watch: _Watch, change: Change) -> JSON | None:
        """The event this watch sees for a change: a selector transition turns MODIFIED into ADDED or DELETED."""
        if change.resource != watch.resource:
            return None
        if watch.namespace is not None and change.obj["metadata"].get("namespace") != watch.namespace:
            return None
        now_in = change.type != "DELETED" and watch.accepts(change.obj)
        was_in = change.previous is not None and watch.accepts(change.previous)
        if change.type == "DELETED":
            return {"type": "DELETED", "object": change.obj} if was_in else None
        if now_in:
            return {"type": "MODIFIED" if was_in else "ADDED", "object": change.obj}
        return {"type": "DELETED", "object": change.obj} if was_in else None

    def _bookmark(self, watch: _Watch) -> JSON:
        meta = {"resourceVersion": str(watch.seen_rv)}
        return {"type": "BOOKMARK", "object": {"kind": watch.resource.kind,
                                               "apiVersion": watch.resource.api_version, "metadata": meta}}  # fmt: skip

    def post_all(self, item: str | int) -> int:
        with self.store.lock:
            for watch in self.watches:
                self._post(watch, item if item != "bookmark" else self.store.rv)
            return len(self.watches)


def _verb(request: Request, params: dict[str, str]) -> str | None:
    if request.resource is None or request.resource.plural is None:
        return None
    method = str(request.method.value).upper()
    if method == "GET":
        if params.get("watch", "").lower() in ("true", "1"):
            return "watch"
        return "get" if request.name else "list"
    if method == "POST" and not request.name:
        return "create"
    if request.name:
        return {"PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method)
    return None


def _resource(request: Request) -> Resource | None:
    res = request.resource
    if res is None:
        return None
    return BY_PATH.get((res.group, res.version, res.plural))


def _filter(params: dict[str, str], name: str | None) -> Filter | None:
    checks: list[Filter] = []
    if params.get("labelSelector"):
        selector = parse_label_selector(params["labelSelector"])
        checks.append(lambda obj: selector(labels_of(obj)))
    for requirement in filter(None, (params.get("fieldSelector") or "").split(",")):
        match = re.fullmatch(r"metadata\.(name|namespace)\s*(==|!=|=)\s*(.*)", requirement.strip())
        if match is None:
            raise ApiError(400, "BadRequest", f'field label not supported: "{requirement}"')
        attr, negate, value = match[1], match[2] == "!=", match[3]
        checks.append(lambda obj, a=attr, v=value, n=negate: (obj["metadata"].get(a) == v) != n)
    if name:
        checks.append(lambda obj: obj["metadata"]["name"] == name)
    return (lambda obj: all(check(obj) for check in checks)) if checks else None


def _patcher(resource: Resource, content_type: str | None, body: Any) -> Callable[[JSON], JSON]:
    if content_type == MERGE_PATCH or (content_type == STRATEGIC_PATCH and not resource.custom):
        return lambda current: merge_patch(current, body)
    if content_type == JSON_PATCH:
        json_patch({}, body) if not isinstance(body, list) else None  # a non-list body is a 400 before anything
        return lambda current: json_patch(current, body)
    accepted = [JSON_PATCH, MERGE_PATCH, "application/apply-patch+yaml"]
    if not resource.custom:
        accepted.insert(2, STRATEGIC_PATCH)
    raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - accepted "
                                                f"media types include: {', '.join(accepted)}")  # fmt: skip


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

    def apply(self, obj: JSON) -> JSON:
        """Create or replace like `kubectl apply`: spec, labels and annotations as given; status if given."""
        resource = _resolve(obj.get("kind", ""), obj.get("apiVersion"))
        meta = obj.get("metadata") or {}
        namespace = meta.get("namespace", "default") if resource.namespaced else ""
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
        resource = _resolve(kind, api_version)
        return self.store.delete(resource, namespace if resource.namespaced else "", name)

    @property
    def resource_version(self) -> int:
        return self.store.rv

    # ------------------------------------------------------------ requests and faults

    @property
    def requests(self) -> list[RecordedRequest]:
        return list(self.handler.recorded)

    def requests_where(self, **fields: Any) -> list[RecordedRequest]:
        return [r for r in self.requests if all(getattr(r, k) == v for k, v in fields.items())]

    def fail_next(self, n: int = 1, status: int = 500, when: Callable[[RecordedRequest], bool] | None = None) -> None:
        """The next n requests (matching `when`, default: every resource request) answer `status`."""
        with self.store.lock:
            self.handler.failures.append(_Failure(n, status, when or (lambda r: r.verb is not None)))

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

    def gone_next_watch(self, n: int = 1, mode: str = "event") -> None:
        """The next n watches answer 410 Gone: an ERROR event with a Status of code 410 in a 200 stream, as a real
        API server sends it (`event`), or an HTTP 410 (`http`)."""
        assert mode in ("event", "http")
        with self.store.lock:
            self.handler.gone_next.extend([mode] * n)

    def compact(self) -> None:
        """Forget the event history: a watch from any resourceVersion older than the current one gets 410 Gone."""
        self.store.compact()

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
