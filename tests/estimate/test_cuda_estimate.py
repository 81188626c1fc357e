"""The CUDA estimate against every measured row of llama-server on an H200 (tests/data/cuda-llama-server.json).

Each model is written as a GGUF whose header has the measured model's exact tensors (names, shapes, types) and
whose data is a sparse hole: the estimator reads only the header, so an 8B model costs no disk. The device
estimate must be within max(5 %, 64 MiB) of the process's VRAM and never more than 2 % under it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gguf_headers import MODELS, write_header_only

from agent.estimate.device_estimate import gpu_estimate
from agent.estimate.gguf_shape import load_shape
from agent.estimate.shape import ServeSettings
from agent.memory.gpus import DEFAULT_CONTEXT_OVERHEAD

MiB = 1 << 20
REFERENCE = json.loads((Path(__file__).parents[1] / "data" / "cuda-llama-server.json").read_text())


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("cuda-models")
    return {name: write_header_only(folder / name, arch) for name, arch in MODELS.items()}


def settings_of(case: dict[str, object]) -> ServeSettings:
    return ServeSettings(
        ctx_size=int(case["ctx_size"]),  # type: ignore[call-overload]
        parallel=int(case["parallel"]),  # type: ignore[call-overload]
        cache_type_k=str(case["cache_type_k"]),
        cache_type_v=str(case["cache_type_v"]),
        flash_attn=case["flash_attn"] == "on",
        n_ubatch=256 if "ub256" in str(case["case"]) else 512,
    )


def test_the_header_only_models_have_the_measured_buffers(models: dict[str, Path]) -> None:
    """The shapes are right: host weights = the measured CPU model buffer, device weights = the CUDA0 one."""
    for case in REFERENCE["cases"]:
        shape = load_shape(models[str(case["model"])])
        device = shape.weights_bytes - shape.input_weights_bytes + (shape.input_weights_bytes * shape.output_tied)
        assert shape.input_weights_bytes / MiB == pytest.approx(case["cpu_model_mib"], abs=0.01)
        assert device / MiB == pytest.approx(case["cuda_model_mib"], abs=0.2)


@pytest.mark.parametrize("case", REFERENCE["cases"], ids=[c["case"] for c in REFERENCE["cases"]])
def test_device_estimate_matches_the_process_vram(models: dict[str, Path], case: dict[str, object]) -> None:
    shape = load_shape(models[str(case["model"])])
    est = gpu_estimate(shape, settings_of(case), DEFAULT_CONTEXT_OVERHEAD)
    vram = float(case["vram_process_mib"]) * MiB  # type: ignore[arg-type]
    assert est.device_bytes is not None and est.host_bytes is not None
    error = est.device_bytes - vram
    assert abs(error) <= max(0.05 * vram, 64 * MiB), f"{case['case']}: device {est.device_bytes / MiB:.1f} MiB"
    assert error >= -0.02 * vram, f"{case['case']}: {-error / MiB:.1f} MiB under"
    # The host part covers the measured RSS, and the KV cache is exact.
    assert est.host_bytes >= int(case["rss_kib"]) * 1024  # type: ignore[call-overload]
    assert est.kv_cache_bytes / MiB == pytest.approx(case["kv_mib"], abs=0.01)
    assert est.total_bytes == est.device_bytes + est.host_bytes
    assert est.budgeted_bytes == est.device_bytes


def test_the_old_estimate_was_under_on_every_row(models: dict[str, Path]) -> None:
    """What the issue saw: without the context overhead and with token_embd on the GPU, every row is under."""
    for case in REFERENCE["cases"]:
        shape = load_shape(models[str(case["model"])])
        old = gpu_estimate(shape, settings_of(case), 0)
        assert old.device_bytes is not None and old.device_bytes < float(case["vram_process_mib"]) * MiB  # type: ignore[arg-type]


def test_partial_offload_moves_layers_and_their_kv_to_the_host(models: dict[str, Path]) -> None:
    shape = load_shape(models["llama8b.gguf"])
    settings = ServeSettings(ctx_size=8192, flash_attn=True)
    full = gpu_estimate(shape, settings, DEFAULT_CONTEXT_OVERHEAD)
    half = gpu_estimate(shape, settings, DEFAULT_CONTEXT_OVERHEAD, gpu_layers=16)
    assert full.device_bytes and full.host_bytes and half.device_bytes and half.host_bytes
    assert half.device_bytes < full.device_bytes - 2000 * MiB and half.host_bytes > full.host_bytes + 2000 * MiB
    assert any("16 of 32 layers" in note for note in half.notes)
    assert gpu_estimate(shape, settings, DEFAULT_CONTEXT_OVERHEAD, gpu_layers=0) == full  # 0 means all
