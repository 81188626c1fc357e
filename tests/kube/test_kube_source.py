"""The Kubernetes source: backoff, settings, the ownership filter and resync diff, and the real client against the
fake API (list, watch, resume, bookmarks, 410 re-list, failures)."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import pytest
from anyio.abc import ObjectReceiveStream
from kubeapi import KubeAPI, RecordedRequest

from agent.cli import build_parser
from agent.config.kube_settings import (
    KubeSettings,
    check_label_selector,
    default_accelerators,
    parse_accelerators,
    parse_only,
)
from agent.config.loading import all_settings, load
from agent.kube import flags
from agent.kube.ownership import Ownership, Visibility, api_path
from agent.kube.source import ConfigError, KubeSource, load_configuration
from agent.kube.watch_loop import backoff_delay
from agent.sources.manifest import ModelSpec, ServiceSpec
from agent.sources.standalone import SYNCED, Event, EventType, Synced
from agent.sources.units import ServingUnit
from agent.util.quantity import InvalidValue

API = "inference.llmkube.dev/v1alpha1"


def model(name: str, accelerator: str = "cpu", namespace: str = "default", **extra: Any) -> dict[str, Any]:
    meta = {"name": name, "namespace": namespace, **extra.pop("meta", {})}
    return {"apiVersion": API, "kind": "Model", "metadata": meta,
            "spec": {"source": f"/m/{name}.gguf", "hardware": {"accelerator": accelerator, **extra}}}  # fmt: skip


def service(name: str, model_ref: str | None = None, namespace: str = "default", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "InferenceService", "metadata": {"name": name, "namespace": namespace},
            "spec": {"modelRef": model_ref or name, **spec}}  # fmt: skip


def summary(events: list[Event]) -> list[tuple[str, str, str]]:
    return [(e.type.value, type(e.obj).__name__, e.obj.name) for e in events]


# ---------------------------------------------------------------- backoff and settings


def test_backoff_is_exponential_capped_and_jittered() -> None:
    assert [backoff_delay(n, 0.5, 30, rand=lambda: 1.0) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert backoff_delay(20, 0.5, 30, rand=lambda: 1.0) == 30 and backoff_delay(20, 0.5, 30, rand=lambda: 0.0) == 15
    assert 15 <= backoff_delay(100_000, 0.5, 30) <= 30  # a long outage never overflows
    delays = {backoff_delay(5, 0.5, 30) for _ in range(50)}
    assert len(delays) > 1 and all(4.0 <= d <= 8.0 for d in delays)


def test_settings_validate_every_flag_with_its_name() -> None:
    assert parse_accelerators(["metal,cpu", "metal"]) == ("metal", "cpu")
    with pytest.raises(InvalidValue, match="--accelerators: 'gpu' is not one of"):
        parse_accelerators(["gpu"])
    assert parse_only(["default/a,ml/b", "default/a"]) == {"default/a", "ml/b"}
    for bad in ("a", "Default/a", "default/", "/a", "default/a_b"):
        with pytest.raises(InvalidValue, match="--only"):
            parse_only([bad])
    for good in ("app=llm", "app==llm,tier!=web", "tier in (gpu, cpu)", "x notin (a),!y,z", "example.com/node=mac-1"):
        assert check_label_selector(good) == good
    for bad in ("app=(", "in (a)", "app=a b", "=x"):
        with pytest.raises(InvalidValue, match="--label-selector"):
            check_label_selector(bad)


def test_default_accelerators_follow_the_platform() -> None:
    assert default_accelerators("Darwin") == ("metal", "cpu")
    assert default_accelerators("Linux", has_nvidia_gpu=True) == ("cuda",)
    assert default_accelerators("Linux", has_nvidia_gpu=False) == ("cpu",)


def parse_run(*argv: str) -> argparse.Namespace:
    """The effective settings of `metal-agent run ARGV`, as the run command sees them."""
    args = build_parser().parse_args(["run", *argv])
    vars(args).update(load(args, all_settings()).values())
    return args


def test_flags_make_settings_and_refuse_kube_flags_without_kube() -> None:
    settings = flags.settings_from(parse_run("--kube", "--namespace", "ml", "--only", "ml/a,ml/b", "--only", "ml/c",
                                             "--accelerators", "metal", "--label-selector", "node=mac-1"))  # fmt: skip
    assert settings == KubeSettings(namespace="ml", only=frozenset({"ml/a", "ml/b", "ml/c"}),
                                    accelerators=("metal",), label_selector="node=mac-1")  # fmt: skip
    assert flags.settings_from(parse_run()) is None
    with pytest.raises(InvalidValue, match="--namespace needs --kube"):
        flags.settings_from(parse_run("--namespace", "ml"))
    with pytest.raises(InvalidValue, match="--namespace and --all-namespaces exclude each other"):
        flags.settings_from(parse_run("--kube", "--namespace", "ml", "--all-namespaces"))


# ---------------------------------------------------------------- ownership and the resync diff


def test_first_listing_adds_owned_objects_models_first() -> None:
    view = Visibility(Ownership(frozenset({"metal", "cpu"})))
    assert view.listed("InferenceService", [service("a"), service("gpu")]) == []  # their Models are not known yet
    events = view.listed("Model", [model("a"), model("gpu", accelerator="cuda")])
    assert summary(events) == [("ADDED", "ModelSpec", "a"), ("ADDED", "ServiceSpec", "a")]
    assert events[0].obj.origin == api_path("Model", "default", "a")


def test_status_and_metadata_only_changes_yield_nothing_and_spec_changes_modify() -> None:
    view = Visibility(Ownership(frozenset({"cpu"})))
    view.listed("Model", [model("a")])
    view.listed("InferenceService", [service("a")])
    touched = model("a", meta={"generation": 7, "resourceVersion": "99", "labels": {"x": "y"}})
    assert view.changed("Model", "MODIFIED", {**touched, "status": {"phase": "Ready"}}) == []
    events = view.changed("Model", "MODIFIED", model("a", memoryBudget="1Gi"))
    assert summary(events) == [("MODIFIED", "ModelSpec", "a")]
    assert isinstance(events[0].obj, ModelSpec) and events[0].obj.memory_budget == "1Gi"


def test_relist_reconciles_deleted_changed_and_new_objects() -> None:
    view = Visibility(Ownership(frozenset({"cpu"})))
    view.listed("Model", [model("keep"), model("gone"), model("changed")])
    events = view.listed("Model", [model("keep"), model("changed", memoryBudget="2Gi"), model("new")])
    assert sorted(summary(events)) == [("ADDED", "ModelSpec", "new"), ("DELETED", "ModelSpec", "gone"),
                                       ("MODIFIED", "ModelSpec", "changed")]  # fmt: skip


def test_a_model_moved_to_another_accelerator_takes_its_services_away() -> None:
    view = Visibility(Ownership(frozenset({"metal"})))
    view.listed("Model", [model("a", accelerator="metal")])
    view.listed("InferenceService", [service("a")])
    events = view.changed("Model", "MODIFIED", model("a", accelerator="cuda"))
    assert summary(events) == [("DELETED", "ModelSpec", "a"), ("DELETED", "ServiceSpec", "a")]
    events = view.changed("Model", "MODIFIED", model("a", accelerator="metal"))
    assert summary(events) == [("ADDED", "ModelSpec", "a"), ("ADDED", "ServiceSpec", "a")]


def test_allowlist_limits_services_and_shows_a_named_one_without_its_model() -> None:
    view = Visibility(Ownership(frozenset({"cpu"}), only=frozenset({"default/mine", "default/orphan"})))
    view.listed("Model", [model("mine"), model("theirs")])
    events = view.listed("InferenceService", [service("mine"), service("theirs"), service("orphan")])
    assert summary(events) == [("ADDED", "ServiceSpec", "mine"), ("ADDED", "ServiceSpec", "orphan")]
    unlisted = Visibility(Ownership(frozenset({"cpu"})))
    assert unlisted.listed("InferenceService", [service("orphan")]) == []  # maybe another agent's: not reported


def test_invalid_objects_are_reported_skipped_and_keep_their_last_good_version() -> None:
    view = Visibility(Ownership(frozenset({"cpu"})))
    view.listed("Model", [model("a")])
    where = api_path("Model", "default", "a")
    assert view.changed("Model", "MODIFIED", model("a", memoryBudget="-1Gi")) == []
    assert "memoryBudget" in view.errors[where] and ("ModelSpec", "default", "a") in view.visible
    fixed = view.changed("Model", "MODIFIED", model("a", memoryBudget="1Gi"))
    assert summary(fixed) == [("MODIFIED", "ModelSpec", "a")]
    assert where not in view.errors
    view.changed("Model", "ADDED", model("b", memoryFraction=2))
    assert api_path("Model", "default", "b") in view.errors and ("ModelSpec", "default", "b") not in view.raw
    view.changed("Model", "DELETED", model("b", memoryFraction=2))
    assert not view.errors


def test_an_object_being_deleted_stops_being_served_at_once() -> None:
    view = Visibility(Ownership(frozenset({"cpu"})))
    view.listed("Model", [model("a")])
    events = view.changed("Model", "MODIFIED", model("a", meta={"deletionTimestamp": "2026-01-01T00:00:00Z"}))
    assert summary(events) == [("DELETED", "ModelSpec", "a")]


# ---------------------------------------------------------------- the source with the real client


class Running:
    def __init__(self, source: KubeSource, receive: ObjectReceiveStream[Event | Synced]) -> None:
        self.source, self.receive = source, receive

    async def take(self, count: int, timeout: float = 10) -> list[Event | Synced]:
        with anyio.fail_after(timeout):
            return [await self.receive.receive() for _ in range(count)]

    async def until(self, predicate: Callable[[], bool], timeout: float = 10) -> None:
        with anyio.fail_after(timeout):
            while not predicate():
                await anyio.sleep(0.01)


@pytest.fixture
async def running(kube_api: KubeAPI, request: pytest.FixtureRequest) -> AsyncIterator[Running]:
    overrides = getattr(request, "param", {})
    settings = KubeSettings(namespace="default", accelerators=("cpu",), backoff_base=0.02, backoff_cap=0.1,
                            **overrides)  # fmt: skip
    source = KubeSource(settings, kube_api.configuration(), "default")
    send, receive = anyio.create_memory_object_stream[Event | Synced](1000)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(source.run, send)
        yield Running(source, receive)
        tasks.cancel_scope.cancel()


def verbs(kube_api: KubeAPI, verb: str) -> list[RecordedRequest]:
    return [r for r in kube_api.requests if r.verb == verb and r.resource in ("models", "inferenceservices")]


@pytest.fixture
def populated(kube_api: KubeAPI) -> KubeAPI:
    for name in ("a", "b"):
        kube_api.apply(model(name))
        kube_api.apply(service(name))
    kube_api.apply(model("other", namespace="elsewhere"))
    return kube_api


@pytest.mark.anyio
async def test_lists_then_synced_then_watches_from_the_listing(populated: KubeAPI, running: Running) -> None:
    events = await running.take(5)
    assert events[-1] is SYNCED
    assert sorted(summary(events[:4])) == [("ADDED", "ModelSpec", "a"), ("ADDED", "ModelSpec", "b"),  # type: ignore[arg-type]
                                           ("ADDED", "ServiceSpec", "a"), ("ADDED", "ServiceSpec", "b")]  # fmt: skip
    await running.until(lambda: populated.open_watches == 2)
    lists, watches = verbs(populated, "list"), verbs(populated, "watch")
    assert [r.namespace for r in lists + watches] == ["default"] * 4
    for watch in watches:
        assert watch.query["allowWatchBookmarks"] == "True" and int(watch.query["timeoutSeconds"]) == 300
        assert watch.query["resourceVersion"] == next(r for r in lists if r.resource == watch.resource).query.get(
            "resourceVersion", str(populated.resource_version))  # fmt: skip
    status = running.source.status()
    assert status["synced"] and status["kinds"]["models"]["connected"] and status["objects"] == {"seen": 4, "served": 4}


@pytest.mark.anyio
async def test_changes_flow_and_status_writes_yield_nothing(populated: KubeAPI, running: Running) -> None:
    first = await running.take(5)
    assert first[-1] is SYNCED and sorted(summary(first[:4]))[0] == ("ADDED", "ModelSpec", "a")  # type: ignore[arg-type]
    await running.until(lambda: populated.open_watches == 2)
    populated.apply({**model("a"), "status": {"phase": "Ready"}})  # the agent's own kind of write: status only
    populated.apply(model("b", memoryBudget="1Gi"))
    populated.delete("InferenceService", "a")
    events = await running.take(2)
    assert summary(events) == [("MODIFIED", "ModelSpec", "b"), ("DELETED", "ServiceSpec", "a")]  # type: ignore[arg-type]
    assert len(verbs(populated, "list")) == 2  # one per kind: everything after came through the watch


@pytest.mark.anyio
@pytest.mark.parametrize("running", [{"watch_timeout": 1}], indirect=True)
async def test_a_timed_out_watch_resumes_from_the_last_resource_version(populated: KubeAPI, running: Running) -> None:
    await running.take(5)
    populated.apply(model("b", memoryBudget="1Gi"))
    assert summary(await running.take(1)) == [("MODIFIED", "ModelSpec", "b")]  # type: ignore[arg-type]
    await running.until(lambda: len(verbs(populated, "watch")) >= 4)  # each kind watched again after timeoutSeconds
    models = [w for w in verbs(populated, "watch") if w.resource == "models"]
    assert models[1].query["resourceVersion"] == str(populated.resource_version)
    assert len(verbs(populated, "list")) == 2 and running.source.states["Model"].reconnects == 0


@pytest.mark.anyio
async def test_bookmarks_advance_the_resource_version(populated: KubeAPI, running: Running) -> None:
    await running.take(5)
    await running.until(lambda: populated.open_watches == 2)
    populated.apply(model("unseen", namespace="elsewhere"))  # not in the watched namespace: no event, a new version
    populated.send_bookmarks()
    state = running.source.states["Model"]
    await running.until(lambda: state.resource_version == str(populated.resource_version))


@pytest.mark.anyio
async def test_gone_relists_and_reconciles_what_changed_while_disconnected(
    populated: KubeAPI, running: Running
) -> None:
    await running.take(5)
    await running.until(lambda: populated.open_watches == 2)
    populated.fail_next(10_000, when=lambda r: r.verb == "watch")  # keep the source away
    populated.disconnect_watches()
    await running.until(lambda: populated.open_watches == 0 and not running.source.states["Model"].connected)
    populated.delete("InferenceService", "a")
    populated.delete("Model", "a")
    populated.apply(model("b", memoryBudget="2Gi"))
    populated.apply(model("c"))
    populated.apply(service("c"))
    populated.compact()  # those events are no longer in the server's history
    populated.clear_faults()
    events = await running.take(5)
    assert sorted(summary(events)) == [  # type: ignore[arg-type]
        ("ADDED", "ModelSpec", "c"), ("ADDED", "ServiceSpec", "c"), ("DELETED", "ModelSpec", "a"),
        ("DELETED", "ServiceSpec", "a"), ("MODIFIED", "ModelSpec", "b"),
    ]  # fmt: skip
    assert len(verbs(populated, "list")) == 4  # the re-list of each kind
    assert running.source.states["Model"].reconnects >= 1 and "410" in (running.source.states["Model"].last_error or "")
    await running.until(lambda: populated.open_watches == 2)


@pytest.mark.anyio
async def test_server_errors_back_off_and_never_end_the_source(kube_api: KubeAPI, running: Running) -> None:
    kube_api.fail_next(6, status=503)
    await running.until(lambda: running.source.synced)
    assert [r.status for r in verbs(kube_api, "list")].count(503) >= 1
    state = running.source.states["Model"]
    assert state.last_error and "503" in state.last_error
    assert await running.take(1) == [SYNCED]
    kube_api.apply(model("late"))
    assert summary(await running.take(1)) == [("ADDED", "ModelSpec", "late")]  # type: ignore[arg-type]


@pytest.fixture
def labelled(kube_api: KubeAPI) -> KubeAPI:
    for name, node in (("mine", "mac-1"), ("theirs", "mac-2")):
        kube_api.apply(model(name))  # Models need no label: they follow their services
        kube_api.apply({**service(name), "metadata": {"name": name, "namespace": "default", "labels": {"node": node}}})
    return kube_api


@pytest.mark.anyio
@pytest.mark.parametrize("running", [{"label_selector": "node=mac-1"}], indirect=True)
async def test_label_selector_picks_services_on_the_server(labelled: KubeAPI, running: Running) -> None:
    events = await running.take(4)
    assert events[-1] is SYNCED
    assert summary(events[:3]) == [("ADDED", "ModelSpec", "mine"), ("ADDED", "ModelSpec", "theirs"),  # type: ignore[arg-type]
                                   ("ADDED", "ServiceSpec", "mine")]  # fmt: skip
    await running.until(lambda: labelled.open_watches == 2)
    requests = verbs(labelled, "list") + verbs(labelled, "watch")
    assert {r.query.get("labelSelector") for r in requests if r.resource == "inferenceservices"} == {"node=mac-1"}
    assert {r.query.get("labelSelector") for r in requests if r.resource == "models"} == {None}


@pytest.mark.anyio
async def test_configuration_from_a_kubeconfig_context(kube_api: KubeAPI, tmp_path: Any) -> None:
    path = kube_api.write_kubeconfig(tmp_path / "config", context="lab", namespace="ml")
    configuration, namespace = await load_configuration(KubeSettings(kubeconfig=path, context="lab"))
    assert configuration.host == kube_api.url and namespace == "ml"
    with pytest.raises(ConfigError, match="--context nope"):
        await load_configuration(KubeSettings(kubeconfig=path, context="nope"))
    with pytest.raises(ConfigError, match="--kubeconfig"):
        await load_configuration(KubeSettings(kubeconfig=tmp_path / "missing"))


@pytest.mark.anyio
async def test_configuration_from_kubeconfig_files_listed_in_the_environment(
    kube_api: KubeAPI, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = tmp_path / "first"
    first.write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n")
    second = kube_api.write_kubeconfig(tmp_path / "second", context="lab", namespace="ml")
    monkeypatch.setenv("KUBECONFIG", f"{first}:{second}")
    configuration, namespace = await load_configuration(KubeSettings(context="lab"))
    assert configuration.host == kube_api.url and namespace == "ml"
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ConfigError, match="not running in a cluster"):
        await load_configuration(KubeSettings())


def test_service_spec_is_what_the_pipeline_gets() -> None:
    view = Visibility(Ownership(frozenset({"cpu"})))
    view.listed("Model", [model("a")])
    events = view.listed("InferenceService", [service("a", contextSize=2048)])
    assert events == [Event(EventType.ADDED, view.visible[("ServiceSpec", "default", "a")])]
    assert isinstance(events[0].obj, ServiceSpec) and events[0].obj.context_size == 2048


@pytest.mark.anyio
async def test_the_first_view_is_one_snapshot_models_first(kube_api: KubeAPI) -> None:
    kube_api.apply(model("a"))
    kube_api.apply(service("a"))
    kube_api.fail_next(1, when=lambda r: r.verb == "list" and r.resource == "models")  # services are listed first
    settings = KubeSettings(namespace="default", accelerators=("cpu",), only=frozenset({"default/a"}),
                            backoff_base=0.05, backoff_cap=0.1)  # fmt: skip
    source = KubeSource(settings, kube_api.configuration(), "default")
    send, receive = anyio.create_memory_object_stream[Event | Synced](100)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(source.run, send)
        with anyio.fail_after(10):
            first = [await receive.receive() for _ in range(3)]
        tasks.cancel_scope.cancel()
    lists = [(r.resource, r.status) for r in kube_api.requests if r.verb == "list"]
    assert lists.index(("inferenceservices", 200)) < lists.index(("models", 200))
    assert summary(first[:2]) == [("ADDED", "ModelSpec", "a"), ("ADDED", "ServiceSpec", "a")]  # type: ignore[arg-type]
    assert first[2] is SYNCED


def test_the_unit_spec_hash_ignores_generation_origin_and_status() -> None:
    view = Visibility(Ownership(frozenset({"cpu"})))
    view.listed("Model", [model("a")])
    view.listed("InferenceService", [service("a")])
    before = ServingUnit(view.visible[("ServiceSpec", "default", "a")], view.visible[("ModelSpec", "default", "a")])
    later = Visibility(Ownership(frozenset({"cpu"})))
    later.listed("Model", [{**model("a", meta={"generation": 9, "resourceVersion": "5"}), "status": {"x": 1}}])
    later.listed("InferenceService", [service("a")])
    after = ServingUnit(later.visible[("ServiceSpec", "default", "a")], later.visible[("ModelSpec", "default", "a")])
    assert after.model.generation == 9 and before.spec_hash() == after.spec_hash()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--namespace", "ml"], "error: --namespace needs --kube"),
        (["--proxy-port", "9500"], "error: --proxy-port needs --kube"),
        (["--kube", "--proxy-port", "0"], "error: --proxy-port"),
        (["--kube", "--only", "nope"], "error: --only: 'nope' is not namespace/name"),
        (["--kube", "--accelerators", "tpu"], "error: --accelerators: 'tpu' is not one of"),
        (["--kube", "--label-selector", "a=("], "error: --label-selector"),
        (["--kube", "--kubeconfig", "/nonexistent/kubeconfig"], "error: --kubeconfig /nonexistent/kubeconfig"),
        # An API server refuses these in an EndpointSlice: refused at start, not retried in a loop.
        (["--kube", "--advertise-address", "127.0.0.1"], "error: --advertise-address: 127.0.0.1 cannot be reached"),
        (["--kube", "--advertise-address", "::1", "--no-endpoints"], "error: --advertise-address: ::1 cannot be"),
        (["--kube", "--advertise-address", "169.254.1.2"], "error: --advertise-address: 169.254.1.2 cannot be"),
        (["--kube", "--advertise-address", "0.0.0.0"], "error: --advertise-address: 0.0.0.0 cannot be reached"),
    ],
)
def test_run_refuses_bad_kubernetes_flags_with_exit_status_2(
    argv: list[str], message: str, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.cli import main

    assert main(["run", "--state-dir", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1  # one line


@pytest.mark.anyio
async def test_an_unreachable_server_is_retried_not_fatal() -> None:
    from kubernetes_asyncio.client import Configuration

    from agent.processes.ports import free_port

    settings = KubeSettings(namespace="default", accelerators=("cpu",), backoff_base=0.01, backoff_cap=0.05)
    source = KubeSource(settings, Configuration(host=f"http://127.0.0.1:{free_port()}"), "default")
    send, _receive = anyio.create_memory_object_stream[Event | Synced](100)
    state = source.states["Model"]
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(source.run, send)
        with anyio.fail_after(10):
            while not (state.last_error and "Connect" in state.last_error):
                await anyio.sleep(0.01)
            errors = state.last_error_time
            while state.last_error_time == errors:  # it keeps trying
                await anyio.sleep(0.01)
        tasks.cancel_scope.cancel()
    assert not state.connected and not source.synced and "Connect" in (state.last_error or "")


@pytest.mark.anyio
async def test_an_api_server_restart_after_compaction_is_429_then_410_then_a_relist(
    populated: KubeAPI, running: Running
) -> None:
    await running.take(5)
    await running.until(lambda: populated.open_watches == 2)
    populated.restart(unavailable=3)
    populated.apply(model("b", memoryBudget="1Gi"))  # changed while the server was away
    assert summary(await running.take(1)) == [("MODIFIED", "ModelSpec", "b")]  # type: ignore[arg-type]
    answered = [r.status for r in populated.requests if r.resource in ("models", "inferenceservices")]
    assert answered.count(429) == 3 and len(verbs(populated, "list")) >= 3  # re-listed after the 410
    await running.until(lambda: populated.open_watches == 2)


@pytest.mark.anyio
async def test_a_delete_held_by_a_finalizer_stops_the_service_at_once(populated: KubeAPI, running: Running) -> None:
    await running.take(5)
    await running.until(lambda: populated.open_watches == 2)
    held = service("a")
    held["metadata"]["finalizers"] = ["example.com/keep"]
    populated.apply(held)
    populated.delete("InferenceService", "a")  # only marks it: deletionTimestamp
    assert summary(await running.take(1)) == [("DELETED", "ServiceSpec", "a")]  # type: ignore[arg-type]
    populated.remove_finalizers("InferenceService", "a")  # now really gone: nothing more to tell the pipeline
    populated.apply(model("b", memoryBudget="1Gi"))
    assert summary(await running.take(1)) == [("MODIFIED", "ModelSpec", "b")]  # type: ignore[arg-type]
