"""The fake Kubernetes API (tests/kubeapi.py) checked with the real kubernetes-asyncio client over real HTTP, so a
fixture bug cannot hide an agent bug."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anyio
import pytest
from kubeapi import KubeAPI
from kubeapi_store import RESOURCES, ApiError, json_patch, merge_patch, parse_label_selector
from kubernetes_asyncio import client, watch

pytestmark = pytest.mark.anyio
GROUP, VERSION = "inference.llmkube.dev", "v1alpha1"
MERGE = "application/merge-patch+json"


def model(name: str, namespace: str = "default", labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Model",
            "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
            "spec": {"source": f"/m/{name}.gguf", **spec}}  # fmt: skip


@pytest.fixture
async def api(kube_api: KubeAPI) -> AsyncIterator[client.CustomObjectsApi]:
    async with client.ApiClient(kube_api.configuration()) as api_client:
        yield client.CustomObjectsApi(api_client)


async def create(api: client.CustomObjectsApi, obj: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = await api.create_namespaced_custom_object(
        GROUP, VERSION, obj["metadata"]["namespace"], "models", obj
    )
    return result


async def events(api: client.CustomObjectsApi, **kwargs: Any) -> list[tuple[str, str, str]]:
    """(type, name, resourceVersion) of a whole watch stream (it must end by timeoutSeconds)."""
    namespace = kwargs.pop("namespace", "default")
    seen = []
    async with watch.Watch() as w:
        call = api.list_namespaced_custom_object if namespace else api.list_cluster_custom_object
        args = (GROUP, VERSION, namespace, "models") if namespace else (GROUP, VERSION, "models")
        async for event in w.stream(call, *args, timeout_seconds=kwargs.pop("timeout_seconds", 1), **kwargs):
            obj = event["raw_object"]
            seen.append((event["type"], obj["metadata"].get("name", ""), obj["metadata"]["resourceVersion"]))
    return seen


async def test_create_answers_201_with_server_metadata_and_one_monotonic_resource_version(
    kube_api: KubeAPI, api: client.CustomObjectsApi
) -> None:
    a = await create(api, model("a"))
    b = await create(api, model("b"))
    assert kube_api.requests_where(verb="create")[0].status == 201
    assert int(b["metadata"]["resourceVersion"]) > int(a["metadata"]["resourceVersion"])
    assert a["metadata"]["generation"] == 1 and a["metadata"]["uid"] and a["metadata"]["creationTimestamp"]
    listing = await api.list_namespaced_custom_object(GROUP, VERSION, "default", "models")
    assert listing["metadata"]["resourceVersion"] == b["metadata"]["resourceVersion"]
    assert [i["metadata"]["name"] for i in listing["items"]] == ["a", "b"]
    with pytest.raises(client.ApiException) as exists:
        await create(api, model("a"))
    assert exists.value.status == 409


async def test_watch_true_spelling_replays_history_after_the_resource_version(
    kube_api: KubeAPI, api: client.CustomObjectsApi
) -> None:
    a = await create(api, model("a"))
    await create(api, model("b"))
    await api.delete_namespaced_custom_object(GROUP, VERSION, "default", "models", "a")
    seen = await events(api, resource_version=a["metadata"]["resourceVersion"])
    assert [(t, n) for t, n, _ in seen] == [("ADDED", "b"), ("DELETED", "a")]
    assert kube_api.requests_where(verb="watch")[0].query["watch"] == "True"
    # without a resourceVersion: the current objects as ADDED
    assert [(t, n) for t, n, _ in await events(api)] == [("ADDED", "b")]


async def test_live_events_reach_an_open_watch(kube_api: KubeAPI, api: client.CustomObjectsApi) -> None:
    start = kube_api.resource_version
    seen: list[tuple[str, str]] = []
    async with anyio.create_task_group() as tg:

        async def watcher() -> None:
            seen.extend((t, n) for t, n, _ in await events(api, resource_version=str(start), timeout_seconds=3))

        tg.start_soon(watcher)
        with anyio.fail_after(5):
            while kube_api.open_watches == 0:
                await anyio.sleep(0.01)
        kube_api.apply(model("live"))
        kube_api.apply(model("live", contextSize=1))
        kube_api.delete("Model", "live")
        kube_api.end_watches()
    assert seen == [("ADDED", "live"), ("MODIFIED", "live"), ("DELETED", "live")]


async def test_gone_when_the_resource_version_is_older_than_the_history(
    kube_api: KubeAPI, api: client.CustomObjectsApi
) -> None:
    a = await create(api, model("a"))
    await create(api, model("b"))
    kube_api.compact()
    with pytest.raises(client.ApiException) as gone:
        await events(api, resource_version=a["metadata"]["resourceVersion"])
    assert gone.value.status == 410
    # the current resourceVersion is still fine
    assert await events(api, resource_version=str(kube_api.resource_version)) == []
    bounded = KubeAPI(history_limit=2).store
    first = bounded.rv
    for name in "abc":
        bounded.create(RESOURCES[0], "default", model(name))
    with pytest.raises(ApiError):
        bounded.since(first)
    assert [c.obj["metadata"]["name"] for c in bounded.since(first + 1)] == ["b", "c"]


@pytest.mark.parametrize("mode", ["event", "http"])
async def test_gone_can_be_forced_on_the_next_watch(kube_api: KubeAPI, api: client.CustomObjectsApi, mode: str) -> None:
    kube_api.gone_next_watch(mode=mode)
    with pytest.raises(client.ApiException) as gone:
        await events(api, resource_version=str(kube_api.resource_version))
    assert gone.value.status == 410
    assert kube_api.requests_where(verb="watch")[-1].status == (200 if mode == "event" else 410)
    assert await events(api, resource_version=str(kube_api.resource_version)) == []  # only the next one


async def test_bookmarks_only_when_allowed_and_timeout_ends_the_stream(
    kube_api: KubeAPI, api: client.CustomObjectsApi
) -> None:
    await create(api, model("a"))
    rv = str(kube_api.resource_version)
    with anyio.fail_after(5):
        assert await events(api, resource_version=rv, timeout_seconds=1) == []
        seen = await events(api, resource_version=rv, timeout_seconds=1, allow_watch_bookmarks=True)
    assert seen and all(t == "BOOKMARK" and r == rv for t, _, r in seen)


async def test_bookmark_never_skips_an_undelivered_event(kube_api: KubeAPI, api: client.CustomObjectsApi) -> None:
    start = str(kube_api.resource_version)
    seen: list[tuple[str, str, str]] = []
    async with anyio.create_task_group() as tg:

        async def watcher() -> None:
            seen.extend(await events(api, resource_version=start, timeout_seconds=3, allow_watch_bookmarks=True))

        tg.start_soon(watcher)
        with anyio.fail_after(5):
            while kube_api.open_watches == 0:
                await anyio.sleep(0.01)
        created = kube_api.apply(model("a"))
        kube_api.send_bookmarks()
        kube_api.end_watches()
    rv = created["metadata"]["resourceVersion"]
    assert ("ADDED", "a", rv) in seen
    bookmarks = [int(r) for t, _, r in seen if t == "BOOKMARK"]
    assert bookmarks and bookmarks[-1] == int(rv) and seen.index(("ADDED", "a", rv)) < len(seen) - 1


def test_label_selector_operators() -> None:
    labels = {"app": "llm", "tier": "gpu"}
    assert parse_label_selector("app=llm")(labels) and parse_label_selector("app==llm")(labels)
    assert not parse_label_selector("app!=llm")(labels) and parse_label_selector("app!=web")(labels)
    assert parse_label_selector("tier in (gpu, cpu)")(labels) and not parse_label_selector("tier notin (gpu)")(labels)
    assert parse_label_selector("app,!missing")(labels) and not parse_label_selector("missing")(labels)
    assert parse_label_selector("app=llm,tier in (gpu,x),!other")(labels)
    with pytest.raises(ApiError):
        parse_label_selector("app=(")


async def test_label_selector_on_list_and_watch_with_transitions(
    kube_api: KubeAPI, api: client.CustomObjectsApi
) -> None:
    await create(api, model("mine", labels={"owner": "mac-1"}))
    await create(api, model("other", labels={"owner": "mac-2"}))
    listing = await api.list_namespaced_custom_object(GROUP, VERSION, "default", "models", label_selector="owner=mac-1")
    assert [i["metadata"]["name"] for i in listing["items"]] == ["mine"]
    rv = listing["metadata"]["resourceVersion"]
    kube_api.apply(model("other", labels={"owner": "mac-1"}))  # starts matching: ADDED
    kube_api.apply(model("mine", labels={"owner": "mac-3"}))  # stops matching: DELETED
    seen = await events(api, resource_version=rv, label_selector="owner in (mac-1)")
    assert [(t, n) for t, n, _ in seen] == [("ADDED", "other"), ("DELETED", "mine")]


async def test_cluster_wide_list_and_watch_cover_every_namespace(
    kube_api: KubeAPI, api: client.CustomObjectsApi
) -> None:
    kube_api.create_namespace("one")
    kube_api.create_namespace("two")
    await create(api, model("a", namespace="one"))
    await create(api, model("b", namespace="two"))
    listing = await api.list_cluster_custom_object(GROUP, VERSION, "models")
    assert sorted(i["metadata"]["namespace"] for i in listing["items"]) == ["one", "two"]
    assert [n for _, n, _ in await events(api, namespace=None)] == ["a", "b"]
    assert [n for _, n, _ in await events(api, namespace="two")] == ["b"]


async def test_status_subresource_merge_patch_and_real_server_rejections(
    kube_api: KubeAPI, api: client.CustomObjectsApi
) -> None:
    created = await create(api, model("a"))
    body = {"status": {"phase": "Ready"}}
    with pytest.raises(client.ApiException) as json_patched:  # the client's default for a dict body
        await api.patch_namespaced_custom_object_status(GROUP, VERSION, "default", "models", "a", body)
    assert json_patched.value.status == 400 and "jsonpatch.Patch" in json_patched.value.body
    assert kube_api.requests[-1].content_type == "application/json-patch+json"
    patched = await api.patch_namespaced_custom_object_status(
        GROUP, VERSION, "default", "models", "a", {**body, "spec": {"source": "/x"}}, _content_type=MERGE
    )
    assert patched["status"] == {"phase": "Ready"} and patched["spec"] == created["spec"]  # only status changes
    assert patched["metadata"]["generation"] == 1
    assert int(patched["metadata"]["resourceVersion"]) > int(created["metadata"]["resourceVersion"])
    last = kube_api.requests[-1]
    assert (last.verb, last.subresource, last.content_type, last.body) == ("patch", "status", MERGE, body | {
        "spec": {"source": "/x"}})  # fmt: skip
    with pytest.raises(client.ApiException) as strategic:
        await api.api_client.call_api(
            f"/apis/{GROUP}/{VERSION}/namespaces/default/models/a/status", "PATCH", body=body,
            header_params={"Content-Type": "application/strategic-merge-patch+json"}, auth_settings=["BearerToken"],
        )  # fmt: skip
    assert strategic.value.status == 415
    listed = await api.patch_namespaced_custom_object_status(
        GROUP, VERSION, "default", "models", "a", [{"op": "replace", "path": "/status/phase", "value": "Failed"}]
    )
    assert listed["status"] == {"phase": "Failed"}


async def test_generation_counts_spec_changes_only_and_the_main_endpoint_ignores_status(
    kube_api: KubeAPI, api: client.CustomObjectsApi
) -> None:
    await create(api, model("a"))
    args = (GROUP, VERSION, "default", "models", "a")
    labels = {"metadata": {"labels": {"x": "y"}}}
    relabelled = await api.patch_namespaced_custom_object(*args, labels, _content_type=MERGE)
    assert relabelled["metadata"]["generation"] == 1
    respec = await api.patch_namespaced_custom_object(*args, {"spec": {"contextSize": 4096}, "status": {"p": 1}},
                                                      _content_type=MERGE)  # fmt: skip
    assert respec["metadata"]["generation"] == 2 and "status" not in respec
    same_rv = respec["metadata"]["resourceVersion"]
    noop = await api.patch_namespaced_custom_object(*args, {"spec": {"contextSize": 4096}}, _content_type=MERGE)
    assert noop["metadata"]["resourceVersion"] == same_rv
    replaced = await api.replace_namespaced_custom_object(*args, {**respec, "spec": {"source": "/n"}})
    assert replaced["metadata"]["generation"] == 3 and replaced["spec"] == {"source": "/n", "format": "gguf"}
    with pytest.raises(client.ApiException) as stale:
        await api.replace_namespaced_custom_object(*args, respec)
    assert stale.value.status == 409
    no_rv = {**replaced, "metadata": {"name": "a", "namespace": "default"}}
    with pytest.raises(client.ApiException) as unconditional:
        await api.replace_namespaced_custom_object(*args, no_rv)
    assert unconditional.value.status == 422


async def test_core_and_discovery_resources(kube_api: KubeAPI) -> None:
    async with client.ApiClient(kube_api.configuration()) as api_client:
        core, events_v1 = client.CoreV1Api(api_client), client.EventsV1Api(api_client)
        discovery = client.DiscoveryV1Api(api_client)
        kube_api.create_namespace("ns")
        svc = await core.create_namespaced_service("ns", {"metadata": {"name": "s"}, "spec": {"ports": [{"port": 80}]}})
        assert svc.metadata.namespace == "ns" and kube_api.requests[-1].status == 201
        await core.patch_namespaced_service("s", "ns", {"metadata": {"labels": {"a": "b"}}})  # strategic: accepted
        assert (await core.read_namespaced_service("s", "ns")).metadata.labels == {"a": "b"}
        await core.create_namespaced_event("ns", {"metadata": {"name": "e1"}, "involvedObject": {"name": "s"}})
        await events_v1.create_namespaced_event("ns", {"metadata": {"name": "e2"}, "type": "Normal",
                                                       "eventTime": "2026-01-01T00:00:00.000000Z", "reason": "Ready",
                                                       "action": "Serve", "reportingController": "x/y",
                                                       "reportingInstance": "y"})  # fmt: skip
        assert kube_api.get("Event", "e1", "ns") and kube_api.get("Event", "e2", "ns", api_version="events.k8s.io/v1")
        slice_ = {"metadata": {"name": "s-1", "labels": {"kubernetes.io/service-name": "s"}},
                  "addressType": "IPv4", "endpoints": [{"addresses": ["10.0.0.1"]}]}  # fmt: skip
        await discovery.create_namespaced_endpoint_slice("ns", slice_)
        found = await discovery.list_namespaced_endpoint_slice("ns", label_selector="kubernetes.io/service-name=s")
        assert [s.metadata.name for s in found.items] == ["s-1"]
        await discovery.delete_namespaced_endpoint_slice("s-1", "ns")
        await core.delete_namespaced_service("s", "ns")
        assert kube_api.get("Service", "s", "ns") is None and kube_api.get("EndpointSlice", "s-1", "ns") is None
        with pytest.raises(client.ApiException) as missing:
            await core.read_namespaced_service("s", "ns")
        assert missing.value.status == 404


async def test_injected_failures_and_dropped_watches(kube_api: KubeAPI, api: client.CustomObjectsApi) -> None:
    kube_api.fail_next(2, status=503)
    for _ in range(2):
        with pytest.raises(client.ApiException) as failed:
            await api.list_namespaced_custom_object(GROUP, VERSION, "default", "models")
        assert failed.value.status == 503
    await api.list_namespaced_custom_object(GROUP, VERSION, "default", "models")
    assert [r.status for r in kube_api.requests_where(verb="list")] == [503, 503, 200]

    errors: list[BaseException] = []
    async with anyio.create_task_group() as tg:

        async def watcher() -> None:
            try:
                await events(api, resource_version=str(kube_api.resource_version), timeout_seconds=10)
            except (aiohttp.ClientError, client.ApiException) as error:
                errors.append(error)

        tg.start_soon(watcher)
        with anyio.fail_after(5):
            while kube_api.open_watches == 0:
                await anyio.sleep(0.01)
        assert kube_api.disconnect_watches() == 1
    assert errors and isinstance(errors[0], aiohttp.ClientPayloadError)
    with anyio.fail_after(5):
        while kube_api.open_watches:
            await anyio.sleep(0.01)


def test_patch_helpers_follow_the_rfcs() -> None:
    assert merge_patch({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"b": None, "e": 4}, "d": [1]}) == {
        "a": {"c": 2, "e": 4}, "d": [1]}  # fmt: skip
    doc = {"a": {"b": [1, 2]}}
    ops = [{"op": "add", "path": "/a/b/-", "value": 3}, {"op": "replace", "path": "/a/c", "value": "x"},
           {"op": "remove", "path": "/a/b/0"}, {"op": "test", "path": "/a/c", "value": "x"}]  # fmt: skip
    assert json_patch(doc, ops) == {"a": {"b": [2, 3], "c": "x"}} and doc == {"a": {"b": [1, 2]}}
    with pytest.raises(ApiError) as bad:
        json_patch(doc, {"a": 1})
    assert bad.value.code == 400


# ---------------------------------------------------------------- as strict as kube-apiserver v1.36.2
# Each answer below was measured against a real API server (shared/reference/kube-apiserver-answers.md).

ISVC = f"/apis/{GROUP}/{VERSION}/namespaces/default/inferenceservices"
EVENTS = "/apis/events.k8s.io/v1/namespaces/default/events"
SLICES = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"


async def send(kube_api: KubeAPI, method: str, path: str, body: Any = None, content_type: str = "application/json"
               ) -> tuple[int, dict[str, Any], dict[str, str]]:  # fmt: skip
    async with aiohttp.ClientSession() as session:
        headers = {"Content-Type": content_type}
        async with session.request(method, kube_api.url + path, json=body, headers=headers) as response:
            return response.status, await response.json(), dict(response.headers)


def isvc(name: str = "chat", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceService", "metadata": {"name": name},
            "spec": {"modelRef": "llama", **spec}}  # fmt: skip


def event(**fields: Any) -> dict[str, Any]:
    body = {"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e"}, "type": "Normal",
            "eventTime": "2026-11-30T10:00:00.123456Z", "reportingController": "llmkube.dev/metal-agent",
            "reportingInstance": "metal-agent-mac-1", "action": "Serve", "reason": "Ready", "note": "ok",
            "regarding": {"kind": "InferenceService", "name": "chat", "namespace": "default"}}  # fmt: skip
    body.update(fields)
    return {k: v for k, v in body.items() if v is not None}


@pytest.mark.parametrize(
    ("path", "body", "code", "says"),
    [
        (f"/apis/{GROUP}/{VERSION}/namespaces/default/models", model("m", hardware={"memoryFraction": 1.5}), 422,
         "spec.hardware.memoryFraction"),
        (f"/apis/{GROUP}/{VERSION}/namespaces/default/models", model("m", hardware={"memoryBudget": "24GB"}), 422,
         "spec.hardware.memoryBudget"),
        (ISVC, isvc(contextSize=64), 422, "spec.contextSize"),  # int-or-string: a CEL rule checks its range
        (ISVC, isvc(contextSize=64, priority="urgent"), 422, "spec.priority"),
        (ISVC, isvc(cacheTypeV="q8_0"), 422, "needs flashAttention true"),
        (f"/apis/{GROUP}/{VERSION}/namespaces/no-such-ns/inferenceservices", isvc(), 404,
         'namespaces "no-such-ns" not found'),
        (SLICES, {"metadata": {"name": "s"}, "addressType": "IPv4", "endpoints": [{"addresses": ["127.0.0.1"]}]},
         422, "may not be in the loopback range (127.0.0.0/8, ::1/128)"),
        (SLICES, {"metadata": {"name": "s"}, "addressType": "IPv6", "endpoints": [{"addresses": ["::1"]}]},
         422, "may not be in the loopback range"),
        (EVENTS, event(reportingInstance=None, action=None), 422, "reportingInstance: Required value"),
        (EVENTS, event(reportingInstance=None, action=None), 422, "action: Required value"),
        (EVENTS, event(eventTime="2026-11-30T10:00:00Z"), 400, 'cannot parse "Z" as ".000000"'),
        (EVENTS, event(note="x" * 1025), 422, "can have at most 1024 characters"),
        (EVENTS, event(series={"count": 1, "lastObservedTime": "2026-11-30T10:00:01.000000Z"}), 422,
         "series.count: Invalid value"),
    ],
)  # fmt: skip
async def test_creates_a_real_server_refuses_are_refused(
    kube_api: KubeAPI, path: str, body: dict[str, Any], code: int, says: str
) -> None:
    answered, status, _ = await send(kube_api, "POST", path, body)
    assert (answered, status["kind"]) == (code, "Status") and says in status["message"], status


async def test_what_a_real_server_accepts_is_accepted_with_its_defaults(kube_api: KubeAPI) -> None:
    answered, stored, _ = await send(kube_api, "POST", ISVC, isvc())
    assert answered == 201
    assert {k: stored["spec"][k] for k in ("priority", "replicas", "runtime")} == {
        "priority": "normal", "replicas": 1, "runtime": "llamacpp"}  # fmt: skip
    slice_ = {"metadata": {"name": "s"}, "addressType": "IPv4", "endpoints": [{"addresses": ["192.0.2.10"]}]}
    assert (await send(kube_api, "POST", SLICES, slice_))[0] == 201
    assert (await send(kube_api, "POST", EVENTS, event()))[0] == 201
    series = {"series": {"count": 2, "lastObservedTime": "2026-11-30T10:00:01.000000Z"}}
    assert (await send(kube_api, "PATCH", f"{EVENTS}/e", series, MERGE))[0] == 200
    answered, refused, _ = await send(kube_api, "PATCH", f"{EVENTS}/e", {"note": "changed"}, MERGE)
    assert answered == 422 and "field is immutable" in refused["message"]
    service = {"metadata": {"name": "svc"}, "spec": {"ports": [{"name": "http", "port": 8080}]}}
    answered, svc, _ = await send(kube_api, "POST", "/api/v1/namespaces/default/services", service)
    assert answered == 201 and svc["spec"]["clusterIP"] and svc["spec"]["ports"][0]["targetPort"] == 8080
    assert (svc["spec"]["sessionAffinity"], svc["spec"]["internalTrafficPolicy"]) == ("None", "Cluster")
    assert svc["spec"]["ipFamilies"] == ["IPv4"] and svc["spec"]["type"] == "ClusterIP"


async def test_status_is_pruned_of_undeclared_fields_and_validated(kube_api: KubeAPI) -> None:
    await send(kube_api, "POST", ISVC, isvc())
    patch = {"status": {"phase": "Ready", "foo": 1}}
    answered, stored, headers = await send(kube_api, "PATCH", f"{ISVC}/chat/status", patch, MERGE)
    assert answered == 200 and stored["status"] == {"phase": "Ready"}
    assert headers["Warning"] == '299 - "unknown field \\"status.foo\\""'
    maybe = {"status": {"conditions": [{"type": "Ready", "status": "Maybe"}]}}
    answered, refused, _ = await send(kube_api, "PATCH", f"{ISVC}/chat/status", maybe, MERGE)
    assert answered == 422 and "status.conditions" in refused["message"] and "'Maybe'" in refused["message"]
    assert kube_api.get("InferenceService", "chat")["status"] == {"phase": "Ready"}


async def test_delete_preconditions_and_finalizers(kube_api: KubeAPI) -> None:
    service = {"metadata": {"name": "svc"}, "spec": {"ports": [{"port": 80}]}}
    _, svc, _ = await send(kube_api, "POST", "/api/v1/namespaces/default/services", service)
    wrong = {"preconditions": {"uid": "00000000-0000-0000-0000-000000000000"}}
    answered, refused, _ = await send(kube_api, "DELETE", "/api/v1/namespaces/default/services/svc", wrong)
    assert answered == 409 and "does not match the UID in record" in refused["message"]
    right = {"preconditions": {"uid": svc["metadata"]["uid"]}}
    assert (await send(kube_api, "DELETE", "/api/v1/namespaces/default/services/svc", right))[0] == 200
    held = isvc()
    held["metadata"]["finalizers"] = ["example.com/keep"]
    await send(kube_api, "POST", ISVC, held)
    answered, marked, _ = await send(kube_api, "DELETE", f"{ISVC}/chat")
    assert answered == 200 and marked["metadata"]["deletionTimestamp"]
    assert kube_api.get("InferenceService", "chat")["metadata"]["deletionTimestamp"]
    answered, _, _ = await send(kube_api, "PATCH", f"{ISVC}/chat", {"metadata": {"finalizers": None}}, MERGE)
    assert answered == 200 and kube_api.get("InferenceService", "chat") is None
    kinds = [(c.type, bool(c.obj["metadata"].get("deletionTimestamp"))) for c in kube_api.store.history[-3:]]
    assert kinds == [("ADDED", False), ("MODIFIED", True), ("DELETED", True)]


async def test_an_injected_429_says_what_a_restarting_server_says(kube_api: KubeAPI) -> None:
    kube_api.fail_next(1, status=429)
    answered, status, _ = await send(kube_api, "GET", ISVC)
    assert answered == 429 and status["reason"] == "TooManyRequests"
    assert "storage is (re)initializing" in status["message"]


async def test_table_output_has_the_printer_columns(kube_api: KubeAPI) -> None:
    await send(kube_api, "POST", ISVC, isvc())
    await send(kube_api, "PATCH", f"{ISVC}/chat/status", {"status": {"phase": "Ready"}}, MERGE)
    async with aiohttp.ClientSession() as session:
        accept = {"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"}
        async with session.get(kube_api.url + ISVC, headers=accept) as response:
            listed = await response.json()
    assert listed["kind"] == "Table"
    names = [c["name"] for c in listed["columnDefinitions"]]
    assert names == ["Name", "Model", "Phase", "Reason", "Budget", "Estimate", "Endpoint", "Age"]
    (row,) = listed["rows"]
    assert row["cells"][:3] == ["chat", "llama", "Ready"] and row["cells"][-1].endswith("s")
