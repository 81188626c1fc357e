"""The fake Kubernetes API's HTTP side on kmock: routing, verbs, watch streams, faults and the request log.

See tests/kubeapi.py for what it adds to kmock and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp.web
import kmock
from kmock import Request, Response
from kubeapi_rules import table, wants_table
from kubeapi_store import (
    BY_PATH,
    JSON,
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
class Failure:
    remaining: int
    status: int
    when: Callable[[RecordedRequest], bool]


CLOSE, DROP = "close", "drop"
# What a real server says with each injected status (429: after a restart, while its watch cache fills).
FAILURES = {
    400: ("BadRequest", "bad request"),
    403: ("Forbidden", "forbidden"),
    404: ("NotFound", "not found"),
    409: ("Conflict", "conflict"),
    422: ("Invalid", "invalid"),
    429: ("TooManyRequests", "storage is (re)initializing"),
    500: ("InternalError", "injected failure"),
    503: ("ServiceUnavailable", "service unavailable"),
}


class FakeKubeHandler(kmock.KubernetesScaffold):  # type: ignore[misc]
    """kmock's Kubernetes scaffold (discovery, Status errors, HTTP) plus the stateful resources above."""

    def __init__(self, store: Store, bookmark_interval: float) -> None:
        super().__init__()
        self.store = store
        self.bookmark_interval = bookmark_interval
        self.recorded: list[RecordedRequest] = []
        self.watches: list[_Watch] = []
        self.failures: list[Failure] = []
        self.gone_next: list[tuple[str, str | None]] = []  # (mode, plural or None for any)
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
            warnings: list[str] = []
            payload, status = self._serve(request, record, resource, verb, params, warnings)
            if verb == "watch" and status == 200:
                record.status = 200
                response = await Response(status=200, headers={"Content-Type": "application/json"}, payload=payload)(
                    request
                )
                return response
        except ApiError as error:
            payload, status = error.status(), error.code
            warnings = []
        record.status = status
        # A real server names pruned fields in a Warning header (kubectl prints it) and still answers 200.
        headers = {"Warning": ", ".join(f"299 - {json.dumps(w)}" for w in warnings)} if warnings else None
        result: aiohttp.web.StreamResponse = await Response(status=status, payload=payload, headers=headers)(request)
        return result

    def _inject_faults(self, record: RecordedRequest, params: dict[str, str]) -> None:
        with self.store.lock:  # the test thread arms faults while the server thread consumes them
            for failure in self.failures:
                if failure.when(record):
                    failure.remaining -= 1
                    self.failures[:] = [f for f in self.failures if f.remaining > 0]
                    reason, message = FAILURES.get(failure.status, ("InternalError", "injected failure"))
                    raise ApiError(failure.status, reason, f"{message} (HTTP {failure.status}, injected)")
            if record.verb == "watch" and self.take_gone(record.resource, "http"):
                raise ApiError(410, "Expired", f"too old resource version: {params.get('resourceVersion')}")

    def take_gone(self, plural: str | None, mode: str) -> bool:
        """Consume the first forced 410 of this mode meant for this resource (or any)."""
        for index, (wanted_mode, wanted_plural) in enumerate(self.gone_next):
            if wanted_mode == mode and wanted_plural in (None, plural):
                del self.gone_next[index]
                return True
        return False

    def _serve(
        self,
        request: Request,
        record: RecordedRequest,
        resource: Resource,
        verb: str,
        params: dict[str, str],
        warnings: list[str],
    ) -> tuple[Any, int]:
        namespace = request.namespace or ""
        name, sub = request.name, request.subresource
        if sub not in (None, "status") or (sub == "status" and not resource.status_subresource):
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({sub})")
        as_table = wants_table(request.headers.get("Accept"))
        if verb == "list":
            items, rv = self.store.list(resource, request.namespace, _filter(params, name))
            if as_table:
                return table(resource, items, str(rv)), 200
            return {"apiVersion": resource.api_version, "kind": f"{resource.kind}List",
                    "metadata": {"resourceVersion": str(rv)}, "items": items}, 200  # fmt: skip
        if verb == "watch":
            return self._watch(request, resource, params), 200
        if verb == "create":
            if not isinstance(request.data, dict):
                raise ApiError(400, "BadRequest", "the body of the request is not a JSON object")
            return self.store.create(resource, namespace, request.data, warnings), 201
        assert name is not None
        if verb == "get":
            obj = self.store.get(resource, namespace, name)
            return (table(resource, [obj]) if as_table else obj), 200
        if verb == "delete":
            options = request.data if isinstance(request.data, dict) else {}
            return self.store.delete(resource, namespace, name, options.get("preconditions")), 200
        body = request.data
        if body is None:
            raise ApiError(400, "BadRequest", "the body of the request was not valid JSON")
        if verb == "update":
            if not isinstance(body, dict) or (body.get("metadata") or {}).get("name") != name:
                raise ApiError(400, "BadRequest", "the name of the object does not match the name on the URL")
            if resource.custom and not (body.get("metadata") or {}).get("resourceVersion"):
                raise ApiError(422, "Invalid", f'{resource.kind} "{name}" is invalid: metadata.resourceVersion: '
                                               "Invalid value: 0x0: must be specified for an update")  # fmt: skip
            return self.store.update(resource, namespace, name, lambda _: body, status=sub == "status",
                                     warnings=warnings), 200  # fmt: skip
        change = _patcher(resource, record.content_type, body)
        return self.store.update(resource, namespace, name, change, status=sub == "status", warnings=warnings), 200

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
                if self.take_gone(resource.plural, "event"):
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
