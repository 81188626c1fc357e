"""``metal-agent estimate`` decides as the agent does: the same hooks, accelerators, GPUs that can be pretended."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fake_gpu import fake_nvidia_smi, no_nvml
from gguf_headers import MODELS, write_header_only

from agent.cli import cmd_estimate, main
from agent.engine.plugin_manager import Plugins, load_plugins
from agent.estimate.budget import Budget
from agent.hookspecs import hookimpl
from agent.sources.units import ServingUnit

GiB, MiB = 1 << 30, 1 << 20


@pytest.fixture(scope="module")
def llama8b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_header_only(tmp_path_factory.mktemp("m") / "llama8b.gguf", MODELS["llama8b.gguf"])


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, object]]:
    code = main(["estimate", *argv, "--json"])
    captured = capsys.readouterr()
    assert captured.out, captured.err
    return code, json.loads(captured.out)


def test_cuda_splits_the_estimate_and_budgets_the_gpu(llama8b: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = (str(llama8b), "--accelerator", "cuda", "--gpu-memory", "24Gi", "--ctx-size", "32768", "-fa")
    code, result = run_json(capsys, *argv)
    estimate, budget = result["estimate"], result["budget"]
    assert isinstance(estimate, dict) and isinstance(budget, dict)
    assert code == 0 and budget["host_total_bytes"] == 24 * GiB  # the pretended GPU, not this host
    # What nvidia-smi showed for this server on an H200: 8,860 MiB.
    assert 8860 * MiB <= estimate["device_bytes"] <= 8860 * MiB * 1.05
    assert estimate["device_bytes"] + estimate["host_bytes"] == estimate["total_bytes"]
    assert result["headroom_bytes"] == result["limit_bytes"] - estimate["device_bytes"]  # type: ignore[operator]
    code, result = run_json(capsys, *argv[:-3], "--gpu-memory", "8Gi", "--ctx-size", "32768", "-fa")
    assert code == 1 and result["reason"] == "InsufficientMemory" and result["advice"]
    assert main(["estimate", *argv]) == 0 and "what nvidia-smi will show" in capsys.readouterr().out


def test_two_gpus_share_the_model(llama8b: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = (str(llama8b), "--accelerator", "cuda", "--gpu-memory", "6Gi", "--ctx-size", "8192", "-fa")
    code, one = run_json(capsys, *common)
    assert code == 1
    code, two = run_json(capsys, *common, "--gpu-count", "2")
    assert code == 0 and two["budget"]["host_total_bytes"] == 12 * GiB  # type: ignore[index]
    # Each GPU holds a CUDA context of its own.
    assert two["estimate"]["device_bytes"] > one["estimate"]["device_bytes"]  # type: ignore[index]


def test_cpu_estimates_have_no_split(llama8b: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, result = run_json(capsys, str(llama8b), "--accelerator", "cpu", "--host-memory", "64Gi")
    assert "device_bytes" not in result["estimate"]  # type: ignore[operator]


def test_cuda_without_a_gpu_is_an_error_not_a_guess(
    llama8b: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    no_nvml(monkeypatch)
    fake_nvidia_smi(tmp_path, monkeypatch, None)
    assert main(["estimate", str(llama8b), "--accelerator", "cuda"]) == 2
    assert "no NVIDIA GPU" in capsys.readouterr().err
    assert main(["estimate", str(llama8b), "--accelerator", "cpu", "--gpu-count", "2"]) == 2
    assert "--gpu-count" in capsys.readouterr().err
    assert main(["estimate", str(llama8b), "--accelerator", "metal", "--gpu-memory", "24Gi"]) == 2
    assert "--gpu-memory applies to --accelerator cuda" in capsys.readouterr().err
    for bad in (["--gpu-count", "0"], ["--gpu-memory", "lots"]):
        assert main(["estimate", str(llama8b), "--accelerator", "cuda", *bad]) == 2
        assert capsys.readouterr().err.startswith("error: --gpu-")


def test_the_manifest_accelerator_applies(
    llama8b: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    no_nvml(monkeypatch)
    fake_nvidia_smi(tmp_path, monkeypatch, "0, 81920, 0\\n")  # a real (fake) 80 GiB GPU this time
    manifest = tmp_path / "model.yaml"
    manifest.write_text(
        "apiVersion: inference.llmkube.dev/v1alpha1\nkind: Model\nmetadata: {name: big}\n"
        f"spec:\n  source: {llama8b}\n  hardware: {{accelerator: cuda}}\n"
    )
    _, result = run_json(capsys, str(manifest))
    assert result["budget"]["host_total_bytes"] == 80 * GiB and "device_bytes" in result["estimate"]  # type: ignore[index,operator]


class FixedBudget:
    """A third-party plugin that decides every budget itself."""

    @hookimpl
    def resolve_budget(self, unit: ServingUnit) -> Budget:
        return Budget(123 * MiB, "plugin", None, 123 * MiB)


def test_a_plugin_changes_the_estimate_command_too(
    llama8b: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def with_plugin() -> Plugins:
        return load_plugins(extra=[FixedBudget()], entry_points=False)

    monkeypatch.setattr(cmd_estimate, "load_plugins", with_plugin)
    code, result = run_json(capsys, str(llama8b), "--accelerator", "cpu")
    assert code == 1 and result["budget"]["source"] == "plugin" and result["limit_bytes"] == 123 * MiB  # type: ignore[index]
