"""GGUF files with a real model's tensors in the header and a sparse hole for their data.

The estimator reads only the header, so a test can check an 8B model's estimate without 4 GiB of weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

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
