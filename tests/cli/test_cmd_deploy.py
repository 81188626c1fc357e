"""``metal-agent deploy``: objects checked by the agent's own rules, printed or created through the API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from crdschema import errors as crd_errors
from kubeapi import KubeAPI

from agent.cli import main
from agent.sources.manifest import ManifestError, ModelSpec, ServiceSpec, parse_object


def deploy(*args: str) -> int:
    return main(["deploy", *args])


def test_dry_run_yaml_round_trips_through_the_agents_parser_and_the_crd(capsys: pytest.CaptureFixture[str]) -> None:
    code = deploy(
        "qwen",
        "--source",
        "hf://Qwen/Qwen2.5-7B-Instruct-GGUF/q4_k_m.gguf",
        "--memory-budget",
        "12Gi",
        "--memory-fraction",
        "0.5",
        "--context-size",
        "16384",
        "--accelerator",
        "metal",
        "--format",
        "gguf",
        "--namespace",
        "llm",
        "--dry-run",
    )
    assert code == 0
    model, service = yaml.safe_load_all(capsys.readouterr().out)
    assert crd_errors(model) == [] and crd_errors(service) == []
    parsed_model, parsed_service = parse_object(model, "out#0"), parse_object(service, "out#1")
    assert isinstance(parsed_model, ModelSpec) and isinstance(parsed_service, ServiceSpec)
    assert (parsed_model.name, parsed_model.namespace, parsed_model.accelerator) == ("qwen", "llm", "metal")
    assert parsed_model.source == "hf://Qwen/Qwen2.5-7B-Instruct-GGUF/q4_k_m.gguf"
    assert (parsed_model.memory_budget, parsed_model.memory_fraction) == ("12Gi", 0.5)
    assert (parsed_service.model_ref, parsed_service.context_size) == ("qwen", 16384)


def test_dry_run_json_is_a_list_and_paths_become_absolute(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    assert deploy("tiny", "--source", "models/tiny.gguf", "--dry-run", "-o", "json") == 0
    document = json.loads(capsys.readouterr().out)
    assert document["kind"] == "List" and [o["kind"] for o in document["items"]] == ["Model", "InferenceService"]
    model = parse_object(document["items"][0], "json")
    assert isinstance(model, ModelSpec) and model.source == str(tmp_path / "models" / "tiny.gguf")
    assert model.namespace == "default" and model.memory_budget is None


def agent_message(kind: str, **spec: Any) -> str:
    """What the agent says about the same values in a manifest."""
    base = {"source": "/m.gguf"} if kind == "Model" else {"modelRef": "tiny"}
    obj = {
        "apiVersion": "inference.llmkube.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": "tiny", "namespace": "default"},
        "spec": {**base, **spec},
    }
    with pytest.raises(ManifestError) as rejected:
        parse_object(obj, f"{kind} default/tiny")
    return str(rejected.value)


@pytest.mark.parametrize(
    ("flags", "kind", "spec"),
    [
        (["--memory-budget", "24GB"], "Model", {"hardware": {"memoryBudget": "24GB"}}),
        (["--memory-budget=-1Gi"], "Model", {"hardware": {"memoryBudget": "-1Gi"}}),
        (["--memory-budget", "0"], "Model", {"hardware": {"memoryBudget": "0"}}),
        (["--memory-budget", "1.5"], "Model", {"hardware": {"memoryBudget": "1.5"}}),
        (["--memory-fraction", "1.5"], "Model", {"hardware": {"memoryFraction": 1.5}}),
        (["--memory-fraction", "0"], "Model", {"hardware": {"memoryFraction": 0}}),
        (["--memory-fraction", "nan"], "Model", {"hardware": {"memoryFraction": float("nan")}}),
        (["--context-size", "64"], "InferenceService", {"contextSize": 64}),
    ],
)
def test_bad_values_are_refused_with_the_agents_message(
    flags: list[str], kind: str, spec: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert deploy("tiny", "--source", "/m.gguf", "--dry-run", "--namespace", "default", *flags) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"error: {agent_message(kind, **spec)}\n"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--memory-fraction", "half"], 'error: spec.hardware.memoryFraction: "half" is not a number'),
        (["--namespace", "Team_A"], "error: --namespace: 'Team_A' is not a valid namespace name"),
        (["--kubeconfig", "/nonexistent/kubeconfig"], "error: --kubeconfig: /nonexistent/kubeconfig is not a file"),
    ],
)
def test_other_invalid_input_is_one_error_line(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert deploy("tiny", "--source", "/m.gguf", *flags) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_invalid_name_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert deploy("Tiny_Model", "--source", "/m.gguf", "--dry-run") == 2
    assert capsys.readouterr().err.startswith("error: NAME: 'Tiny_Model' is not a valid name")


def test_create_through_the_api_then_refuse_to_overwrite_then_update(
    kube_api: KubeAPI, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kubeconfig = str(kube_api.write_kubeconfig(tmp_path / "kubeconfig", namespace="team"))
    assert deploy("tiny", "--source", "/m/tiny.gguf", "--memory-budget", "1Gi", "--kubeconfig", kubeconfig) == 1
    assert capsys.readouterr().err == 'error: the API refused: HTTP 404: namespaces "team" not found\n'
    kube_api.create_namespace("team")
    kube_api.clear_requests()
    assert deploy("tiny", "--source", "/m/tiny.gguf", "--memory-budget", "1Gi", "--kubeconfig", kubeconfig) == 0
    assert capsys.readouterr().out.splitlines() == [
        "model.inference.llmkube.dev/tiny created",
        "inferenceservice.inference.llmkube.dev/tiny created",
    ]
    creates = kube_api.requests_where(verb="create")
    assert [(r.resource, r.namespace, r.status) for r in creates] == [
        ("models", "team", 201),
        ("inferenceservices", "team", 201),
    ]
    model = kube_api.get("Model", "tiny", namespace="team")
    service = kube_api.get("InferenceService", "tiny", namespace="team")
    assert parse_object(model, "api").memory_budget == "1Gi"  # type: ignore[union-attr]
    assert parse_object(service, "api").model_ref == "tiny"  # type: ignore[union-attr]

    assert deploy("tiny", "--source", "/m/tiny.gguf", "--kubeconfig", kubeconfig) == 1
    err = capsys.readouterr().err
    assert err == "error: Model team/tiny and InferenceService team/tiny already exist; use --update to change them\n"
    assert len(kube_api.requests_where(verb="create")) == 2  # nothing more was created

    assert (
        deploy(
            "tiny",
            "--source",
            "/m/tiny.gguf",
            "--memory-budget",
            "2Gi",
            "--context-size",
            "8192",
            "--kubeconfig",
            kubeconfig,
            "--update",
        )
        == 0
    )
    assert capsys.readouterr().out.splitlines() == [
        "model.inference.llmkube.dev/tiny updated",
        "inferenceservice.inference.llmkube.dev/tiny updated",
    ]
    patches = kube_api.requests_where(verb="patch")
    assert len(patches) == 2 and all(r.content_type == "application/merge-patch+json" for r in patches)
    model = kube_api.get("Model", "tiny", namespace="team")
    assert model["spec"]["hardware"]["memoryBudget"] == "2Gi" and model["metadata"]["generation"] == 2
    assert kube_api.get("InferenceService", "tiny", namespace="team")["spec"]["contextSize"] == 8192


def test_api_failures_exit_1_with_one_line(
    kube_api: KubeAPI, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kubeconfig = str(kube_api.write_kubeconfig(tmp_path / "kubeconfig"))
    kube_api.fail_next(10, status=403)
    assert deploy("tiny", "--source", "/m/tiny.gguf", "--kubeconfig", kubeconfig) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the API refused: HTTP 403") and err.count("\n") == 1
    assert kube_api.list("Model") == []


def test_unreachable_api_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "c",
                "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:9"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
            }
        )
    )
    assert deploy("tiny", "--source", "/m/tiny.gguf", "--kubeconfig", str(kubeconfig)) == 1
    assert capsys.readouterr().err.startswith("error: cannot reach the API server http://127.0.0.1:9")


def test_nothing_is_created_when_one_of_the_two_exists(
    kube_api: KubeAPI, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kubeconfig = str(kube_api.write_kubeconfig(tmp_path / "kubeconfig"))
    kube_api.apply(
        {
            "apiVersion": "inference.llmkube.dev/v1alpha1",
            "kind": "Model",
            "metadata": {"name": "tiny", "namespace": "default"},
            "spec": {"source": "/old.gguf"},
        }
    )
    assert deploy("tiny", "--source", "/m/tiny.gguf", "--kubeconfig", kubeconfig) == 1
    assert capsys.readouterr().err == "error: Model default/tiny already exists; use --update to change it\n"
    assert kube_api.get("InferenceService", "tiny") is None and kube_api.requests_where(verb="create") == []
    assert deploy("tiny", "--source", "/m/tiny.gguf", "--kubeconfig", kubeconfig, "--update") == 0
    assert capsys.readouterr().out.splitlines() == [
        "model.inference.llmkube.dev/tiny updated",
        "inferenceservice.inference.llmkube.dev/tiny created",
    ]
    assert kube_api.get("Model", "tiny")["spec"]["source"] == "/m/tiny.gguf"


def test_serving_flags_round_trip_through_the_parser_and_the_crd(capsys: pytest.CaptureFixture[str]) -> None:
    flags = ["--on-demand", "--idle-timeout", "15m", "--context-size", "auto", "--min-context-size", "2048",
             "--parallel-slots", "2", "--cache-type-k", "q8_0", "--cache-type-v", "q8_0", "--flash-attn",
             "--priority", "low", "--alias", "gpt-4o-mini"]  # fmt: skip
    assert deploy("tiny", "--source", "/m.gguf", "--namespace", "default", "--dry-run", *flags) == 0
    _, service = yaml.safe_load_all(capsys.readouterr().out)
    assert crd_errors(service) == []
    parsed = parse_object(service, "out")
    assert isinstance(parsed, ServiceSpec)
    assert (parsed.on_demand, parsed.idle_timeout, parsed.context_auto, parsed.min_context_size) == (
        True, 900.0, True, 2048)  # fmt: skip
    assert (parsed.parallel_slots, parsed.cache_type_k, parsed.cache_type_v, parsed.flash_attention) == (
        2, "q8_0", "q8_0", True)  # fmt: skip
    assert (parsed.priority, parsed.alias) == ("low", "gpt-4o-mini")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--idle-timeout", "10"], 'spec.idleTimeout: "10" is not a duration'),
        (["--idle-timeout", "0s"], 'spec.idleTimeout: "0s" is out of range'),
        (["--cache-type-v", "q8_0"], "cacheTypeV"),  # a quantized V cache needs flash attention
        (["--parallel-slots", "0"], "spec.parallelSlots: 0 is outside 1..64"),
    ],
)
def test_bad_serving_flags_are_refused_with_the_agents_message(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert deploy("tiny", "--source", "/m.gguf", "--dry-run", "--namespace", "default", *flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_context_size_must_be_a_number_or_auto(capsys: pytest.CaptureFixture[str]) -> None:
    assert deploy("tiny", "--source", "/m.gguf", "--dry-run", "--context-size", "big") == 2
    assert "is not a number of tokens or auto" in capsys.readouterr().err


def test_manifests_writes_a_file_the_standalone_agent_reads_and_never_overwrites_by_accident(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-such-kubeconfig"))  # no cluster is consulted
    from agent.sources.manifest import load_file

    assert deploy("tiny", "--source", "/m.gguf", "--manifests", str(tmp_path), "--on-demand") == 0
    path = tmp_path / "tiny.yaml"
    assert capsys.readouterr().out == f"{path} written\n"
    model, service = load_file(path)
    assert isinstance(service, ServiceSpec) and service.on_demand and service.namespace == "default"
    assert isinstance(model, ModelSpec) and model.source == "/m.gguf"
    assert deploy("tiny", "--source", "/other.gguf", "--manifests", str(tmp_path)) == 1
    assert "already exists; use --update" in capsys.readouterr().err
    assert load_file(path)[0].source == "/m.gguf"  # type: ignore[union-attr]
    assert deploy("tiny", "--source", "/other.gguf", "--manifests", str(tmp_path), "--update") == 0
    assert load_file(path)[0].source == "/other.gguf"  # type: ignore[union-attr]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]  # no temporary file left
    assert deploy("tiny", "--source", "/m.gguf", "--manifests", str(tmp_path / "missing")) == 2
    assert "is not a directory" in capsys.readouterr().err
