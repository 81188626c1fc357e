"""Calls to the Kubernetes API that never raise into the agent: retried when retrying can help, else logged.

The reporter runs beside the pipeline; a flaky or slow API server must cost a log line, never a unit. Conflicts,
throttling (429), server errors (5xx), timeouts and broken connections are retried a few times with capped
backoff, then answered None (the caller's worker backs off further, ``agent.kube.reconcile``); a 404 is an
answer (the object is gone) and is raised as ``NotFound``; anything else (400, 403, 422) is a bug or a missing
permission that retrying cannot fix: it is logged once with the API's message and raised as ``Refused``, so the
caller stops asking until what it asks for changes.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import aiohttp
import anyio
import structlog
from kubernetes_asyncio.client.exceptions import ApiException

log = structlog.get_logger("metal_agent.kube")
T = TypeVar("T")
MERGE_PATCH = "application/merge-patch+json"
RETRIED = frozenset({409, 429, 500, 502, 503, 504})


class NotFound(Exception):
    """The object (or its namespace) does not exist."""


class Conflict(Exception):
    """A create found the name taken (409 AlreadyExists)."""


class Refused(Exception):
    """The API server refused the request for good (400, 403, 422...): the same request would fail again."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


@dataclass(frozen=True)
class Retry:
    attempts: int = 4
    base: float = 0.2
    cap: float = 5.0
    timeout: float = 10.0  # per attempt


DEFAULT_RETRY = Retry()


def _status_body(exc: ApiException) -> dict[str, object]:
    try:
        body = json.loads(exc.body) if exc.body else {}
    except (TypeError, ValueError):
        body = {}
    return body if isinstance(body, dict) else {}


def api_message(exc: ApiException) -> str:
    """The Status message the API server sent, else the HTTP reason."""
    return f"HTTP {exc.status}: {_status_body(exc).get('message') or exc.reason}"


def api_reason(exc: ApiException) -> str:
    """The Status reason (Invalid, Forbidden, BadRequest...), else the HTTP status code."""
    return str(_status_body(exc).get("reason") or exc.status)


async def call(
    what: str, request: Callable[[], Awaitable[T]], retry: Retry = DEFAULT_RETRY, conflict_is_answer: bool = False
) -> T | None:
    """``await request()`` with retries; None when it still failed after them (transient, logged).

    Raises ``NotFound`` (404), ``Refused`` (a permanent failure, logged) and, with ``conflict_is_answer``,
    ``Conflict`` (a create whose name is taken): all answers the caller acts on.
    """
    for attempt in range(retry.attempts):
        last = attempt == retry.attempts - 1
        try:
            with anyio.fail_after(retry.timeout):
                return await request()
        except ApiException as exc:
            if exc.status == 404:
                raise NotFound(api_message(exc)) from None
            if exc.status == 409 and conflict_is_answer:
                raise Conflict(api_message(exc)) from None
            if exc.status not in RETRIED:
                log.warning("kubernetes API refused the call", call=what, error=api_message(exc))
                raise Refused(exc.status or 0, api_reason(exc), api_message(exc)) from None
            if last:
                log.warning("kubernetes API call failed", call=what, error=api_message(exc), attempts=attempt + 1)
                return None
            error: str = api_message(exc)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            if last:
                log.warning("kubernetes API unreachable", call=what, error=repr(exc), attempts=attempt + 1)
                return None
            error = repr(exc)
        log.debug("kubernetes API call retried", call=what, error=error, attempt=attempt + 1)
        await anyio.sleep(min(retry.cap, retry.base * 2**attempt))
    return None
