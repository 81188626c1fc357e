"""Write tiny, loadable GGUF models.

The demo command and the tests need real models that real llama.cpp loads and generates with, without
downloading anything. Weights are random (seeded), so output is gibberish, but every byte llama.cpp
allocates for them is real.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGUFWriter

# A tiny SentencePiece-style vocabulary: control tokens, byte tokens, then printable pieces.
_CONTROL = ["<unk>", "<s>", "</s>"]
# Architectures with norms after attention and FFN (gemma2 also slides every other layer).
_POST_NORM_ARCHES = ("gemma2",)
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class TinyShape:
    """The shape of a generated model; defaults give a 2-layer GQA llama of about 1 MiB."""

    arch: str = "llama"
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int | list[int] = 2
    head_dim: int | None = None  # key/value length; None means n_embd / n_head (no key written)
    n_ff: int = 128
    n_ctx_train: int = 4096
    n_vocab_extra: int = 200  # printable pieces beyond control and byte tokens
    n_expert: int = 0
    n_expert_used: int = 0
    sliding_window: int = 0
    sliding_window_pattern: int = 0
    weight_type: str = "f32"  # f32 or f16
    extra_kv: dict[str, int | float | str] = field(default_factory=dict)


def _vocab(n_extra: int) -> tuple[list[str], list[float], list[int]]:
    tokens = list(_CONTROL)
    types = [2, 3, 3]  # unknown, control, control
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256  # byte
    pieces = [
        "▁",
        "▁the",
        "▁a",
        "▁hello",
        "▁world",
        "<|user|>",
        "<|assistant|>",
        "<|system|>",
        "<|end|>",
        "<|endoftext|>",
    ]
    pieces += [f"▁w{i}" for i in range(max(0, n_extra - len(pieces)))]
    tokens += pieces[:n_extra]
    types += [1] * n_extra
    scores = [0.0] * len(tokens)
    for i in range(len(tokens)):
        scores[i] = -float(i)
    return tokens, scores, types


def n_vocab_for(n_extra: int) -> int:
    return len(_CONTROL) + 256 + n_extra


def n_vocab(shape: TinyShape) -> int:
    return n_vocab_for(shape.n_vocab_extra)


def add_tiny_vocab(w: GGUFWriter, n_extra: int) -> None:
    """The tokenizer metadata of the tiny vocabulary (SentencePiece-style, with a chat template)."""
    tokens, scores, types = _vocab(n_extra)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_chat_template(_CHAT_TEMPLATE)


def write_tiny_gguf(path: str | Path, shape: TinyShape | None = None, seed: int = 0) -> Path:
    """Write a llama-family GGUF of the given shape to ``path`` and return the path."""
    shape = shape or TinyShape()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    dtype = np.float16 if shape.weight_type == "f16" else np.float32
    arch = shape.arch
    head_dim = shape.head_dim or shape.n_embd // shape.n_head
    kv_heads = shape.n_head_kv if isinstance(shape.n_head_kv, list) else [shape.n_head_kv] * shape.n_layer
    vocab_size = n_vocab(shape)

    w = GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_context_length(shape.n_ctx_train)
    w.add_embedding_length(shape.n_embd)
    w.add_block_count(shape.n_layer)
    w.add_feed_forward_length(shape.n_ff)
    w.add_head_count(shape.n_head)
    if isinstance(shape.n_head_kv, list):
        w.add_head_count_kv(shape.n_head_kv)
    else:
        w.add_head_count_kv(shape.n_head_kv)
    if shape.head_dim is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab_size)
    if shape.n_expert:
        w.add_expert_count(shape.n_expert)
        w.add_expert_used_count(shape.n_expert_used or 2)
    if shape.sliding_window:
        w.add_sliding_window(shape.sliding_window)
    if shape.sliding_window_pattern:
        w.add_uint32(f"{arch}.attention.sliding_window_pattern", shape.sliding_window_pattern)
    for key, value in shape.extra_kv.items():
        add_value(w, key, value)

    add_tiny_vocab(w, shape.n_vocab_extra)

    def tensor(name: str, *dims: int) -> None:
        data = (rng.standard_normal(dims) * 0.02).astype(dtype)
        w.add_tensor(name, data)

    def norm(name: str, n: int) -> None:
        w.add_tensor(name, np.ones(n, dtype=np.float32))

    tensor("token_embd.weight", vocab_size, shape.n_embd)
    for layer in range(shape.n_layer):
        p = f"blk.{layer}"
        q_out = shape.n_head * head_dim
        kv_out = kv_heads[layer] * head_dim
        norm(f"{p}.attn_norm.weight", shape.n_embd)
        tensor(f"{p}.attn_q.weight", q_out, shape.n_embd)
        tensor(f"{p}.attn_k.weight", kv_out, shape.n_embd)
        tensor(f"{p}.attn_v.weight", kv_out, shape.n_embd)
        tensor(f"{p}.attn_output.weight", shape.n_embd, q_out)
        norm(f"{p}.ffn_norm.weight", shape.n_embd)
        if arch in _POST_NORM_ARCHES:
            norm(f"{p}.post_attention_norm.weight", shape.n_embd)
            norm(f"{p}.post_ffw_norm.weight", shape.n_embd)
        if shape.n_expert:
            tensor(f"{p}.ffn_gate_inp.weight", shape.n_expert, shape.n_embd)
            tensor(f"{p}.ffn_gate_exps.weight", shape.n_expert, shape.n_ff, shape.n_embd)
            tensor(f"{p}.ffn_up_exps.weight", shape.n_expert, shape.n_ff, shape.n_embd)
            tensor(f"{p}.ffn_down_exps.weight", shape.n_expert, shape.n_embd, shape.n_ff)
        else:
            tensor(f"{p}.ffn_gate.weight", shape.n_ff, shape.n_embd)
            tensor(f"{p}.ffn_up.weight", shape.n_ff, shape.n_embd)
            tensor(f"{p}.ffn_down.weight", shape.n_embd, shape.n_ff)
    norm("output_norm.weight", shape.n_embd)
    if arch not in _POST_NORM_ARCHES:  # gemma ties the output to the token embedding
        tensor("output.weight", vocab_size, shape.n_embd)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


MetadataValue = int | float | bool | str | list[int] | list[bool]


def add_value(w: GGUFWriter, key: str, value: MetadataValue) -> None:
    """Write one metadata value with the GGUF type llama.cpp reads for it (integers as uint32)."""
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    else:
        w.add_array(key, list(value))
