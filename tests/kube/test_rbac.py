"""config/rbac grants exactly what the agent calls: no verb or resource beyond it, and nothing it calls is missing.

Two cross-checks: every kubernetes-asyncio API method named in the agent's code (``deploy`` excepted: it runs
with the user's own credentials) maps to a permission the ClusterRole grants; and the requests the fake API
server records while the reporter runs its whole life (status, endpoints, Events, their series, removal) are
granted, while every granted permission is used by them or by the watch.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml
from kubeapi import KubeAPI
from reportkit import applied, model_obj, running, service_obj, settle, status, unit_of, until

from agent.estimate.tinymodel import TinyShape, write_tiny_gguf
from agent.kube.endpoints import AGENT_NAME, HOST_LABEL, MANAGED_BY

ROOT = Path(__file__).resolve().parents[2]
RBAC = ROOT / "config" / "rbac"
GROUP = "inference.llmkube.dev"
Permission = tuple[str, str, str]  # apiGroup, resource (with /subresource), verb

# The watch (list, then watch from its resourceVersion) of both kinds: the source of every event the agent gets.
WATCH = {(GROUP, r, v) for r in ("models", "inferenceservices") for v in ("list", "watch")}
# kubernetes-asyncio methods the agent may call, and the permission each needs. A method missing here fails the
# static check below: add it with its permission, and grant that in config/rbac (or do not call it).
METHODS: dict[str, set[Permission]] = {
    "get_namespaced_custom_object": {(GROUP, "inferenceservices", "get")},
    "patch_namespaced_custom_object_status": {
        (GROUP, r, "patch") for r in ("inferenceservices/status", "models/status")
    },
    "list_namespaced_custom_object": WATCH,
    "list_cluster_custom_object": WATCH,
    "create_namespaced_event": {("events.k8s.io", "events", "create")},
    "patch_namespaced_event": {("events.k8s.io", "events", "patch")},
    "read_namespaced_service": {("", "services", "get")},
    "create_namespaced_service": {("", "services", "create")},
    "patch_namespaced_service": {("", "services", "patch")},
    "delete_namespaced_service": {("", "services", "delete")},
    "read_namespaced_endpoint_slice": {("discovery.k8s.io", "endpointslices", "get")},
    "create_namespaced_endpoint_slice": {("discovery.k8s.io", "endpointslices", "create")},
    "patch_namespaced_endpoint_slice": {("discovery.k8s.io", "endpointslices", "patch")},
    "delete_namespaced_endpoint_slice": {("discovery.k8s.io", "endpointslices", "delete")},
}
# Called or passed as a bound method (``read=self.core.read_namespaced_service``).
_API_METHOD = re.compile(
    r"\.((?:get|list|read|create|patch|delete|replace|watch|connect)_\w*"
    r"(?:namespaced|cluster|custom_object|for_all_namespaces)\w*)\b"
)
NOT_THE_AGENT = {"cmd_deploy.py"}  # the user's own credentials


def load(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(path.read_text())
    return document


def granted(role: dict[str, Any]) -> set[Permission]:
    found = set()
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, "no resourceNames, nonResourceURLs or wildcards"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    assert "*" not in (group, resource, verb)
                    found.add((group, resource, verb))
    return found


def cluster_role() -> set[Permission]:
    return granted(load(RBAC / "role.yaml"))


def test_the_namespaced_role_grants_the_same() -> None:
    role = load(RBAC / "namespaced" / "role.yaml")
    assert role["kind"] == "Role" and load(RBAC / "role.yaml")["kind"] == "ClusterRole"
    assert granted(role) == cluster_role()


def test_bindings_name_the_service_account_and_roles() -> None:
    account = load(RBAC / "service_account.yaml")["metadata"]
    bindings = ((RBAC / "role_binding.yaml", "ClusterRole"), (RBAC / "namespaced" / "role_binding.yaml", "Role"))
    for path, kind in bindings:
        binding = load(path)
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": "metal-agent"}
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]}
        ]
    kustomized = load(RBAC / "kustomization.yaml")["resources"]
    assert sorted(kustomized) == sorted(p.name for p in RBAC.glob("*.yaml") if p.name != "kustomization.yaml")


def api_methods_in_the_agent() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "agent").rglob("*.py")):
        if path.name in NOT_THE_AGENT:
            continue
        for method in _API_METHOD.findall(path.read_text()):
            found.setdefault(method, []).append(str(path.relative_to(ROOT)))
    return found


def test_every_api_method_the_agent_calls_is_granted() -> None:
    used = api_methods_in_the_agent()
    assert "patch_namespaced_custom_object_status" in used  # the scan sees the reporter
    unknown = {m: where for m, where in used.items() if m not in METHODS}
    assert not unknown, f"kubernetes API methods without a permission in METHODS: {unknown}"
    missing = {m: METHODS[m] - cluster_role() for m in used if METHODS[m] - cluster_role()}
    assert not missing, f"called but not granted: {missing}"


def permission(request: Any) -> Permission:
    group = request.path.split("/")[2] if request.path.startswith("/apis/") else ""
    resource = request.resource + (f"/{request.subresource}" if request.subresource else "")
    return (group, resource, request.verb)


@pytest.mark.anyio
async def test_what_the_reporter_does_is_granted_and_every_grant_is_used(kube_api: KubeAPI, tmp_path: Path) -> None:
    applied(kube_api, service_obj())
    model_file = write_tiny_gguf(tmp_path / "m.gguf", TinyShape())  # a real file: its facts go to Model status
    kube_api.apply({**model_obj(), "spec": {"source": str(model_file)}})
    labels = {MANAGED_BY: AGENT_NAME, HOST_LABEL: "mac-1"}  # a previous run's Service, on another port: patched
    kube_api.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "chat", "labels": labels},
                    "spec": {"ports": [{"name": "http", "port": 9999}]}})  # fmt: skip
    async with running(kube_api) as reporter:
        steps = (("Starting", "Admitted"), ("Ready", "Ready"), ("Restarting", "Failed"), ("Ready", "Ready"))
        for phase, reason in steps:
            reporter.report(unit_of(kube_api), status(phase, reason, port=18080 if phase != "Restarting" else None))
            await settle(reporter)
        await until(lambda: reporter.events.aggregated >= 1, what="a repeated event patched into its series")
        reporter.report(None, status("Deleted", "Deleted"))
        await settle(reporter)
        await until(lambda: reporter.events.pending == 0)
        await anyio.lowlevel.checkpoint()
    used = {permission(r) for r in kube_api.requests if r.verb is not None}
    assert used <= cluster_role(), f"used but not granted: {used - cluster_role()}"
    unused = cluster_role() - used - WATCH
    assert not unused, f"granted but never used: {unused}"
    assert cluster_role() >= WATCH
    static = set().union(*(METHODS[m] for m in api_methods_in_the_agent()))
    assert used <= static, "the scan of the code misses a call the reporter made"


def test_the_crds_are_not_something_the_agent_may_change() -> None:
    for group, resource, verb in cluster_role():
        if group == GROUP:
            assert verb in ("get", "list", "watch") or resource.endswith("/status"), (resource, verb)
