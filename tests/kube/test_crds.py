"""The CRDs in config/crd: well-formed, structural, and agreeing with the agent's own validation.

The same good and bad examples go through the CRD (schema keywords and CEL rules, as the API server applies them,
see tests/crdschema.py) and through the agent (agent.sources.manifest.parse_object, then the serving settings llama.cpp
would refuse). Where they differ on purpose, the difference is listed and asserted, so it cannot widen unnoticed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from crdschema import ROOT, cel_rules, crds, errors, schema_of

from agent.estimate.kvcache import validate_settings
from agent.estimate.shape import KV_CACHE_TYPES
from agent.sources import manifest
from agent.sources.manifest import ManifestError, ServiceSpec, parse_object

CONFIG = ROOT / "config"
HEX64 = "0123456789abcdef" * 4


def model(**spec: Any) -> dict[str, Any]:
    hardware = spec.pop("hardware", {})
    return {
        "apiVersion": manifest.API_VERSION,
        "kind": "Model",
        "metadata": {"name": "m", "namespace": "default"},
        "spec": {"source": "/models/m.gguf", **spec, **({"hardware": hardware} if hardware is not None else {})},
    }


def hw(**hardware: Any) -> dict[str, Any]:
    return model(hardware=hardware)


def service(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": manifest.API_VERSION,
        "kind": "InferenceService",
        "metadata": {"name": "s", "namespace": "default"},
        "spec": {"modelRef": "m", **spec},
    }


def agent_error(obj: dict[str, Any]) -> str | None:
    """The agent's rejection of ``obj`` (parse, then settings llama.cpp refuses), or None when it accepts it."""
    try:
        parsed = parse_object(copy.deepcopy(obj), "example.yaml")
        if isinstance(parsed, ServiceSpec):
            validate_settings(parsed.settings())
    except (ManifestError, ValueError) as exc:
        return str(exc)
    return None


VALID = [
    model(),
    model(format="mlx", sha256=HEX64),
    hw(memoryBudget="24Gi"),
    hw(memoryBudget="512Mi"),
    hw(memoryBudget="1.5Gi"),
    hw(memoryBudget="+8G"),
    hw(memoryBudget="1e9"),
    hw(memoryBudget="1000m"),
    hw(memoryBudget=1073741824),
    hw(memoryFraction=0.5),
    hw(memoryFraction=1),
    hw(memoryFraction=1e-9),
    hw(memoryBudget="12Gi", memoryFraction=0.25),
    *[hw(accelerator=name) for name in manifest.ACCELERATORS],
    hw(gpu={"layers": -1, "count": 1, "memory": "24Gi", "vendor": "apple"}),
    hw(gpu={"layers": 0, "count": 64}),
    model(hardware={"accelerator": "metal"}, resources={"cpu": "2"}),  # LLMKube fields the agent ignores
    service(),
    service(contextSize=128, parallelSlots=1, replicas=0, suspend=True, batchSize=1, uBatchSize=1),
    service(contextSize=2097152, parallelSlots=64, replicas=1000, batchSize=1 << 20, uBatchSize=1 << 20),
    service(cacheTypeK="q8_0", cacheTypeV="q8_0", flashAttention=True),
    service(cacheTypeK="q4_0", cacheTypeV="f16"),
    service(cacheTypeV="bf16", cacheTypeCustomK="q5_1"),
    service(cacheTypeCustomV="q8_0", flashAttention=True),
    service(cacheTypeV="q8_0", cacheTypeCustomV="f16"),  # the custom type wins
    *[service(priority=name) for name in manifest.PRIORITIES],
    service(extraArgs=["--temp", "0.7"], evictionProtection=True, runtime="mlx", mode="embedding"),
    service(contextSize="auto", minContextSize=2048, onDemand=True, idleTimeout="1h30m", alias="chat"),
    service(onDemand=False, idleTimeout="500ms"),
]

INVALID = [
    model(source=None),
    model(source=""),
    model(source=7),
    model(format="onnx"),
    model(sha256="abc"),
    model(sha256="g" * 64),
    hw(memoryBudget="-1Gi"),
    hw(memoryBudget="0"),
    hw(memoryBudget="0Gi"),
    hw(memoryBudget="0.0"),
    hw(memoryBudget="24GB"),
    hw(memoryBudget="24gb"),
    hw(memoryBudget="lots"),
    hw(memoryBudget=""),
    hw(memoryBudget=" 24Gi"),
    hw(memoryBudget="24Gi\n"),
    hw(memoryBudget="1" * 101),
    hw(memoryBudget=-5),
    hw(memoryBudget=0),
    hw(memoryBudget=True),
    hw(memoryBudget=1.5),
    hw(memoryFraction=0),
    hw(memoryFraction=1.5),
    hw(memoryFraction=-0.1),
    hw(memoryFraction="0.5"),
    hw(memoryFraction=True),
    hw(accelerator="tpu"),
    hw(accelerator="Metal"),
    hw(gpu={"layers": -2}),
    hw(gpu={"count": 0}),
    hw(gpu={"count": 65}),
    hw(gpu={"layers": "all"}),
    model(hardware="metal"),
    service(modelRef=None),
    service(modelRef=""),
    service(contextSize=127),
    service(contextSize=2097153),
    service(contextSize="4k"),
    service(parallelSlots=0),
    service(parallelSlots=65),
    service(replicas=-1),
    service(replicas=1001),
    service(batchSize=0),
    service(uBatchSize=(1 << 20) + 1),
    service(priority="urgent"),
    service(suspend="yes"),
    service(flashAttention="true"),
    service(cacheTypeK="q8"),
    service(cacheTypeV="q8_0"),  # a quantized V cache without flash attention: llama.cpp refuses it
    service(cacheTypeV="f16", cacheTypeCustomV="q4_0", flashAttention=False),
    service(extraArgs="--temp 0.7"),
    service(extraArgs=["--temp", 0.7]),
    service(evictionProtection="no"),
    service(cacheTypeCustomV="x" * 33),
    service(contextSize="Auto"),
    service(contextSize=""),
    service(contextSize=True),
    service(minContextSize=64),
    service(onDemand="yes"),
    service(idleTimeout="10"),
    service(idleTimeout="10 m"),
    service(idleTimeout=600),
    service(idleTimeout="-5m"),
    service(alias=""),
]

# Accepted by the CRD, refused by the agent (with a status saying why): a schema cannot say these.
CRD_ADMITS_AGENT_REFUSES = [
    hw(memoryBudget="1.5"),  # not a whole number of bytes
    hw(memoryBudget="100m"),
    hw(memoryBudget="1e-3"),
    hw(memoryBudget="9Ei"),  # above 2^63 - 1 bytes
    hw(memoryBudget="9" * 100),
    service(cacheTypeCustomK="turbo3"),  # free-form in LLMKube; the agent serves llama.cpp's cache types only
    service(idleTimeout="0s"),  # an idle timeout of nothing; a pattern cannot say "positive"
    service(idleTimeout="9999h"),  # beyond the agent's 366 days
    service(alias=" chat"),
]
# Refused by the CRD, ignored by the agent: fields the agent does not read, and limits on free text.
CRD_REFUSES_AGENT_IGNORES = [
    service(mode="generate"),
    service(runtime="r" * 64),
    service(extraArgs=["-v"] * 257),
]


def ids(examples: list[dict[str, Any]]) -> list[str]:
    return [
        f"{e['kind']}:{yaml.safe_dump(e['spec'], default_flow_style=True, width=1000).strip()[:80]}" for e in examples
    ]


@pytest.mark.parametrize("obj", VALID, ids=ids(VALID))
def test_valid_examples_pass_the_crd_and_the_agent(obj: dict[str, Any]) -> None:
    assert errors(obj) == []
    assert agent_error(obj) is None


@pytest.mark.parametrize("obj", INVALID, ids=ids(INVALID))
def test_invalid_examples_fail_the_crd_and_the_agent(obj: dict[str, Any]) -> None:
    assert errors(obj), "the CRD accepts it"
    assert agent_error(obj), "the agent accepts it"


@pytest.mark.parametrize("obj", CRD_ADMITS_AGENT_REFUSES, ids=ids(CRD_ADMITS_AGENT_REFUSES))
def test_known_gaps_the_agent_closes(obj: dict[str, Any]) -> None:
    assert errors(obj) == []
    assert agent_error(obj)


@pytest.mark.parametrize("obj", CRD_REFUSES_AGENT_IGNORES, ids=ids(CRD_REFUSES_AGENT_IGNORES))
def test_known_gaps_the_crd_closes(obj: dict[str, Any]) -> None:
    assert errors(obj)
    assert agent_error(obj) is None


def test_invalid_budget_errors_name_the_field() -> None:
    (message,) = errors(hw(memoryBudget="24GB"))
    assert message.startswith("spec.hardware.memoryBudget:")
    (message,) = errors(hw(memoryFraction=0))
    assert message.startswith("spec.hardware.memoryFraction:")
    (message,) = errors(service(cacheTypeV="q4_0"))
    assert message.startswith("spec:") and "flashAttention" in message


# -- the manifests themselves ---------------------------------------------------------------------------------
def yaml_files() -> list[Path]:
    return sorted(CONFIG.rglob("*.yaml"))


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(CONFIG)))
def test_every_manifest_parses(path: Path) -> None:
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert documents
    for document in documents:
        assert isinstance(document.get("apiVersion"), str) and isinstance(document.get("kind"), str)


def sample_documents() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{p.name}#{i}", d)
        for p in sorted((CONFIG / "samples").glob("*.yaml"))
        for i, d in enumerate(yaml.safe_load_all(p.read_text()))
        if d is not None
    ]


@pytest.mark.parametrize(("where", "obj"), sample_documents(), ids=[w for w, _ in sample_documents()])
def test_samples_validate_against_the_crd_and_the_agent(where: str, obj: dict[str, Any]) -> None:
    assert errors(obj) == []
    assert agent_error(obj) is None


def test_crd_names_match_the_agent() -> None:
    assert set(crds()) == {"Model", "InferenceService"}
    for crd in crds().values():
        spec = crd["spec"]
        assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
        assert spec["group"] == manifest.GROUP
        assert crd["metadata"]["name"] == f"{spec['names']['plural']}.{spec['group']}"
        assert spec["scope"] == "Namespaced"
        (version,) = spec["versions"]
        assert (version["name"], version["served"], version["storage"]) == (manifest.VERSION, True, True)
        assert version["subresources"] == {"status": {}}


def test_enums_are_the_agents() -> None:
    model_spec, service_spec = (
        schema_of("Model")["properties"]["spec"],
        schema_of("InferenceService")["properties"]["spec"],
    )
    hardware = model_spec["properties"]["hardware"]["properties"]
    assert tuple(hardware["accelerator"]["enum"]) == manifest.ACCELERATORS
    assert tuple(model_spec["properties"]["format"]["enum"]) == manifest.FORMATS
    assert tuple(service_spec["properties"]["priority"]["enum"]) == manifest.PRIORITIES
    for key in ("cacheTypeK", "cacheTypeV"):
        assert tuple(service_spec["properties"][key]["enum"]) == KV_CACHE_TYPES


# -- structural schema (what the API server requires of an apiextensions.k8s.io/v1 CRD) -------------------------
PRESERVE_UNKNOWN = {  # LLMKube manifests carry more spec fields than this agent reads: keep them, do not prune
    "Model": {"spec", "spec.hardware", "spec.hardware.gpu"},
    "InferenceService": {"spec"},
}
INT_OR_STRING = [{"type": "integer"}, {"type": "string"}]


def walk(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, node)]
    for name, child in node.get("properties", {}).items():
        found += walk(child, f"{path}.{name}".lstrip("."))
    if isinstance(node.get("items"), dict):
        found += walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        found += walk(node["additionalProperties"], f"{path}{{}}")
    return found


@pytest.mark.parametrize("kind", ["Model", "InferenceService"])
def test_schema_is_structural(kind: str) -> None:
    nodes = walk(schema_of(kind))
    preserved = set()
    for path, node in nodes:
        if node.get("x-kubernetes-int-or-string"):
            assert "type" not in node and node.get("anyOf") == INT_OR_STRING, path
        else:
            assert isinstance(node.get("type"), str), f"{path or '<root>'} has no type"
        if node.get("type") == "array":
            assert "items" in node, path
        if "properties" in node:
            assert node["type"] == "object" and "additionalProperties" not in node, path
        if node.get("x-kubernetes-preserve-unknown-fields"):
            preserved.add(path)
        for junctor in ("allOf", "oneOf", "not"):
            assert junctor not in node, f"{path}: {junctor} is not needed here"
        if "default" in node:
            sub = {"kind": kind, **to_object(path, node["default"])}
            assert not [e for e in errors(sub) if e.startswith(path)], f"{path}: default is invalid"
    assert preserved == PRESERVE_UNKNOWN[kind]
    assert schema_of(kind)["properties"]["metadata"] == {"type": "object"}


def to_object(path: str, value: Any) -> dict[str, Any]:
    """A minimal object with ``value`` at ``path`` (for checking defaults against the schema)."""
    base = model() if path.startswith("spec.hardware") or path == "spec.format" else service()
    target = base
    *parents, leaf = path.split(".")
    for name in parents:
        target = target.setdefault(name, {})
    target[leaf] = value
    base.pop("kind")
    return base


@pytest.mark.parametrize("kind", ["Model", "InferenceService"])
def test_printer_columns_point_at_declared_fields(kind: str) -> None:
    (version,) = crds()[kind]["spec"]["versions"]
    declared = {path for path, _ in walk(schema_of(kind))}
    names = set()
    for column in version["additionalPrinterColumns"]:
        names.add(column["name"])
        path = column["jsonPath"].lstrip(".")
        assert path in declared or path == "metadata.creationTimestamp", column
    assert "Age" in names and "Phase" in names and "Budget" in names
    if kind == "InferenceService":
        assert "Estimate" in names


def test_cel_rules_compile_and_say_why() -> None:
    rules = cel_rules("InferenceService") + cel_rules("Model")
    assert rules, "a CEL rule was removed: update this test and the examples"
    for _, rule in rules:
        assert set(rule) == {"rule", "message"}  # fieldPath/reason need Kubernetes >= 1.28: keep the CRD portable
        assert len(rule["message"]) > 20


def test_the_crd_kustomization_lists_every_crd() -> None:
    kustomization = yaml.safe_load((CONFIG / "crd" / "kustomization.yaml").read_text())
    files = sorted(p.name for p in (CONFIG / "crd").glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == files and len(files) == len(crds())
