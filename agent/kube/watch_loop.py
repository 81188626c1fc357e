"""List, then watch one kind from the listing's resourceVersion; resume, re-list on 410 Gone, back off, never exit.

The loop knows nothing of Models or the pipeline: it hands a complete listing (``Listed``) or one change
(``Changed``) to ``deliver`` and keeps its ``WatchState`` for the health endpoints.

- Each watch asks for bookmarks and ends after ``timeoutSeconds``; the next one resumes from the last
  resourceVersion seen (bookmarks advance it), so a quiet cluster costs one request per timeout, not a poll.
- 410 Gone (the resourceVersion fell out of the server's history) → a fresh listing, which the consumer
  reconciles against what it knew: deletions missed while disconnected are seen.
- Anything else (connection refused or dropped, 5xx, 429, timeouts, even 401/403/404 while RBAC or the CRDs
  are being installed) → capped exponential backoff with jitter, then the same again. Only cancellation ends it.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import anyio
import structlog
from kubernetes_asyncio.client import ApiException

log = structlog.get_logger("metal_agent.kube")


@dataclass(frozen=True)
class Listed:
    kind: str
    items: list[dict[str, Any]]


@dataclass(frozen=True)
class Changed:
    kind: str
    type: str  # ADDED, MODIFIED, DELETED
    obj: dict[str, Any]


@dataclass
class WatchState:
    kind: str
    connected: bool = False
    listed: bool = False  # a complete listing has been delivered at least once
    resource_version: str | None = None
    lists: int = 0
    watches: int = 0
    reconnects: int = 0  # watches opened again after an error or a dropped connection
    last_error: str | None = None
    last_error_time: float | None = None
    last_event_time: float | None = None  # wall clock of the last event or bookmark

    def as_dict(self) -> dict[str, Any]:
        return {
            "connected": self.connected, "listed": self.listed, "resource_version": self.resource_version,
            "lists": self.lists, "watches": self.watches, "reconnects": self.reconnects,
            "last_error": self.last_error, "last_error_time": _iso(self.last_error_time),
            "last_event_time": _iso(self.last_event_time),
        }  # fmt: skip


def backoff_delay(attempt: int, base: float, cap: float, rand: Callable[[], float] = random.random) -> float:
    """Capped exponential backoff with jitter: between half and all of min(cap, base * 2^(attempt-1))."""
    ceiling = min(cap, base * 2.0 ** min(max(0, attempt - 1), 64))  # days of outage must not overflow
    return ceiling / 2 + rand() * ceiling / 2


@dataclass(frozen=True)
class KindCalls:
    """The list function of one kind with its positional arguments (namespaced or cluster-wide)."""

    kind: str
    list_fn: Callable[..., Awaitable[Any]]
    args: tuple[Any, ...]
    label_selector: str | None = None


async def list_and_watch(
    calls: KindCalls,
    state: WatchState,
    deliver: Callable[[Listed | Changed], Awaitable[None]],
    *,
    watch_timeout: float,
    request_timeout: float,
    backoff_base: float,
    backoff_cap: float,
) -> None:
    """Run until cancelled. `failures` (errors since the last watch the server accepted) sets the backoff; a run
    of 410s without anything in between backs off too, so a server that keeps expiring cannot make a tight loop."""
    selector = {"label_selector": calls.label_selector} if calls.label_selector else {}
    need_list, failures, gone_streak, after_error = True, 0, 0, False
    while True:
        try:
            if need_list:
                listing = await calls.list_fn(*calls.args, **selector, _request_timeout=_timeout(request_timeout))
                state.lists += 1
                state.resource_version = listing["metadata"]["resourceVersion"]
                await deliver(Listed(calls.kind, list(listing.get("items") or [])))
                state.listed, need_list = True, False
                state.last_event_time = time.time()
            if after_error:
                state.reconnects += 1
                after_error = False
            state.watches += 1
            async for delivered in _watch(calls, selector, state, deliver, watch_timeout, request_timeout):
                failures = 0  # the server accepted the watch
                gone_streak = 0 if delivered else gone_streak
            gone_streak = 0
            continue  # timeoutSeconds ended the stream: resume from the last resourceVersion at once
        except ApiException as exc:
            state.connected, after_error = False, True
            _note(state, f"HTTP {exc.status}: {exc.reason}")
            if exc.status == 410:
                log.info("watch history expired, listing again", kind=calls.kind, error=state.last_error)
                need_list, gone_streak = True, gone_streak + 1
                if gone_streak == 1:
                    continue  # a first 410 re-lists at once
                failures = max(failures, gone_streak - 1)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError, KeyError) as exc:
            state.connected, after_error = False, True
            _note(state, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        except Exception as exc:  # a bug or an unexpected answer must not end the agent's only source
            state.connected, after_error = False, True
            _note(state, f"{type(exc).__name__}: {exc}")
            log.exception("watch failed unexpectedly", kind=calls.kind)
        failures += 1
        delay = backoff_delay(failures, backoff_base, backoff_cap)
        log.warning("watch interrupted, retrying", kind=calls.kind, error=state.last_error, retry_in=round(delay, 2))
        await anyio.sleep(delay)


async def _watch(
    calls: KindCalls,
    selector: dict[str, str],
    state: WatchState,
    deliver: Callable[[Listed | Changed], Awaitable[None]],
    watch_timeout: float,
    request_timeout: float,
) -> AsyncIterator[bool]:
    """One watch request: yields False when the server accepts it, then True after each event or bookmark."""
    response = await calls.list_fn(
        *calls.args, **selector, watch=True, resource_version=state.resource_version, allow_watch_bookmarks=True,
        timeout_seconds=int(watch_timeout), _preload_content=False,
        _request_timeout=_timeout(request_timeout, watch_timeout + request_timeout),
    )  # fmt: skip
    try:
        if response.status != 200:
            raise ApiException(status=response.status, reason=_reason(await response.text()))
        state.connected = True
        yield False
        while line := await response.content.readline():
            event = json.loads(line)
            obj = event.get("object") or {}
            if event.get("type") == "ERROR":
                raise ApiException(status=obj.get("code"), reason=f"{obj.get('reason')}: {obj.get('message')}")
            if event.get("type") != "BOOKMARK":
                await deliver(Changed(calls.kind, event["type"], obj))
            state.resource_version = (obj.get("metadata") or {}).get("resourceVersion") or state.resource_version
            state.last_event_time = time.time()
            yield True
    finally:
        response.release()


def _reason(body: str) -> str:
    """The message of a Status body, else the start of the body."""
    try:
        status = json.loads(body)
        return f"{status.get('reason')}: {status.get('message')}"
    except (ValueError, AttributeError):
        return body[:200]


def _note(state: WatchState, message: str) -> None:
    state.last_error, state.last_error_time = message, time.time()


def _timeout(connect: float, total: float | None = None) -> aiohttp.ClientTimeout:
    """A bounded connect, and a total that outlasts the server's timeoutSeconds (a stalled stream still ends)."""
    return aiohttp.ClientTimeout(total=total or connect, sock_connect=connect)


def _iso(when: float | None) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when)) if when is not None else None
