"""One OpenAI-compatible endpoint for every serving unit, on the agent's local API.

``GET /v1/models`` lists the units; ``POST /v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings`` go to
the server of the unit the body's ``model`` names (``NAME``, ``NAMESPACE/NAME``, or the unit's ``alias``), starting
an on-demand unit first (agent/engine/ondemand.py). The response is relayed as it arrives — an SSE stream chunk by
chunk, each write waiting for the client to take it (backpressure) — and a client that goes away cancels the
handler, which closes the upstream connection so the server stops generating. Bodies are capped
(``max_request_body``); errors use OpenAI's shape, ``{"error": {"message", "type", "code"}}``.

In Kubernetes mode the same routes also listen for the cluster (agent/service/api.py's cluster app, at
``--proxy-port``), where an on-demand unit's Service points: there a request goes to the unit whose Service its
``Host`` names (``NAME.NAMESPACE.svc``), so a client need not know the unit's model name; a Host that names no
unit (a ClusterIP, an address) falls back to the body's ``model``.

The relay does not decode: compressed answers pass through as they are, headers minus the hop-by-hop ones. An
answer that is not a stream (a Content-Length up to ``WHOLE_ANSWER``) is read whole before any of it goes back, so
one that breaks off is a 502 in OpenAI's shape rather than a cut JSON body under a 200.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from agent.engine.ondemand import Gone, Unavailable
from agent.sources.manifest import ServiceSpec
from agent.util.kube_names import service_in_host, service_name

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
WHOLE_ANSWER = 256 << 10  # an answer with a Content-Length up to this is read whole before it goes back


def error(status: int, message: str, kind: str, code: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers)


@dataclass(frozen=True)
class Routes:
    """Every name a request may use, built once per change of the InferenceServices (the pipeline clears
    ``agent.ondemand.routes``), not per request. A name with more than one unit key is ambiguous."""

    models: dict[str, list[str]]  # NAMESPACE/NAME always; NAME alone; the alias if set
    services: dict[str, list[str]]  # the unit's Service name (agent/util/kube_names.py), for routing by Host


def routes(agent: Agent) -> Routes:
    if agent.ondemand.routes is None:
        models: dict[str, set[str]] = defaultdict(set)
        services: dict[str, set[str]] = defaultdict(set)
        for (namespace, name), service in agent.services.items():
            key = f"{namespace}/{name}"
            models[key].add(key)
            models[name].add(key)
            if service.alias:
                models[service.alias].add(key)
            services[service_name(name)].add(key)
        agent.ondemand.routes = Routes(
            {name: sorted(keys) for name, keys in models.items()},
            {name: sorted(keys) for name, keys in services.items()},
        )
    found: Routes = agent.ondemand.routes
    return found


def model_names(agent: Agent) -> dict[str, list[str]]:
    """Every name a request's ``model`` may use -> the unit keys it names (more than one: ambiguous)."""
    return routes(agent).models


def unit_in_host(agent: Agent, host: str | None) -> str | None:
    """The unit whose Service the ``Host`` names (cluster DNS: ``NAME``, ``NAME.NAMESPACE[.svc...]``); None
    when it names none, or a bare ``NAME`` that several namespaces have."""
    found = service_in_host(host)
    if found is None:
        return None
    service, namespace = found
    keys = [key for key in routes(agent).services.get(service, ()) if namespace in (None, key.split("/", 1)[0])]
    return keys[0] if len(keys) == 1 else None


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


def add_routes(app: web.Application, agent: Agent, *, by_host: bool = False) -> None:
    """The /v1 routes. ``by_host`` (the cluster-facing listener): a request whose ``Host`` names a unit's
    Service goes to that unit whatever its body's ``model`` says, and ``/v1/models`` lists only that unit."""

    async def session_context(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)  # servers are on loopback: no limit
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S)  # generation may take long
        jar = aiohttp.DummyCookieJar()  # cookies pass between a client and its server; the relay keeps none
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False, cookie_jar=jar
        ) as session:
            app[SESSION] = session
            yield

    async def models(request: web.Request) -> web.Response:
        statuses = {u["unit"]: u for u in agent.status()["units"]}
        only = unit_in_host(agent, request.host) if by_host else None
        data = []
        for model_id, key, service in listed_ids(agent):
            if only is not None and key != only:
                continue
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
            key, body = await _target(request, agent, by_host)
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


async def _target(request: web.Request, agent: Agent, by_host: bool) -> tuple[str, bytes]:
    """The unit key the ``Host`` (``by_host``) or else the body's ``model`` names, and the body; raises _Refused
    with the error response."""
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
    if by_host and (key := unit_in_host(agent, request.host)) is not None:
        return key, body
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
        answer_headers = [(k, v) for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP]
        length = upstream.content_length
        if length is not None and length <= WHOLE_ANSWER:  # not a stream: read whole, so a break is a 502
            try:
                whole = await upstream.read()
            except aiohttp.ClientError as exc:  # nothing has gone to the client yet: a 502, not a second try
                raise aiohttp.ClientPayloadError(f"the answer broke off: {exc}") from exc
            return web.Response(status=upstream.status, reason=upstream.reason, headers=answer_headers, body=whole)
        try:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=answer_headers)
            if length is not None:
                response.content_length = length
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
