"""An on-demand unit in the cluster: its Service leads to the agent's cluster-facing /v1 listener in every phase
that can answer, so that a request through the Service starts it, and every request passes the idle timer."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from kubeapi import KubeAPI
from reportkit import HOST_IP, applied, running, service_obj, settle, status, status_of, unit_of

from agent.processes.ports import free_port

SLICE = "discovery.k8s.io/v1"
PROXY = 9465


def on_demand(phase: str, reason: str, port: int | None = None) -> dict[str, Any]:
    fields = {"state": phase if phase in ("Idle", "Starting", "Ready") else "Idle", "active": phase != "Idle",
              "in_flight": 0, "last_request": None, "idle_timeout_s": 600.0, "stops_in_s": None}  # fmt: skip
    return {**status(phase, reason, port=port), "on_demand": fields}


def slice_of(kube_api: KubeAPI) -> tuple[list[Any], list[int]]:
    found = kube_api.get("EndpointSlice", "chat-metal-agent", api_version=SLICE)
    assert found is not None
    endpoints = [(e["addresses"], e["conditions"]["ready"]) for e in found["endpoints"]]
    return endpoints, [p["port"] for p in found["ports"]]


@pytest.mark.anyio
async def test_an_idle_unit_points_its_service_at_the_proxy_and_keeps_it_there_while_it_runs(
    kube_api: KubeAPI,
) -> None:
    applied(kube_api, service_obj(onDemand=True))
    unit = unit_of(kube_api)
    async with running(kube_api, proxy_port=PROXY) as reporter:
        reporter.report(unit, on_demand("Idle", "Idle"))
        await settle(reporter)
        assert slice_of(kube_api) == ([([HOST_IP], True)], [PROXY])  # no server runs, yet a request can start it
        idle = status_of(kube_api)
        assert idle["endpoint"] == "http://chat.default.svc:8080" and idle["readyReplicas"] == 0
        assert idle["agent"]["endpoint"] == f"http://{HOST_IP}:{PROXY}" and idle["agent"]["onDemand"]["state"] == "Idle"
        registered = {c["type"]: c for c in idle["conditions"]}["EndpointRegistered"]
        assert registered["status"] == "True" and "a request starts the unit" in registered["message"]

        reporter.report(unit, on_demand("Ready", "Ready", port=18080))  # never the server's own port: the idle
        await settle(reporter)  # timer must see every request, and a cut-off client would see a closed port
        assert slice_of(kube_api) == ([([HOST_IP], True)], [PROXY])
        assert status_of(kube_api)["readyReplicas"] == 1

        reporter.report(unit, on_demand("Failed", "InvalidSpec"))  # cannot answer: not ready, the Service stays
        await settle(reporter)
        assert slice_of(kube_api) == ([([HOST_IP], False)], [PROXY])
        assert "endpoint" not in status_of(kube_api)


@pytest.mark.anyio
async def test_without_the_proxy_an_idle_unit_has_no_address_and_an_always_on_one_keeps_its_server_port(
    kube_api: KubeAPI,
) -> None:
    applied(kube_api, service_obj(onDemand=True))
    unit = unit_of(kube_api)
    async with running(kube_api, proxy_port=None) as reporter:  # --no-endpoints leaves no listener to point at
        reporter.report(unit, on_demand("Idle", "Idle"))
        await settle(reporter)
        assert kube_api.get("EndpointSlice", "chat-metal-agent", api_version=SLICE) is None
    kube_api.apply(service_obj(name="chat"))
    async with running(kube_api, proxy_port=PROXY) as reporter:
        reporter.report(unit_of(kube_api), status("Ready", "Ready", port=18080))
        await settle(reporter)
        assert slice_of(kube_api) == ([([HOST_IP], True)], [18080])


def test_run_fails_with_status_1_when_the_proxy_port_is_taken(kube_api: KubeAPI, tmp_path: Path) -> None:
    kubeconfig = kube_api.write_kubeconfig(tmp_path / "kubeconfig")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "agent.cli", "run", "--kube", "--kubeconfig", str(kubeconfig), "--state-dir",
             str(tmp_path / "state"), "--api-port", str(free_port()), "--server-host", "127.0.0.1",
             "--advertise-address", HOST_IP, "--proxy-port", str(port)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert f"error: cannot serve the cluster-facing /v1 endpoint on 127.0.0.1:{port} (--proxy-port): " in done.stderr
