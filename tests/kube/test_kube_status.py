"""The pure parts of Kubernetes mode: LLMKube status mapping, merge patches, names and labels, spec hashes."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from agent.kube.endpoints import detect_host_ip, owned_by
from agent.kube.status import build_status, conditions, llmkube_phase, merge_patch, strip_nulls
from agent.sources.manifest import parse_object
from agent.sources.units import ServingUnit
from agent.util.kube_names import label_value, service_name


@pytest.mark.parametrize(
    ("phase", "reason", "suspended", "expected"),
    [
        ("Pending", "InsufficientMemory", False, "Pending"),
        ("Starting", "Admitted", False, "Creating"),
        ("Ready", "Ready", False, "Ready"),
        ("Restarting", "Failed", False, "Progressing"),
        ("CrashLoop", "Failed", False, "Failed"),
        ("Failed", "MemoryCheckFailed", False, "Failed"),
        ("Stopped", "Suspended", True, "Suspended"),
        ("Stopped", "Suspended", False, "Stopped"),  # replicas: 0
        ("Terminating", "Terminating", False, "Terminating"),  # deletionTimestamp set; LLMKube has no such phase
    ],
)
def test_agent_phases_map_onto_llmkubes(phase: str, reason: str, suspended: bool, expected: str) -> None:
    assert llmkube_phase(phase, reason, suspended) == expected


@pytest.mark.parametrize(
    ("phase", "reason", "admitted", "ready"),
    [
        ("Pending", "InsufficientMemory", ("False", "InsufficientMemory"), ("False", "InsufficientMemory")),
        ("Failed", "MemoryCheckFailed", ("False", "MemoryCheckFailed"), ("False", "MemoryCheckFailed")),
        ("Failed", "SpawnFailed", ("True", "Admitted"), ("False", "SpawnFailed")),
        ("Failed", "InvalidSpec", ("False", "InvalidSpec"), ("False", "InvalidSpec")),  # e.g. a refused extraArg
        ("Starting", "Admitted", ("True", "Admitted"), ("False", "Starting")),
        ("Ready", "Adopted", ("True", "Adopted"), ("True", "Ready")),
        ("Restarting", "Failed", ("True", "Admitted"), ("False", "Restarting")),
        ("CrashLoop", "Failed", ("True", "Admitted"), ("False", "CrashLoop")),
        ("Stopped", "Suspended", ("False", "Suspended"), ("False", "Suspended")),
        ("Pending", "ModelNotFound", ("False", "ModelNotFound"), ("False", "ModelNotFound")),
        ("Terminating", "Terminating", ("False", "Terminating"), ("False", "Terminating")),
    ],
)
def test_conditions(phase: str, reason: str, admitted: tuple[str, str], ready: tuple[str, str]) -> None:
    (a_type, *a), (r_type, *r) = conditions(phase, reason, "m")
    assert (a_type, tuple(a[:2]), r_type, tuple(r[:2])) == ("Admitted", admitted, "Ready", ready)


def test_transition_time_is_kept_while_the_status_holds() -> None:
    unit: dict[str, Any] = {"phase": "Pending", "reason": "InsufficientMemory", "message": "1 GiB free"}
    common = {"generation": 3, "suspended": False, "host": "h", "endpoint": None, "host_endpoint": None}
    first = strip_nulls(build_status(unit, None, timestamp="2026-01-01T00:00:00Z", **common))
    again = strip_nulls(
        build_status({**unit, "message": "2 GiB free"}, first, timestamp="2026-01-02T00:00:00Z", **common)
    )
    assert [c["lastTransitionTime"] for c in again["conditions"]] == ["2026-01-01T00:00:00Z"] * 2
    assert [c["observedGeneration"] for c in again["conditions"]] == [3, 3]
    ready = strip_nulls(
        build_status({"phase": "Ready", "reason": "Ready"}, again, timestamp="2026-01-03T00:00:00Z", **common)
    )
    assert [c["lastTransitionTime"] for c in ready["conditions"]] == ["2026-01-03T00:00:00Z"] * 2
    assert "schedulingStatus" not in ready and again["schedulingStatus"] == "InsufficientMemory"


def test_merge_patch_is_the_difference_with_nulls_for_what_went_away() -> None:
    old = {
        "phase": "Ready",
        "endpoint": "http://x",
        "memory": {"budget": "1 GiB", "actual": {"rss": 5, "kv": 1}},
        "conditions": [{"type": "Ready", "status": "True"}],
    }
    new = {
        "phase": "Failed",
        "memory": {"budget": "1 GiB", "actual": {"rss": 5}},
        "conditions": [{"type": "Ready", "status": "False"}],
    }
    patch = merge_patch(old, new)
    assert patch == {
        "phase": "Failed",
        "endpoint": None,
        "memory": {"actual": {"kv": None}},
        "conditions": [{"type": "Ready", "status": "False"}],
    }
    assert merge_patch(new, copy.deepcopy(new)) == {}
    assert merge_patch(None, {"a": {"b": None, "c": 1}}) == {"a": {"c": 1}}


def test_names_and_labels_are_valid_for_kubernetes() -> None:
    assert service_name("chat") == "chat"
    for name in ("qwen2.5-7b", "7b-model", "a" * 253, "Llama.3.1"):
        made = service_name(name)
        assert len(made) <= 63 and made[0].isalpha() and made.replace("-", "").isalnum() and made == made.lower()
    assert service_name("qwen2.5-7b") != service_name("qwen2-5-7b")  # a hash keeps sanitized names apart
    assert label_value("mac-studio") == "mac-studio"
    assert len(label_value("x" * 100)) <= 63 and label_value("my mac!") != "my mac!"
    assert owned_by({"app.kubernetes.io/managed-by": "metal-agent", "metal-agent.llmkube.dev/host": "h"}, "h")
    assert not owned_by({"app.kubernetes.io/managed-by": "metal-agent", "metal-agent.llmkube.dev/host": "g"}, "h")
    assert not owned_by({"metal-agent.llmkube.dev/host": "h"}, "h") and not owned_by(None, "h")


def test_host_ip_is_the_route_to_the_api_server() -> None:
    assert detect_host_ip("http://127.0.0.1:6443") == "127.0.0.1"


def test_spec_hash_ignores_status_and_metadata_so_status_writes_cause_no_reconcile() -> None:
    model = {
        "apiVersion": "inference.llmkube.dev/v1alpha1",
        "kind": "Model",
        "metadata": {"name": "m", "namespace": "d", "generation": 1},
        "spec": {"source": "/m.gguf"},
    }
    service = {
        "apiVersion": "inference.llmkube.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "s", "namespace": "d", "generation": 1, "resourceVersion": "10"},
        "spec": {"modelRef": "m"},
    }

    def unit(svc: dict[str, Any]) -> ServingUnit:
        return ServingUnit(service=parse_object(svc, "api"), model=parse_object(model, "api"))  # type: ignore[arg-type]

    written = copy.deepcopy(service)
    written["metadata"].update(resourceVersion="11", managedFields=[{"manager": "metal-agent"}])
    written["status"] = {"phase": "Ready", "conditions": [{"type": "Ready", "status": "True"}]}
    assert unit(written).spec_hash() == unit(service).spec_hash()
    changed = copy.deepcopy(service)
    changed["spec"]["contextSize"] = 8192
    changed["metadata"]["generation"] = 2
    assert unit(changed).spec_hash() != unit(service).spec_hash()


def undeclared(value: Any, schema: dict[str, Any], path: str = "status") -> list[str]:
    """Paths in ``value`` that the schema does not declare (a real API server would prune them silently)."""
    if isinstance(value, dict):
        found = []
        for key, item in value.items():
            sub = schema.get("properties", {}).get(key) or schema.get("additionalProperties")
            if not isinstance(sub, dict):
                found.append(f"{path}.{key}")
            else:
                found += undeclared(item, sub, f"{path}.{key}")
        return found
    if isinstance(value, list):
        return [p for item in value for p in undeclared(item, schema.get("items", {}), f"{path}[]")]
    return []


def test_everything_the_reporter_writes_is_declared_in_the_crd_and_valid() -> None:
    from crdschema import errors, schema_of

    full = {
        "unit": "d/s",
        "phase": "Ready",
        "reason": "Ready",
        "message": "serving",
        "pid": 1,
        "port": 8081,
        "budget": {"bytes": 1 << 30, "source": "model-budget"},
        "estimate": {"weights": 1, "kv_cache": 2, "compute": 3, "overhead": 4, "total": 10},
        "actual": {"rss": 9, "model": 1, "kv": 2, "output": 0, "compute": 3, "total": 6},
        "endpoint": "http://127.0.0.1:8081",
        "restarts": 2,
        "executor": "llamacpp",
    }
    written = strip_nulls(
        build_status(
            full,
            None,
            generation=4,
            suspended=False,
            host="mac",
            endpoint="http://s.d.svc:8080",
            host_endpoint="http://10.0.0.2:8081",
            endpoint_condition=("True", "Registered", "http://s.d.svc:8080 points at 10.0.0.2:8081"),
        )
    )
    assert [c["type"] for c in written["conditions"]] == ["Admitted", "Ready", "EndpointRegistered"]
    blocked = strip_nulls(
        build_status(
            {"phase": "Pending", "reason": "InsufficientMemory", "message": "wait"},
            written,
            generation=4,
            suspended=False,
            host="mac",
            endpoint=None,
            host_endpoint=None,
        )
    )
    idle = strip_nulls(
        build_status(
            {"phase": "Idle", "reason": "Idle", "message": "on demand: no server until a request names it",
             "budget": {"bytes": 1 << 30, "source": "model-budget"}, "context_size": 8192,
             "on_demand": {"state": "Idle", "last_request": 1_800_000_000.5, "idle_timeout_s": 600.0}},
            written, generation=4, suspended=False, host="mac", endpoint=None, host_endpoint=None,
        )
    )  # fmt: skip
    assert idle["phase"] == "Idle" and idle["memory"]["budgetBytes"] == 1 << 30 and "schedulingStatus" not in idle
    assert idle["agent"]["onDemand"] == {"state": "Idle", "idleTimeout": "10m", "lastRequest": "2027-01-15T08:00:00Z"}
    assert idle["agent"]["contextSize"] == 8192
    schema = schema_of("InferenceService")["properties"]["status"]
    for status in (written, blocked, idle):
        assert undeclared(status, schema) == []
        obj = {
            "apiVersion": "inference.llmkube.dev/v1alpha1",
            "kind": "InferenceService",
            "metadata": {"name": "s"},
            "spec": {"modelRef": "m"},
            "status": status,
        }
        assert errors(obj) == []
    assert written["memory"]["actualBytes"] == 6 and blocked["schedulingStatus"] == "InsufficientMemory"


def test_model_facts_are_declared_in_the_model_crd(tmp_path: Any) -> None:
    from crdschema import errors, schema_of

    from agent.estimate.gguf_shape import load_shape
    from agent.estimate.tinymodel import TinyShape, write_tiny_gguf
    from agent.kube.status import model_facts

    facts = model_facts(load_shape(write_tiny_gguf(tmp_path / "m.gguf", TinyShape())))
    assert undeclared(facts, schema_of("Model")["properties"]["status"]) == []
    obj = {
        "apiVersion": "inference.llmkube.dev/v1alpha1",
        "kind": "Model",
        "metadata": {"name": "m"},
        "spec": {"source": "/m.gguf"},
        "status": facts,
    }
    assert errors(obj) == [] and facts["gguf"]["layerCount"] == TinyShape().n_layer
