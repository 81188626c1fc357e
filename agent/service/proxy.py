"""One OpenAI-compatible endpoint for every serving unit, on the agent's local API.

``GET /v1/models`` lists the units; ``POST /v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings`` go to
the server of the unit the body's ``model`` names (``NAME``, ``NAMESPACE/NAME``, or the unit's ``alias``), starting
an on-demand unit first (agent/engine/ondemand.py). The response is relayed as it arrives — an SSE stream chunk by
chunk, each write waiting for the client to take it (backpressure) — and a client that goes away cancels the
handler, which closes the upstream connection so the server stops generating. Bodies are capped
(``max_request_body``); errors use OpenAI's shape, ``{"error": {"message", "type", "code"}}``.

The relay does not decode: compressed answers pass through as they are, headers minus the hop-by-hop ones.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from agent.engine.ondemand import Gone, Unavailable
from agent.sources.manifest import ServiceSpec

if TYPE_CHECKING:
    from agent.engine.pipeline import Agent

ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
SESSION = web.AppKey("proxy_session", aiohttp.ClientSession)
CONNECT_TIMEOUT_S = 10.0


def error(status: int, message: str, kind: str, code: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def model_names(agent: Agent) -> dict[str, list[str]]:
    """Every name a request may use -> the unit keys it names (more than one: ambiguous).

    ``NAMESPACE/NAME`` always; ``NAME`` alone (ambiguous where several namespaces have it); the ``alias`` if set.
    Built once per change of the InferenceServices (the pipeline clears it), not per request."""
    if agent.ondemand.names is None:
        agent.ondemand.names = _names(agent)
    return agent.ondemand.names


def _names(agent: Agent) -> dict[str, list[str]]:
    names: dict[str, set[str]] = defaultdict(set)
    for (namespace, name), service in agent.services.items():
        key = f"{namespace}/{name}"
        names[key].add(key)
        names[name].add(key)
        if service.alias:
            names[service.alias].add(key)
    return {name: sorted(keys) for name, keys in names.items()}


def listed_ids(agent: Agent) -> list[tuple[str, str, ServiceSpec]]:
    """(id, unit key, service) for /v1/models: the short name where it is unique, else NAMESPACE/NAME; and the
    alias where it names only this unit."""
    names = model_names(agent)
    entries = []
    for (namespace, name), service in sorted(agent.services.items()):
        key = f"{namespace}/{name}"
        entries.append((name if names.get(name) == [key] else key, key, service))
        if service.alias and names.get(service.alias) == [key] and service.alias != name:
            entries.append((service.alias, key, service))
    return entries


def add_routes(app: web.Application, agent: Agent) -> None:
    async def session_context(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)  # servers are on loopback: no limit
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S)  # generation may take long
        async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
            app[SESSION] = session
            yield

    async def models(_: web.Request) -> web.Response:
        statuses = {u["unit"]: u for u in agent.status()["units"]}
        data = []
        for model_id, key, service in listed_ids(agent):
            unit = statuses.get(key, {})
            data.append(
                {
                    "id": model_id,
                    "object": "model",
                    "created": 0,
                    "owned_by": "metal-agent",
                    "unit": key,
                    "phase": unit.get("phase", "Pending"),
                    "on_demand": service.on_demand,
                    "context_size": unit.get("context_size"),
                    "alias": service.alias,
                }
            )
        return web.json_response({"object": "list", "data": data})

    async def forward(request: web.Request) -> web.StreamResponse:
        key = ""
        response: web.StreamResponse
        try:
            key, body = await _target(request, agent)
            try:
                async with agent.ondemand.serving(key) as child:
                    response = await relay(request, app[SESSION], child.port, body)
            except aiohttp.ClientConnectionError:  # no answer came: if its server is going (a new spec, a restart)
                if not await agent.ondemand.went_away(key, child):
                    raise
                async with agent.ondemand.serving(key, avoid_pid=child.pid) as child:  # the next one answers
                    response = await relay(request, app[SESSION], child.port, body)
        except _Refused as refused:
            response = refused.response
        except Gone as exc:
            response = error(404, str(exc), "invalid_request_error", "model_not_found")
        except Unavailable as exc:
            retry = {"Retry-After": str(exc.retry_after)}
            response = error(503, str(exc), "server_error", "model_not_ready", retry)
        except aiohttp.ClientError as exc:
            response = error(502, f"the server of {key} failed: {exc}", "server_error", "upstream_error")
        agent.ondemand.metrics.answered(key, response.status)
        return response

    app.cleanup_ctx.append(session_context)
    app.router.add_get("/v1/models", models)
    for path in ROUTES:
        app.router.add_post(path, forward)


class _Refused(Exception):
    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


async def _target(request: web.Request, agent: Agent) -> tuple[str, bytes]:
    """The unit key the body's ``model`` names, and the body; raises _Refused with the error response."""
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        limit = agent.config.max_request_body
        raise _Refused(
            error(413, f"the request body exceeds {limit} bytes", "invalid_request_error", "request_too_large")
        ) from None
    try:
        payload: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise _Refused(error(400, "the body is not valid JSON", "invalid_request_error", "invalid_json")) from None
    model = payload.get("model") if isinstance(payload, dict) else None
    if not isinstance(model, str) or not model:
        raise _Refused(error(400, "the body must name a model", "invalid_request_error", "model_required"))
    keys = model_names(agent).get(model, [])
    if len(keys) != 1:
        message = (
            f"the model {model!r} does not exist" if not keys else f"{model!r} is ambiguous: use {' or '.join(keys)}"
        )
        raise _Refused(error(404, message, "invalid_request_error", "model_not_found"))
    return keys[0], body


async def relay(request: web.Request, session: aiohttp.ClientSession, port: int, body: bytes) -> web.StreamResponse:
    """POST ``body`` to the server on ``port`` and stream its answer back as it comes."""
    headers = {name: value for name, value in request.headers.items() if name.lower() not in HOP_BY_HOP}
    url = f"http://127.0.0.1:{port}{request.rel_url}"
    try:
        upstream = await session.post(url, data=body, headers=headers)
    except aiohttp.ServerDisconnectedError:  # a kept-alive connection the server had closed (llama-server does
        upstream = await session.post(url, data=body, headers=headers)  # after a stream): once more, on a new one
    async with upstream:
        try:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in upstream.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    response.headers.add(name, value)
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
        except BaseException:
            upstream.close()
            raise
        try:
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)  # waits while the client's buffer is full
            await response.write_eof()
        except aiohttp.ClientError:  # the server failed mid-answer: the client's answer ends unfinished too
            upstream.close()
            if request.transport is not None:
                request.transport.close()
        except BaseException:
            upstream.close()  # not back to the pool: the server sees the connection go and stops generating
            raise
    return response
