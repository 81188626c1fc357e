"""The CUDA estimate against every measured row of llama-server on an H200 (tests/data/cuda-llama-server.json).

Each model is written as a GGUF whose header has the measured model's exact tensors (names, shapes, types) and
whose data is a sparse hole: the estimator reads only the header, so an 8B model costs no disk. The device
estimate must be within max(5 %, 64 MiB) of the process's VRAM and never more than 2 % under it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

from agent.device_estimate import gpu_estimate
from agent.gguf_shape import load_shape
from agent.gpus import DEFAULT_CONTEXT_OVERHEAD
from agent.shape import ServeSettings

MiB = 1 << 20
REFERENCE = json.loads((Path(__file__).parent / "data" / "cuda-llama-server.json").read_text())
F32, F16, Q4_0 = GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.Q4_0


@dataclass(frozen=True)
class Arch:
    arch: str
    layers: int
    embd: int
    heads: int
    kv_heads: int
    head_dim: int
    ff: int
    vocab: int
    weights: GGMLQuantizationType = F16
    experts: int = 0
    tied: bool = False  # no output.weight: llama.cpp copies token_embd to the output layer
    qkv_bias: bool = False


# The measured models: tiny f16 llama shapes (derived from their reported buffers, which they match to 0.01 MiB)
# and two Q4_0 models with the published shapes of Llama-3.1-8B and Qwen2.5-0.5B.
MODELS = {
    "gqa4.gguf": Arch("llama", 6, 1024, 16, 4, 64, 2816, 8000),
    "mqa.gguf": Arch("llama", 4, 768, 12, 1, 64, 2048, 5000),
    "mha.gguf": Arch("llama", 8, 512, 8, 8, 64, 1376, 3000),
    "moe.gguf": Arch("llama", 4, 512, 8, 2, 64, 768, 3000, experts=4),
    "wide_head.gguf": Arch("llama", 4, 768, 8, 2, 128, 2048, 4000),
    "llama8b.gguf": Arch("llama", 32, 4096, 32, 8, 128, 14336, 128256, Q4_0),
    "qwen05b.gguf": Arch("qwen2", 24, 896, 14, 2, 64, 4864, 151936, Q4_0, tied=True, qkv_bias=True),
}


def nbytes(kind: GGMLQuantizationType, *dims: int) -> int:
    block, size = GGML_QUANT_SIZES[kind]
    return int(np.prod(dims)) // block * size


def write_header_only(path: Path, a: Arch) -> Path:
    """A GGUF with ``a``'s tensors in its header and a sparse hole where their data would be."""
    w = GGUFWriter(str(path), a.arch)
    w.add_block_count(a.layers)
    w.add_context_length(131072)
    w.add_embedding_length(a.embd)
    w.add_feed_forward_length(a.ff)
    w.add_head_count(a.heads)
    w.add_head_count_kv(a.kv_heads)
    if a.head_dim * a.heads != a.embd:
        w.add_key_length(a.head_dim)
        w.add_value_length(a.head_dim)
    w.add_vocab_size(a.vocab)
    if a.experts:
        w.add_expert_count(a.experts)
        w.add_expert_used_count(2)
    total = 0

    def tensor(name: str, kind: GGMLQuantizationType, *shape: int) -> None:  # shape: rows first (numpy order)
        nonlocal total
        size = nbytes(kind, *shape)
        dtype = np.float16 if kind is F16 else np.float32 if kind is F32 else np.uint8
        block, type_size = GGML_QUANT_SIZES[kind]
        stored = shape if dtype is not np.uint8 else (*shape[:-1], shape[-1] // block * type_size)  # bytes/row
        w.add_tensor_info(name, stored, np.dtype(dtype), size, raw_dtype=kind)
        total += -(-size // 32) * 32

    q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
    tensor("token_embd.weight", a.weights, a.vocab, a.embd)
    for layer in range(a.layers):
        p = f"blk.{layer}"
        tensor(f"{p}.attn_norm.weight", F32, a.embd)
        tensor(f"{p}.attn_q.weight", a.weights, q, a.embd)
        tensor(f"{p}.attn_k.weight", a.weights, kv, a.embd)
        tensor(f"{p}.attn_v.weight", a.weights, kv, a.embd)
        if a.qkv_bias:
            for name, rows in (("attn_q", q), ("attn_k", kv), ("attn_v", kv)):
                tensor(f"{p}.{name}.bias", F32, rows)
        tensor(f"{p}.attn_output.weight", a.weights, a.embd, q)
        tensor(f"{p}.ffn_norm.weight", F32, a.embd)
        if a.experts:
            tensor(f"{p}.ffn_gate_inp.weight", a.weights, a.experts, a.embd)
            for name in ("ffn_gate_exps", "ffn_up_exps"):
                tensor(f"{p}.{name}.weight", a.weights, a.experts, a.ff, a.embd)
            tensor(f"{p}.ffn_down_exps.weight", a.weights, a.experts, a.embd, a.ff)
        else:
            tensor(f"{p}.ffn_gate.weight", a.weights, a.ff, a.embd)
            tensor(f"{p}.ffn_up.weight", a.weights, a.ff, a.embd)
            tensor(f"{p}.ffn_down.weight", a.weights, a.embd, a.ff)
    tensor("output_norm.weight", F32, a.embd)
    if not a.tied:
        tensor("output.weight", a.weights, a.vocab, a.embd)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    with path.open("r+b") as file:  # a hole: the header is all the estimator reads
        file.truncate(-(-path.stat().st_size // 32) * 32 + total)
    return path


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
