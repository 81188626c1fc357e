"""Calls to the Kubernetes API that never raise into the agent: retried when retrying can help, else logged.

The reporter runs beside the pipeline; a flaky or slow API server must cost a log line, never a unit. Conflicts,
throttling (429), server errors (5xx), timeouts and broken connections are retried with capped backoff; a 404
is an answer (the object is gone) and is returned as such; anything else (400, 403, 422) is a bug or a
missing permission that retrying cannot fix, so it is logged once with the API's message.
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


@dataclass(frozen=True)
class Retry:
    attempts: int = 4
    base: float = 0.2
    cap: float = 5.0
    timeout: float = 10.0  # per attempt


DEFAULT_RETRY = Retry()


def api_message(exc: ApiException) -> str:
    """The Status message the API server sent, else the HTTP reason."""
    try:
        body = json.loads(exc.body) if exc.body else {}
    except (TypeError, ValueError):
        body = {}
    message = body.get("message") if isinstance(body, dict) else None
    return f"HTTP {exc.status}: {message or exc.reason}"


async def call(
    what: str, request: Callable[[], Awaitable[T]], retry: Retry = DEFAULT_RETRY, conflict_is_answer: bool = False
) -> T | None:
    """``await request()`` with retries; None when it failed for good (already logged).

    Raises only ``NotFound`` (404) and, with ``conflict_is_answer``, ``Conflict`` (a create whose name is taken):
    both are answers the caller acts on.
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
            if exc.status not in RETRIED or last:
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
