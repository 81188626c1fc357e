"""The four failures a real kube-apiserver (v1.36.2) showed that the fake API let through (issue 13), each against
the fake made as strict as the real server: a loopback endpoint address, permanent errors retried forever, retry
loops multiplying with each status change, and a delete held by a finalizer still showing Ready. Request counts
over time come from the fake's request log."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from kubeapi import KubeAPI
from reportkit import applied, events_in, running, service_obj, settle, status, status_of, unit_of, until

from agent.engine.metrics import Metrics

pytestmark = pytest.mark.anyio
SLICE = "discovery.k8s.io/v1"
WINDOW = 1.0  # seconds over which requests are counted; the test backoff starts at 0.05 s (reportkit.settings)


def requests_to(kube_api: KubeAPI, resource: str, verb: str | None = None) -> int:
    return sum(r.resource == resource and verb in (None, r.verb) for r in kube_api.requests)


def condition(kube_api: KubeAPI, kind: str, name: str = "chat") -> dict[str, Any]:
    return next(c for c in status_of(kube_api, name).get("conditions", []) if c["type"] == kind)


async def quiet_window() -> None:
    await anyio.sleep(WINDOW)  # the time over which nothing may be sent: absence has no condition to wait on


# ---------------------------------------------------------------- 1. no routable address


async def test_a_loopback_route_registers_no_endpoint_says_why_once_and_keeps_serving(kube_api: KubeAPI) -> None:
    applied(kube_api, service_obj())
    unit = unit_of(kube_api)
    # host_ip None: the address is the route to the API server, here 127.0.0.1 (as with kind, k3d or a tunnel).
    async with running(kube_api, host_ip=None) as reporter:
        reporter.report(unit, status("Starting", "Admitted", port=18080))
        reporter.report(unit, status("Ready", "Ready", "serving on http://127.0.0.1:18080", port=18080))
        await settle(reporter)
        reporter.report(unit, status("Restarting", "Unhealthy"))
        reporter.report(unit, status("Ready", "Ready", "serving on http://127.0.0.1:18080", port=18080))
        await settle(reporter)
        await until(lambda: reporter.events.idle)
        assert reporter.stats()["endpoints"] == "no routable address" and reporter.stats()["address"] == "127.0.0.1"
        sent = len(kube_api.requests)
        await quiet_window()
        assert len(kube_api.requests) == sent  # nothing is retried
    assert requests_to(kube_api, "endpointslices", "create") == 0 and requests_to(kube_api, "services", "create") == 0
    written = status_of(kube_api)
    assert written["phase"] == "Ready" and written["readyReplicas"] == 1 and "endpoint" not in written
    assert "endpoint" not in written["agent"]  # the loopback URL means nothing to the cluster
    registered = condition(kube_api, "EndpointRegistered")
    assert (registered["status"], registered["reason"]) == ("False", "NoRoutableAddress")
    assert "--advertise-address" in registered["message"] and "--no-endpoints" in registered["message"]
    warnings = [e for e in events_in(kube_api) if e["reason"] == "NoRoutableAddress"]
    assert len(warnings) == 1 and warnings[0]["type"] == "Warning"
    # Cluster-facing text never names the loopback URL the cluster cannot use.
    assert "127.0.0.1:18080" not in condition(kube_api, "Ready")["message"]
    assert all("127.0.0.1:18080" not in e["note"] for e in events_in(kube_api))


# ---------------------------------------------------------------- 2. permanent errors are not retried


async def test_a_refused_endpoint_slice_is_not_retried_until_its_target_changes(kube_api: KubeAPI) -> None:
    applied(kube_api, service_obj())
    unit = unit_of(kube_api)
    metrics = Metrics(lambda: {})  # the agent's: /metrics serves its registry
    kube_api.fail_next(1000, status=422, when=lambda r: r.resource == "endpointslices" and r.verb == "create")
    async with running(kube_api, on_refused=metrics.kube_refused) as reporter:
        reporter.report(unit, status("Ready", "Ready", port=18080))
        await settle(reporter)
        assert requests_to(kube_api, "endpointslices", "create") == 1
        # New statuses for the same endpoint (memory readings, messages) do not send the refused request again.
        reporter.report(unit, status("Ready", "Ready", "still serving", port=18080))
        await settle(reporter)
        await quiet_window()
        assert requests_to(kube_api, "endpointslices", "create") == 1
        registered = condition(kube_api, "EndpointRegistered")
        assert (registered["status"], registered["reason"]) == ("False", "RegistrationRefused")
        assert "HTTP 422" in registered["message"]
        assert reporter.stats()["refused"] == {"Invalid": 1}
        refusals = metrics.registry.get_sample_value("metal_agent_kube_api_refusals_total", {"reason": "Invalid"})
        assert refusals == 1
        kube_api.clear_faults()
        reporter.report(unit, status("Ready", "Ready", port=18081))  # a new target: tried again, and it works
        await settle(reporter)
    assert requests_to(kube_api, "endpointslices", "create") == 2
    assert kube_api.get("EndpointSlice", "chat-metal-agent", api_version=SLICE)["ports"][0]["port"] == 18081
    assert condition(kube_api, "EndpointRegistered")["status"] == "True"


async def test_a_forbidden_status_write_and_a_foreign_service_are_asked_once(kube_api: KubeAPI) -> None:
    foreign = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "chat"}, "spec": {"ports": [{"port": 80}]}}
    applied(kube_api, service_obj(), foreign)
    unit = unit_of(kube_api)
    kube_api.fail_next(1000, status=403, when=lambda r: r.subresource == "status")
    async with running(kube_api) as reporter:
        reporter.report(unit, status("Ready", "Ready", port=18080))
        await settle(reporter)
        await quiet_window()
        assert reporter.stats()["refused"] == {"Forbidden": 1, "Conflict": 1}
        assert reporter.stats()["backing_off"] == []
    assert requests_to(kube_api, "inferenceservices", "patch") == 1
    assert requests_to(kube_api, "services", "create") == 1 and requests_to(kube_api, "services", "get") == 1
    assert requests_to(kube_api, "endpointslices") == 0 and requests_to(kube_api, "services", "patch") == 0


async def test_a_missing_namespace_is_permanent_for_the_endpoint(kube_api: KubeAPI) -> None:
    applied(kube_api, service_obj())
    unit = unit_of(kube_api)
    kube_api.delete_namespace("default")  # being deleted: creates in it answer 404
    async with running(kube_api) as reporter:
        reporter.report(unit, status("Ready", "Ready", port=18080))
        await settle(reporter)
        await quiet_window()
        assert reporter.stats()["refused"].get("NotFound") == 1
    assert requests_to(kube_api, "services", "create") == 1


# ---------------------------------------------------------------- 3. one worker per object


async def test_transient_errors_back_off_in_one_loop_however_many_changes_arrive(kube_api: KubeAPI) -> None:
    applied(kube_api, service_obj())
    unit = unit_of(kube_api)
    kube_api.fail_next(100_000, status=429, when=lambda r: r.resource == "endpointslices")
    async with running(kube_api) as reporter:
        for restarts in range(10):  # ten status changes while the API server keeps answering 429
            reporter.report(unit, {**status("Ready", "Ready", port=18080), "restarts": restarts})
            await anyio.sleep(0.01)
        start = requests_to(kube_api, "endpointslices")
        await quiet_window()
        during = requests_to(kube_api, "endpointslices") - start
        # One worker backing off (0.05, 0.1, 0.2, 0.4, 0.5 s... with jitter; 3 quick attempts each): about 20.
        # A retry loop per change (the old reporter) sent ten times as many.
        assert during <= 30, during
        await until(lambda: reporter.stats()["backing_off"] == ["default/chat"])  # between two tries, not in one
        await until(lambda: status_of(kube_api)["agent"]["restarts"] == 9)  # the latest status is written meanwhile
        kube_api.clear_faults()
        await until(lambda: kube_api.get("EndpointSlice", "chat-metal-agent", api_version=SLICE) is not None)
        await settle(reporter)
        assert reporter.stats()["backing_off"] == []
        await until(lambda: reporter.events.idle)
        converged = len(kube_api.requests)
        await quiet_window()
        assert len(kube_api.requests) == converged  # converged: nothing more is sent
    assert condition(kube_api, "EndpointRegistered")["status"] == "True"


async def test_an_unchanged_service_is_never_patched(kube_api: KubeAPI) -> None:
    applied(kube_api, service_obj())
    unit = unit_of(kube_api)
    async with running(kube_api) as reporter:
        reporter.report(unit, status("Ready", "Ready", port=18080))
        await settle(reporter)
        reporter.report(unit, status("Restarting", "Unhealthy"))
        await settle(reporter)
        reporter.report(unit, status("Ready", "Ready", port=18090))
        await settle(reporter)
    async with running(kube_api) as reporter:  # the agent again, after a restart: its Service is already there
        reporter.report(unit, status("Ready", "Ready", port=18090))
        await settle(reporter)
    assert requests_to(kube_api, "services", "patch") == 0 and requests_to(kube_api, "endpointslices", "patch") == 2
    assert requests_to(kube_api, "services", "create") == 2  # the second answered 409, then read: as wanted


# ---------------------------------------------------------------- 4. deletion held by a finalizer


async def test_a_delete_held_by_a_finalizer_says_terminating_then_writes_stop(kube_api: KubeAPI) -> None:
    held = service_obj()
    held["metadata"]["finalizers"] = ["example.com/keep"]
    applied(kube_api, held)
    unit = unit_of(kube_api)
    async with running(kube_api) as reporter:
        reporter.report(unit, status("Ready", "Ready", port=18080))
        await settle(reporter)
        assert status_of(kube_api)["phase"] == "Ready"
        kube_api.delete("InferenceService", "chat")
        assert kube_api.get("InferenceService", "chat")["metadata"]["deletionTimestamp"]
        reporter.report(None, status("Deleted", "Deleted", "the InferenceService was deleted"))  # the pipeline's
        await settle(reporter)
        written = status_of(kube_api)
        assert (written["phase"], written["readyReplicas"]) == ("Terminating", 0)
        assert "endpoint" not in written and "endpoint" not in written["agent"]
        assert written["agent"]["phase"] == "Terminating" and "actual" not in written.get("memory", {})
        ready = condition(kube_api, "Ready")
        assert (ready["status"], ready["reason"]) == ("False", "Terminating") and "example.com/keep" in ready["message"]
        assert kube_api.get("Service", "chat") is None
        assert kube_api.get("EndpointSlice", "chat-metal-agent", api_version=SLICE) is None
        patches = requests_to(kube_api, "inferenceservices", "patch")
        reporter.report(None, status("Deleted", "Deleted", "the InferenceService was deleted"))
        await settle(reporter)
        await quiet_window()
        assert requests_to(kube_api, "inferenceservices", "patch") == patches  # then the status writes stop
        kube_api.remove_finalizers("InferenceService", "chat")
    assert kube_api.get("InferenceService", "chat") is None


# ---------------------------------------------------------------- cluster-facing text


async def test_conditions_and_events_name_the_service_url_not_the_local_one(kube_api: KubeAPI) -> None:
    applied(kube_api, service_obj())
    unit = unit_of(kube_api)
    async with running(kube_api) as reporter:
        reporter.report(unit, status("Ready", "Ready", "serving on http://127.0.0.1:18080", port=18080))
        await settle(reporter)
        await until(lambda: reporter.events.idle)
    assert condition(kube_api, "Ready")["message"] == "serving on http://chat.default.svc:8080"
    (ready,) = [e for e in events_in(kube_api) if e["reason"] == "Ready"]
    assert ready["note"] == "serving on http://chat.default.svc:8080"
    registered = condition(kube_api, "EndpointRegistered")
    assert registered["status"] == "True" and registered["message"] == (
        "http://chat.default.svc:8080 points at 192.0.2.10:18080"
    )
    assert status_of(kube_api)["agent"]["endpoint"] == "http://192.0.2.10:18080"  # the host's own, routable


async def test_without_endpoints_the_text_names_the_advertised_address(kube_api: KubeAPI) -> None:
    applied(kube_api, service_obj())
    async with running(kube_api, endpoints=False) as reporter:
        reporter.report(unit_of(kube_api), status("Ready", "Ready", "serving on http://127.0.0.1:18080", port=18080))
        await settle(reporter)
    assert condition(kube_api, "Ready")["message"] == "serving on http://192.0.2.10:18080"
    assert "EndpointRegistered" not in {c["type"] for c in status_of(kube_api)["conditions"]}
