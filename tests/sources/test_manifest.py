"""Parsing and validating LLMKube Model / InferenceService manifests."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.sources.manifest import ManifestError, ModelSpec, ServiceSpec, load_file, parse_object

GiB = 1 << 30


def model(**hardware: object) -> dict[str, object]:
    return {
        "apiVersion": "inference.llmkube.dev/v1alpha1",
        "kind": "Model",
        "metadata": {"name": "m", "namespace": "ns", "generation": 3},
        "spec": {"source": "/models/m.gguf", "hardware": {"accelerator": "metal", **hardware}},
    }


def service(**spec: object) -> dict[str, object]:
    return {
        "apiVersion": "inference.llmkube.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "s"},
        "spec": {"modelRef": "m", **spec},
    }


def test_model_fields_follow_llmkube_names() -> None:
    spec = parse_object(model(memoryBudget="24Gi", gpu={"layers": 0}), "f.yaml")
    assert isinstance(spec, ModelSpec)
    assert (spec.name, spec.namespace, spec.generation, spec.accelerator) == ("m", "ns", 3, "metal")
    assert spec.memory_budget == "24Gi" and spec.gpu_layers == 0
    assert spec.budget(64 * GiB).bytes == 24 * GiB
    assert spec.budget(64 * GiB).source == "model-budget"


def test_service_settings() -> None:
    spec = parse_object(
        service(
            contextSize=8192,
            parallelSlots=4,
            flashAttention=True,
            cacheTypeK="q8_0",
            cacheTypeV="q4_0",
            extraArgs=["--threads", "4"],
            priority="high",
        ),
        "f.yaml",
    )
    assert isinstance(spec, ServiceSpec)
    settings = spec.settings()
    assert (settings.ctx_size, settings.parallel, settings.flash_attn) == (8192, 4, True)
    assert (settings.cache_type_k, settings.cache_type_v) == ("q8_0", "q4_0")
    assert spec.extra_args == ("--threads", "4") and spec.priority == "high" and spec.replicas == 1


def test_custom_cache_type_wins_over_the_enum() -> None:
    spec = parse_object(service(cacheTypeK="f16", cacheTypeCustomK="q5_1"), "f.yaml")
    assert isinstance(spec, ServiceSpec) and spec.cache_type_k == "q5_1"


def test_replicas_zero_is_kept() -> None:
    spec = parse_object(service(replicas=0), "f.yaml")
    assert isinstance(spec, ServiceSpec) and spec.replicas == 0


@pytest.mark.parametrize(
    ("obj", "where"),
    [
        (model(memoryFraction=1.5), "memoryFraction"),
        (model(memoryFraction=float("nan")), "memoryFraction"),
        (model(memoryFraction=0), "memoryFraction"),
        (model(memoryBudget="-1Gi"), "memoryBudget"),
        (model(memoryBudget="24GB"), "memoryBudget"),
        (model(memoryBudget=True), "memoryBudget"),
        (model(accelerator="tpu"), "accelerator"),
        (service(contextSize=64), "contextSize"),
        (service(parallelSlots="4"), "parallelSlots"),
        (service(cacheTypeK="q2_k"), "cacheTypeK"),
        (service(extraArgs=["--x", 3]), "extraArgs"),
        ({"apiVersion": "v1", "kind": "Model"}, "apiVersion"),
        ({"apiVersion": "inference.llmkube.dev/v1alpha1", "kind": "Pod"}, "kind"),
        ({"apiVersion": "inference.llmkube.dev/v1alpha1", "kind": "Model", "metadata": {}}, "name"),
        ([1, 2], "mapping"),
    ],
)
def test_invalid_objects_name_the_field(obj: object, where: str) -> None:
    with pytest.raises(ManifestError, match=where) as info:
        parse_object(obj, "models/x.yaml#1")
    assert str(info.value).startswith("models/x.yaml#1:")


def test_source_resolution(tmp_path: Path) -> None:
    origin = str(tmp_path / "manifests" / "m.yaml")
    relative = ModelSpec(name="m", namespace="d", source="../models/a.gguf", origin=origin)
    assert relative.local_path() == tmp_path / "models" / "a.gguf"
    assert ModelSpec(name="m", namespace="d", source="file:///x/a%20b.gguf").local_path() == Path("/x/a b.gguf")
    assert ModelSpec(name="m", namespace="d", source="https://h/a.gguf").local_path() is None
    assert ModelSpec(name="m", namespace="d", source="hf://org/repo").local_path() is None


def test_load_file_reads_several_documents_and_reports_bad_yaml(tmp_path: Path) -> None:
    good = tmp_path / "both.yaml"
    good.write_text(
        "apiVersion: inference.llmkube.dev/v1alpha1\nkind: Model\nmetadata: {name: m}\nspec: {source: a.gguf}\n"
        "---\n---\napiVersion: inference.llmkube.dev/v1alpha1\nkind: InferenceService\n"
        "metadata: {name: s}\nspec: {modelRef: m}\n"
    )
    objects = load_file(good)
    assert [type(o).__name__ for o in objects] == ["ModelSpec", "ServiceSpec"]
    assert objects[1].origin.endswith("both.yaml#2")
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: Model\n  spec: [\n")
    with pytest.raises(ManifestError, match="invalid YAML"):
        load_file(bad)
