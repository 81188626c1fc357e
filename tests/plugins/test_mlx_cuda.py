"""The MLX and CUDA executors: their own budgets and pre-flight, and clear reasons where they cannot run."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from agent.estimate.budget import resolve_budget
from agent.estimate.hostmem import HostMemory
from agent.estimate.preflight import Reason
from agent.sources.manifest import ModelSpec, ServiceSpec
from agent.sources.units import ServingUnit
from plugins import cuda, mlx

GiB, MiB = 1 << 30, 1 << 20
HOST = HostMemory(64 * GiB, 48 * GiB, "override")


def unit(**model: object) -> ServingUnit:
    spec = ModelSpec(name="m", namespace="d", source="/m", **model)  # type: ignore[arg-type]
    return ServingUnit(ServiceSpec(name="s", namespace="d", model_ref="m", context_size=8192), spec)


def mlx_dir(tmp_path: Path, weights: int = 3 * MiB) -> Path:
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "llama", "num_hidden_layers": 16, "hidden_size": 2048,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
                    "intermediate_size": 8192, "max_position_embeddings": 32768})
    )  # fmt: skip
    with (tmp_path / "model.safetensors").open("wb") as f:
        f.truncate(weights)
    return tmp_path


def test_mlx_estimate_from_config_and_safetensors(tmp_path: Path) -> None:
    u = unit(format="mlx")
    verdict = mlx.preflight(u, mlx_dir(tmp_path), resolve_budget(HOST.total_bytes, "8Gi"), HOST, "enforce")
    assert verdict is not None and verdict.fits and verdict.estimate is not None
    assert verdict.estimate.weights_bytes == 3 * MiB
    assert verdict.estimate.kv_cache_bytes == 16 * 8 * 64 * 2 * 2 * 8192  # layers, kv heads, head dim, K+V, f16
    assert verdict.estimate.fallback and any("lower confidence" in n for n in verdict.estimate.notes)


def test_mlx_bad_directory_fails_closed_and_other_units_are_not_its_business(tmp_path: Path) -> None:
    budget = resolve_budget(HOST.total_bytes, "8Gi")
    verdict = mlx.preflight(unit(format="mlx"), tmp_path, budget, HOST, "enforce")
    assert verdict is not None and verdict.reason is Reason.MEMORY_CHECK_FAILED and "config.json" in verdict.message
    assert mlx.preflight(unit(format="gguf"), tmp_path, budget, HOST, "enforce") is None


def test_mlx_without_mlx_lm_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    executor = mlx.MLXExecutor()
    assert executor.accepts(unit(format="mlx")) is None and executor.accepts(unit()) is not None
    with pytest.raises(RuntimeError, match="pip install mlx-lm"):
        executor.command(unit(format="mlx"), tmp_path, 1234)


def fake_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, output: str | None) -> None:
    script = tmp_path / "nvidia-smi"
    script.write_text(f"#!/bin/sh\nprintf '{output}'\n" if output is not None else "#!/bin/sh\nexit 9\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")


def test_cuda_budget_is_taken_from_gpu_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nvidia_smi(tmp_path, monkeypatch, "0, 24576, 1024\\n1, 81920, 40960\\n")
    u = unit(accelerator="cuda", memory_fraction=0.5)
    budget = cuda.resolve_budget(u, HOST, None)
    assert budget is not None and budget.bytes == 40 * GiB and budget.host_total_bytes == 80 * GiB
    gpu, chosen = cuda.gpu_memory(unit(accelerator="cuda", gpu_count=2))
    assert gpu.total_bytes == (24576 + 81920) * MiB and [g.index for g in chosen] == [1, 0]  # most free first
    assert cuda.resolve_budget(unit(accelerator="metal"), HOST, None) is None


@pytest.mark.parametrize("output", [None, ""])
def test_no_gpu_is_a_clear_memory_check_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, output: str | None
) -> None:
    fake_nvidia_smi(tmp_path, monkeypatch, output)
    u = unit(accelerator="cuda")
    verdict = cuda.preflight(u, tmp_path / "m.gguf", resolve_budget(HOST.total_bytes, "8Gi"), HOST, "enforce")
    assert verdict is not None and verdict.reason is Reason.MEMORY_CHECK_FAILED and not verdict.allowed
    assert "no NVIDIA GPU" in verdict.message


def test_cuda_executor_selects_devices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nvidia_smi(tmp_path, monkeypatch, "0, 24576, 20000\\n1, 24576, 100\\n")
    executor = cuda.CUDAExecutor()
    u = unit(accelerator="cuda")
    assert executor.accepts(u) is None and executor.accepts(unit(accelerator="metal")) is not None
    launch = executor.command(u, tmp_path / "m.gguf", 1234)
    assert launch.env == {"CUDA_VISIBLE_DEVICES": "1"} and "--n-gpu-layers" in launch.argv
