"""The agent's local HTTP API: liveness, readiness, status as JSON, Prometheus metrics, and the OpenAI-compatible
``/v1`` endpoint for every unit (agent/service/proxy.py).

It listens on 127.0.0.1 by default: it reports on local processes and has no authentication.

In Kubernetes mode a second, cluster-facing listener (``--proxy-port`` on ``--server-host``, where the servers
listen too) serves only ``/v1`` and ``/healthz``, routed by the Service a request's ``Host`` names: on-demand
units' EndpointSlices point at it (agent/kube/registration.py). /status and /metrics stay on the local API: they
describe every unit, the host's memory and the agent's own state, which are not the cluster's to read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from agent.service import proxy

if TYPE_CHECKING:
    from agent.engine.pipeline import Agent


async def healthz(_: web.Request) -> web.Response:
    return web.Response(text="ok\n")


def make_app(agent: Agent) -> web.Application:
    async def readyz(_: web.Request) -> web.Response:
        return web.Response(text="ready\n") if agent.synced else web.Response(status=503, text="syncing\n")

    async def status(_: web.Request) -> web.Response:
        return web.json_response(agent.status())

    app = web.Application(client_max_size=agent.config.max_request_body)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)
    # prometheus_client renders (escaping, histograms) and negotiates OpenMetrics and gzip with the scraper.
    app.router.add_get("/metrics", make_aiohttp_handler(agent.metrics.registry))
    proxy.add_routes(app, agent)  # the OpenAI-compatible /v1 endpoint
    return app


def make_cluster_app(agent: Agent) -> web.Application:
    app = web.Application(client_max_size=agent.config.max_request_body)
    app.router.add_get("/healthz", healthz)
    proxy.add_routes(app, agent, by_host=True)
    return app


async def serve(agent: Agent, host: str, port: int, *, cluster: bool = False) -> web.AppRunner:
    """Start the local API (or with ``cluster``, the cluster-facing /v1 listener) on ``host:port``."""
    app = make_cluster_app(agent) if cluster else make_app(agent)
    # A client that disconnects cancels its handler: a /v1 request then closes its upstream request.
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
