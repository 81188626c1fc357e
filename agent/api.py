"""The agent's local HTTP API: liveness, readiness, status as JSON, and Prometheus metrics.

It listens on 127.0.0.1 by default: it reports on local processes and has no authentication.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from agent.pipeline import Agent

PHASES = ("Pending", "Downloading", "Starting", "Ready", "Restarting", "CrashLoop", "Failed", "Stopped")


def metrics_text(agent: Agent) -> str:
    status = agent.status()
    host = status["host"]
    lines = [
        "# HELP metal_agent_host_budget_bytes Memory the agent may give to all units together.",
        "# TYPE metal_agent_host_budget_bytes gauge",
        f"metal_agent_host_budget_bytes {host['budget_bytes']}",
        "# HELP metal_agent_host_available_bytes Memory the OS reports available.",
        "# TYPE metal_agent_host_available_bytes gauge",
        f"metal_agent_host_available_bytes {host['available_bytes']}",
        "# HELP metal_agent_reserved_bytes Memory reserved by starting and running units.",
        "# TYPE metal_agent_reserved_bytes gauge",
        f"metal_agent_reserved_bytes {host['reserved_bytes']}",
        "# HELP metal_agent_unit_estimated_bytes Estimated memory of a unit.",
        "# TYPE metal_agent_unit_estimated_bytes gauge",
    ]
    for unit in status["units"]:
        if unit["estimate"]:
            lines.append(f'metal_agent_unit_estimated_bytes{{unit="{unit["unit"]}"}} {unit["estimate"]["total"]}')
    lines += [
        "# HELP metal_agent_unit_restarts_total Restarts of a unit's server.",
        "# TYPE metal_agent_unit_restarts_total counter",
    ]
    for unit in status["units"]:
        lines.append(f'metal_agent_unit_restarts_total{{unit="{unit["unit"]}"}} {unit["restarts"]}')
    lines += [
        "# HELP metal_agent_unit_phase Current phase of a unit (1 for the phase it is in).",
        "# TYPE metal_agent_unit_phase gauge",
    ]
    for unit in status["units"]:
        for phase in PHASES:
            lines.append(
                f'metal_agent_unit_phase{{unit="{unit["unit"]}",phase="{phase}"}} {int(unit["phase"] == phase)}'
            )
    return "\n".join(lines) + "\n"


def make_app(agent: Agent) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        return web.Response(text="ready\n") if agent.synced else web.Response(status=503, text="syncing\n")

    async def status(_: web.Request) -> web.Response:
        return web.json_response(agent.status())

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=metrics_text(agent), content_type="text/plain", charset="utf-8")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics)
    return app


async def serve(agent: Agent, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(make_app(agent), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
