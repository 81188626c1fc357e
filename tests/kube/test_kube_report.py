"""The Kubernetes reporter against the fake API server (tests/kubeapi.py) with the real kubernetes-asyncio client:
status by merge patch, idempotent writes, Events in the background, and endpoints limited to the agent's own."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from fake_servers import FakeServer
from kubeapi import KubeAPI
from kubernetes_asyncio.client import ApiClient
from reportkit import (
    FAST,
    GiB,
    applied,
    events_in,
    model_obj,
    running,
    service_obj,
    settings,
    settle,
    status,
    status_of,
    status_patches,
    unit_of,
    until,
)

from agent.engine.plugin_manager import load_plugins
from agent.engine.unit_state import UnitRuntime
from agent.estimate.tinymodel import TinyShape, write_tiny_gguf
from agent.hookspecs import Executor, hookimpl
from agent.kube.endpoints import AGENT_NAME, HOST_LABEL, MANAGED_BY, SLICE_SERVICE
from agent.kube.events import Event, EventRecorder
from agent.kube.report import register_reporter
from agent.sources.manifest import parse_object
from agent.sources.standalone import Event as StandaloneEvent
from agent.sources.standalone import EventType
from agent.testing import build_agent

MERGE_PATCH = "application/merge-patch+json"  # what a real API server accepts on /status
pytestmark = pytest.mark.anyio


def test_the_status_shape_here_is_the_agents() -> None:
    assert set(status("Ready", "Ready", port=1)) == set(UnitRuntime("default/chat").status())


async def test_ready_unit_gets_status_conditions_memory_endpoint_and_events(kube_api: KubeAPI) -> None:
    applied(kube_api, service_obj())
    unit = unit_of(kube_api)
    async with running(kube_api) as reporter:
        reporter.report(unit, status("Starting", "Admitted", port=18080))
        await settle(reporter)
        assert status_of(kube_api)["phase"] == "Creating"
        reporter.report(unit, status("Ready", "Ready", port=18080))
        await settle(reporter)
        await until(lambda: len(events_in(kube_api)) == 2, what="two events")

    written = status_of(kube_api)
    assert written["phase"] == "Ready" and written["readyReplicas"] == 1 and "schedulingStatus" not in written
    assert written["observedGeneration"] == 1
    assert written["endpoint"] == "http://chat.default.svc:8080"
    assert written["agent"] == {
        "host": "mac-1",
        "phase": "Ready",
        "executor": "llamacpp",
        "restarts": 0,
        "endpoint": "http://192.0.2.10:18080",
    }
    conditions = {c["type"]: c for c in written["conditions"]}
    assert (conditions["Admitted"]["status"], conditions["Admitted"]["reason"]) == ("True", "Admitted")
    assert (conditions["Ready"]["status"], conditions["Ready"]["reason"]) == ("True", "Ready")
    assert all(c["observedGeneration"] == 1 and c["lastTransitionTime"].endswith("Z") for c in conditions.values())
    memory = written["memory"]
    assert memory["budgetBytes"] == 8 * GiB and memory["budgetSource"] == "model-budget"
    assert memory["budget"] == "8.0 GiB" and memory["estimate"] == "5.8 GiB"
    assert memory["estimateBreakdown"] == {
        "weights": 4 * GiB,
        "kvCache": GiB,
        "compute": GiB // 2,
        "overhead": GiB // 4,
    }
    assert memory["actualBytes"] == 5 * GiB + 1 and memory["actual"]["rss"] == 5 * GiB

    patches = status_patches(kube_api)
    assert patches and all(r.method == "PATCH" and r.content_type == MERGE_PATCH for r in patches)
    assert all(r.status == 200 for r in patches)
    # The status subresource never changes the generation: the agent's writes give its watch nothing to do.
    assert kube_api.get("InferenceService", "chat")["metadata"]["generation"] == 1

    service = kube_api.get("Service", "chat")
    slice_ = kube_api.get("EndpointSlice", "chat-metal-agent", api_version="discovery.k8s.io/v1")
    assert service is not None and slice_ is not None
    for obj in (service, slice_):
        assert obj["metadata"]["labels"][MANAGED_BY] == AGENT_NAME
        assert obj["metadata"]["labels"][HOST_LABEL] == "mac-1"
        (owner,) = obj["metadata"]["ownerReferences"]
        assert owner["uid"] == kube_api.get("InferenceService", "chat")["metadata"]["uid"]
    assert "selector" not in service["spec"] and service["spec"]["ports"][0]["port"] == 8080
    assert slice_["metadata"]["labels"][SLICE_SERVICE] == "chat"
    assert slice_["endpoints"] == [
        {"addresses": ["192.0.2.10"], "conditions": {"ready": True, "serving": True, "terminating": False}}
    ]
    assert slice_["ports"][0]["port"] == 18080

    events = sorted(events_in(kube_api), key=lambda e: e["eventTime"])
    assert [(e["type"], e["reason"]) for e in events] == [("Normal", "Admitted"), ("Normal", "Ready")]
    assert all(e["regarding"]["kind"] == "InferenceService" and e["regarding"]["name"] == "chat" for e in events)
    assert events[0]["regarding"]["uid"] == kube_api.get("InferenceService", "chat")["metadata"]["uid"]
    assert all(
        e["reportingController"] == "llmkube.dev/metal-agent" and e["reportingInstance"] == "metal-agent-mac-1"
        for e in events
    )


async def test_identical_statuses_write_nothing(kube_api: KubeAPI) -> None:
    applied(kube_api, service_obj())
    unit = unit_of(kube_api)
    async with running(kube_api) as reporter:
        reporter.report(unit, status("Ready", "Ready", port=18080))
        await settle(reporter)
        writes = len(kube_api.requests)
        first = status_of(kube_api)
        for _ in range(5):
            reporter.report(unit, status("Ready", "Ready", port=18080))
            await settle(reporter)
        assert len(kube_api.requests) == writes  # no status patch, no endpoint read or write, no event
        assert status_of(kube_api) == first


async def test_transition_time_changes_only_when_a_condition_status_changes(kube_api: KubeAPI) -> None:
    applied(kube_api, service_obj())
    unit = unit_of(kube_api)
    async with running(kube_api) as reporter:
        reporter.report(unit, status("Pending", "InsufficientMemory", "needs 6 GiB; 1 GiB free"))
        await settle(reporter)
        before = {c["type"]: c for c in status_of(kube_api)["conditions"]}
        # Backdate what the server holds, then report a new message with the same condition statuses.
        kube_api.apply(
            {
                **service_obj(),
                "status": {
                    **status_of(kube_api),
                    "conditions": [{**c, "lastTransitionTime": "2020-01-01T00:00:00Z"} for c in before.values()],
                },
            }
        )
        reporter.written.clear()  # as after a restart: the reporter reads what is there
        reporter.report(unit, status("Pending", "InsufficientMemory", "needs 6 GiB; 2 GiB free"))
        await settle(reporter)
        after = {c["type"]: c for c in status_of(kube_api)["conditions"]}
        assert after["Admitted"]["message"] == "needs 6 GiB; 2 GiB free"
        assert after["Admitted"]["lastTransitionTime"] == after["Ready"]["lastTransitionTime"] == "2020-01-01T00:00:00Z"
        reporter.report(unit, status("Starting", "Admitted", port=1))
        await settle(reporter)
        changed = {c["type"]: c for c in status_of(kube_api)["conditions"]}
        assert (
            changed["Admitted"]["status"] == "True"
            and changed["Admitted"]["lastTransitionTime"] != "2020-01-01T00:00:00Z"
        )
        assert changed["Ready"]["lastTransitionTime"] == "2020-01-01T00:00:00Z"  # still False


async def test_insufficient_memory_reports_scheduling_status_and_marks_the_endpoint_not_ready(
    kube_api: KubeAPI,
) -> None:
    applied(kube_api, service_obj())
    unit = unit_of(kube_api)
    async with running(kube_api) as reporter:
        reporter.report(unit, status("Ready", "Ready", port=18080))
        await settle(reporter)
        reporter.report(unit, status("Failed", "InsufficientMemory", "needs 5.8 GiB, budget 1.0 GiB"))
        await settle(reporter)
        await until(lambda: any(e["type"] == "Warning" for e in events_in(kube_api)), what="a warning event")
    written = status_of(kube_api)
    assert (written["phase"], written["schedulingStatus"]) == ("Failed", "InsufficientMemory")
    assert written["schedulingMessage"] == "needs 5.8 GiB, budget 1.0 GiB" and written["readyReplicas"] == 0
    assert "endpoint" not in written and "endpoint" not in written["agent"] and "actual" not in written["memory"]
    conditions = {c["type"]: (c["status"], c["reason"]) for c in written["conditions"]}
    assert conditions == {"Admitted": ("False", "InsufficientMemory"), "Ready": ("False", "InsufficientMemory")}
    slice_ = kube_api.get("EndpointSlice", "chat-metal-agent", api_version="discovery.k8s.io/v1")
    assert slice_["endpoints"] == [] and slice_["ports"] == []  # no server: the address goes, the Service stays
    assert kube_api.get("Service", "chat") is not None
    (warning,) = [e for e in events_in(kube_api) if e["type"] == "Warning"]
    assert warning["reason"] == "InsufficientMemory" and warning["note"] == "needs 5.8 GiB, budget 1.0 GiB"


async def test_stopped_and_deleted_units_lose_their_endpoints(kube_api: KubeAPI) -> None:
    applied(kube_api, service_obj(), service_obj("other"))
    async with running(kube_api) as reporter:
        reporter.report(unit_of(kube_api), status("Ready", "Ready", port=18080))
        reporter.report(unit_of(kube_api, "other"), status("Ready", "Ready", port=18081, name="other"))
        await settle(reporter)
        assert kube_api.get("Service", "chat") and kube_api.get("Service", "other")
        kube_api.apply(service_obj(suspend=True))
        reporter.report(unit_of(kube_api), status("Stopped", "Suspended", "replicas is 0 or suspend is true"))
        kube_api.delete("InferenceService", "other")
        reporter.report(None, status("Deleted", "Deleted", "the InferenceService was deleted", name="other"))
        await settle(reporter)
    for name in ("chat", "other"):
        assert kube_api.get("Service", name) is None
        assert kube_api.get("EndpointSlice", f"{name}-metal-agent", api_version="discovery.k8s.io/v1") is None
    written = status_of(kube_api)
    assert written["phase"] == "Suspended" and written["observedGeneration"] == 2
    assert "default/other" not in reporter.desired and "default/other" not in reporter.written


async def test_services_and_slices_that_are_not_the_agents_are_never_touched(kube_api: KubeAPI) -> None:
    foreign = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "chat", "namespace": "default"},
        "spec": {"selector": {"app": "chat"}, "ports": [{"port": 80}]},
    }
    other_host = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "other", "namespace": "default", "labels": {MANAGED_BY: AGENT_NAME, HOST_LABEL: "mac-2"}},
        "spec": {"ports": [{"port": 8080}]},
    }
    applied(kube_api, service_obj(), service_obj("other"), foreign, other_host)
    async with running(kube_api) as reporter:
        reporter.report(unit_of(kube_api), status("Ready", "Ready", port=18080))
        reporter.report(unit_of(kube_api, "other"), status("Ready", "Ready", port=18081, name="other"))
        await settle(reporter)
        await until(lambda: sum(e["reason"] == "EndpointConflict" for e in events_in(kube_api)) == 2)
        reporter.report(None, status("Deleted", "Deleted", name="chat"))
        reporter.report(None, status("Stopped", "Suspended", name="other"))
        await settle(reporter)
    writes = [r for r in kube_api.requests if r.resource in ("services", "endpointslices") and r.verb != "get"]
    assert {(r.verb, r.status) for r in writes} == {("create", 409)}  # a create cannot overwrite; no patch, no delete
    assert kube_api.get("Service", "chat")["spec"]["selector"] == {"app": "chat"}
    assert kube_api.get("Service", "other")["metadata"]["labels"][HOST_LABEL] == "mac-2"
    assert "endpoint" not in status_of(kube_api, "other")  # no Service of ours to point at


async def test_api_errors_are_retried_and_never_raised(kube_api: KubeAPI) -> None:
    applied(kube_api, service_obj())
    unit = unit_of(kube_api)
    async with running(kube_api) as reporter:
        kube_api.fail_next(2, status=500, when=lambda r: r.subresource == "status")
        kube_api.fail_next(1, status=409, when=lambda r: r.resource == "services" and r.verb == "create")
        reporter.report(unit, status("Ready", "Ready", port=18080))
        await until(lambda: status_of(kube_api).get("phase") == "Ready", what="status written after retries")
        await until(lambda: kube_api.get("Service", "chat") is not None, what="Service created on a later round")
        # An object that does not exist (404) is dropped, not retried forever.
        reporter.report(None, status("Pending", "ModelNotFound", name="ghost"))
        await settle(reporter)
        assert "default/ghost" not in reporter.written
    statuses = [r.status for r in status_patches(kube_api) if r.method == "PATCH"]
    assert statuses[:3] == [500, 500, 200]


async def test_event_failures_never_hold_up_status(kube_api: KubeAPI) -> None:
    applied(kube_api, service_obj())
    unit = unit_of(kube_api)
    kube_api.fail_next(1000, status=503, when=lambda r: r.resource == "events")
    async with running(kube_api) as reporter:
        for phase, reason in (("Starting", "Admitted"), ("Ready", "Ready")):
            with anyio.fail_after(0.5):  # report() returns at once, whatever the API does
                reporter.report(unit, status(phase, reason, port=18080))
        await until(lambda: status_of(kube_api).get("phase") == "Ready", what="status written")
        await until(lambda: reporter.events.failed == 2, what="both events given up")
    assert events_in(kube_api) == []


async def test_repeated_events_aggregate_into_a_series(kube_api: KubeAPI) -> None:
    async with ApiClient(kube_api.configuration()) as api_client:
        recorder = EventRecorder(api_client, "metal-agent-mac-1", retry=FAST)
        for _ in range(4):
            recorder.emit(Event("default", "chat", "Warning", "CrashLoop", "Restart", "exited with status 1"))
        recorder.emit(Event("default", "chat", "Warning", "CrashLoop", "Restart", "exited with status 137"))
        recorder.emit(Event("default", "chat", "Normal", "Ready", "Serve", "serving"))
        recorder.close()
        await recorder.run()
    events = {e["note"]: e for e in events_in(kube_api)}
    assert set(events) == {"exited with status 1", "exited with status 137", "serving"}
    assert events["exited with status 1"]["series"]["count"] == 4
    assert "series" not in events["exited with status 137"] and "series" not in events["serving"]
    creates = kube_api.requests_where(resource="events", verb="create")
    patches = kube_api.requests_where(resource="events", verb="patch")
    assert len(creates) == 3 and len(patches) == 3 and all(r.content_type == MERGE_PATCH for r in patches)
    assert all(set(r.body) == {"series"} for r in patches)  # the only field an API server lets a repeat change


async def test_a_full_event_queue_drops_instead_of_blocking() -> None:
    async with ApiClient() as api_client:
        recorder = EventRecorder(api_client, "i", queue_size=2)  # nothing sends: the queue fills
        with anyio.fail_after(1):
            for n in range(5):
                recorder.emit(Event("default", "chat", "Normal", "Ready", "Serve", str(n)))
        assert (recorder.pending, recorder.dropped) == (2, 3)
        recorder.close()


async def test_shutdown_removes_endpoints_and_says_the_agent_stopped(kube_api: KubeAPI) -> None:
    applied(kube_api, service_obj())
    async with running(kube_api) as reporter:
        reporter.report(unit_of(kube_api), status("Ready", "Ready", port=18080))
        await settle(reporter)
        await reporter.shutdown(timeout=10)
    assert kube_api.get("Service", "chat") is None
    written = status_of(kube_api)
    assert (written["phase"], written["readyReplicas"]) == ("Pending", 0) and "endpoint" not in written
    assert {c["type"]: c["reason"] for c in written["conditions"]}["Ready"] == "AgentStopped"


async def test_register_reporter_adds_the_report_hook(kube_api: KubeAPI) -> None:
    applied(kube_api, service_obj())
    plugins = load_plugins(entry_points=False)
    async with ApiClient(kube_api.configuration()) as api_client:
        reporter = register_reporter(plugins, api_client, settings(endpoints=False, events=False))
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(reporter.run)
            await plugins.each("report", unit=unit_of(kube_api), status=status("Ready", "Ready", port=18080))
            await settle(reporter)
            tasks.cancel_scope.cancel()
    assert status_of(kube_api)["endpoint"] == "http://192.0.2.10:18080"  # no Service: the host's own URL
    assert kube_api.requests_where(resource="services") == []


class Executors:
    @hookimpl
    def register_executors(self, register: Callable[[Executor], None]) -> None:
        register(FakeServer("healthy"))


async def test_the_pipeline_reports_through_the_hook_from_ready_to_insufficient_memory_to_deleted(
    kube_api: KubeAPI, tmp_path: Path
) -> None:
    model_file = write_tiny_gguf(tmp_path / "m.gguf", TinyShape())
    kube_api.apply(
        {**model_obj(budget="512Mi"), "spec": {"source": str(model_file), "hardware": {"memoryBudget": "512Mi"}}}
    )
    kube_api.apply(service_obj(runtime="healthy"))
    config: dict[str, Any] = {"startup_timeout": 10, "grace_period": 1, "probe_interval": 0.05}
    agent = build_agent(tmp_path / "state", Executors(), model_roots=(tmp_path,), **config)
    send, receive = anyio.create_memory_object_stream[StandaloneEvent](100)

    async def events() -> AsyncIterator[StandaloneEvent]:
        async with receive:
            async for event in receive:
                yield event

    def parsed(kind: str, name: str) -> Any:
        return parse_object(kube_api.get(kind, name), f"api/{kind}/{name}")

    def phase() -> str | None:
        return status_of(kube_api).get("phase")

    async with ApiClient(kube_api.configuration()) as api_client:
        reporter = register_reporter(agent.plugins, api_client, settings())
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(reporter.run)
                tasks.start_soon(agent.run, events())
                await send.send(StandaloneEvent(EventType.ADDED, parsed("Model", "llama")))
                await send.send(StandaloneEvent(EventType.ADDED, parsed("InferenceService", "chat")))
                await until(lambda: phase() == "Ready", timeout=30, what="Ready")
                await until(lambda: kube_api.get("Service", "chat") is not None, what="Service")
                port = agent.runtimes["default/chat"].child.port  # type: ignore[union-attr]
                slice_ = kube_api.get("EndpointSlice", "chat-metal-agent", api_version="discovery.k8s.io/v1")
                assert slice_["ports"][0]["port"] == port and slice_["endpoints"][0]["conditions"]["ready"]
                assert status_of(kube_api)["memory"]["actual"]["rss"] > 0
                await until(lambda: "gguf" in (kube_api.get("Model", "llama").get("status") or {}), what="facts")
                facts = kube_api.get("Model", "llama")["status"]
                assert facts["gguf"]["layerCount"] == TinyShape().n_layer and facts["gguf"]["architecture"] == "llama"
                assert facts["sizeBytes"] == model_file.stat().st_size and "phase" not in facts

                lowered = {**model_obj(), "spec": {"source": str(model_file), "hardware": {"memoryBudget": "1Mi"}}}
                kube_api.apply(lowered)
                await send.send(StandaloneEvent(EventType.MODIFIED, parsed("Model", "llama")))
                await until(lambda: status_of(kube_api).get("schedulingStatus") == "InsufficientMemory")
                assert agent.runtimes["default/chat"].child is None  # the server was stopped
                slice_of = lambda: kube_api.get("EndpointSlice", "chat-metal-agent", api_version="discovery.k8s.io/v1")  # noqa: E731
                await until(lambda: slice_of()["endpoints"] == [], what="the address removed from the slice")

                gone = parsed("InferenceService", "chat")
                kube_api.delete("InferenceService", "chat")
                await send.send(StandaloneEvent(EventType.DELETED, gone))
                await until(lambda: kube_api.get("Service", "chat") is None, what="Service removed")
                assert kube_api.get("EndpointSlice", "chat-metal-agent", api_version="discovery.k8s.io/v1") is None
                await agent.shutdown()
                tasks.cancel_scope.cancel()
    reasons = [e["reason"] for e in sorted(events_in(kube_api), key=lambda e: e["eventTime"])]
    assert reasons[:2] == ["Admitted", "Ready"] and "InsufficientMemory" in reasons


def test_run_flags_reach_the_reporter_settings() -> None:
    from agent.cli import build_parser
    from agent.cli.cmd_run import effective_config
    from agent.engine.plugin_manager import load_plugins
    from agent.kube.report import reporter_settings
    from agent.util.quantity import InvalidValue

    def config_from(args: Any) -> Any:
        return effective_config(args, load_plugins(entry_points=False))[1]

    args = build_parser().parse_args(
        [
            "run",
            "--kube",
            "--agent-name",
            "studio",
            "--advertise-address",
            "192.168.1.20",
            "--no-endpoints",
            "--service-port",
            "80",
            "--proxy-port",
            "9500",
        ]
    )
    chosen = reporter_settings(config_from(args))
    assert (chosen.host_name, chosen.host_ip, chosen.endpoints, chosen.service_port, chosen.proxy_port) == (
        "studio",
        "192.168.1.20",
        False,
        80,
        None,  # --no-endpoints: no listener runs, no Service points at it
    )
    proxied = reporter_settings(config_from(build_parser().parse_args(["run", "--kube", "--proxy-port", "9500"])))
    assert proxied.proxy_port == 9500
    default = reporter_settings(config_from(build_parser().parse_args(["run"])))
    assert default.host_ip is None and default.endpoints and default.service_port == 8080 and default.host_name
    with pytest.raises(InvalidValue, match="--advertise-address needs --kube"):
        config_from(build_parser().parse_args(["run", "--advertise-address", "10.0.0.2"]))


async def test_a_killed_agents_ready_endpoint_is_removed_when_the_unit_no_longer_runs(kube_api: KubeAPI) -> None:
    applied(kube_api, service_obj())
    async with running(kube_api) as reporter:  # the agent before: Ready, then killed (no shutdown)
        reporter.report(unit_of(kube_api), status("Ready", "Ready", port=18080))
        await settle(reporter)
    assert kube_api.get("Service", "chat") is not None
    async with running(kube_api) as reporter:  # the agent after: the unit cannot start now
        reporter.report(unit_of(kube_api), status("Failed", "InsufficientMemory", "needs more"))
        await settle(reporter)
        reporter.report(unit_of(kube_api), status("Failed", "InsufficientMemory", "needs even more"))
        await settle(reporter)
    assert kube_api.get("Service", "chat") is None
    assert kube_api.get("EndpointSlice", "chat-metal-agent", api_version="discovery.k8s.io/v1") is None
    assert len(kube_api.requests_where(resource="services", verb="delete")) == 1  # swept once, not on every status


async def test_other_writers_status_fields_and_conditions_are_kept(kube_api: KubeAPI) -> None:
    theirs = {  # the CRD declares no status field but the agent's: a real server prunes any other one
        "phase": "Pending",
        "conditions": [{"type": "ModelCached", "status": "True", "reason": "Copied"}],
    }
    applied(kube_api, {**service_obj(), "status": theirs})
    async with running(kube_api) as reporter:
        reporter.report(unit_of(kube_api), status("Ready", "Ready", port=18080))
        await settle(reporter)
    written = status_of(kube_api)
    assert written["phase"] == "Ready"
    assert [c["type"] for c in written["conditions"]] == ["Admitted", "Ready", "EndpointRegistered", "ModelCached"]
