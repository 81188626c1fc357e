"""Tiny GGUFs of today's popular non-llama architectures, for checking the estimate against real llama.cpp.

Each builder writes the metadata and the tensors llama.cpp's loader requires for that architecture, at toy
sizes (a few MiB), so the calibration zoo can load gemma3, qwen3-MoE, deepseek2 with MLA, mamba2, hybrids,
gpt-oss and others in seconds without downloading anything. Weights are random; every allocation is real.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from agent.estimate.tinyarch_blocks import ArchModel, write_model
from agent.estimate.tinyarch_recurrent import falcon_h1, granitehybrid, lfm2, mamba2, qwen3next


def _qwen3(moe: bool) -> ArchModel:
    m = ArchModel("qwen3moe" if moe else "qwen3", n_embd=256)
    m.base(n_layer=3, n_ff=768)
    m.heads(8, 2, 64)
    for il in range(3):
        m.attention(f"blk.{il}", 8, 2, 64, qk_norm=True)
        if moe:
            m.experts(f"blk.{il}", n_expert=8, n_ff_exp=128)
        else:
            m.ffn(f"blk.{il}", 768)
    if moe:
        m.meta.update({"expert_count": 8, "expert_used_count": 2, "expert_feed_forward_length": 128})
    return m


def _qwen2() -> ArchModel:
    """The llama graph with biases on the query, key and value projections."""
    m = ArchModel("qwen2", n_embd=256)
    m.base(n_layer=3, n_ff=768)
    m.heads(8, 2, 32)
    for il in range(3):
        m.attention(f"blk.{il}", 8, 2, 32)
        for name in ("attn_q", "attn_k", "attn_v"):
            m.t(f"blk.{il}.{name}.bias", (8 if name == "attn_q" else 2) * 32)
        m.ffn(f"blk.{il}", 768)
    return m


def _gemma(arch: str) -> ArchModel:
    n_layer = 6 if arch == "gemma3" else 4
    m = ArchModel(arch, n_embd=256)
    m.base(n_layer=n_layer, n_ff=1024, tied=True)
    m.heads(4, 2, 64)
    m.meta["attention.sliding_window"] = 512
    for il in range(n_layer):
        p = f"blk.{il}"
        m.attention(p, 4, 2, 64, qk_norm=arch == "gemma3")
        m.ffn(p, 1024)
        m.norm(f"{p}.post_attention_norm.weight")
        m.norm(f"{p}.post_ffw_norm.weight")
    if arch == "gemma2":
        m.meta.update({"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0})
    return m


def _deepseek2(split: bool = True) -> ArchModel:
    """MLA as current converters write it (``split``): the latent is cached and k_b, v_b are split per head.
    Files converted before the split carry one ``attn_kv_b`` and are served as plain multi-head attention."""
    n_layer, n_head, rank, rope, nope, v_dim, n_ff, n_ff_exp = 3, 8, 128, 32, 64, 64, 1024, 128
    m = ArchModel("deepseek2", n_embd=256)
    m.base(n_layer=n_layer, n_ff=n_ff)
    if split:
        m.meta.update(
            {
                "attention.head_count_kv": 1,
                "attention.key_length": rank + rope,
                "attention.value_length": rank,
                "attention.key_length_mla": nope + rope,
                "attention.value_length_mla": v_dim,
            }
        )
    else:
        m.meta.update(
            {"attention.head_count_kv": n_head, "attention.key_length": nope + rope, "attention.value_length": v_dim}
        )
    m.meta.update(
        {
            "attention.head_count": n_head,
            "attention.q_lora_rank": 0,
            "attention.kv_lora_rank": rank,
            "rope.dimension_count": rope,
            "leading_dense_block_count": 1,
            "expert_count": 8,
            "expert_used_count": 2,
            "expert_shared_count": 1,
            "expert_feed_forward_length": n_ff_exp,
            "expert_weights_scale": 1.0,
            "expert_weights_norm": True,
            "expert_gating_func": 2,
        }
    )
    for il in range(n_layer):
        p = f"blk.{il}"
        m.norm(f"{p}.attn_norm.weight")
        m.t(f"{p}.attn_q.weight", n_head * (nope + rope), m.n_embd)
        m.t(f"{p}.attn_kv_a_mqa.weight", rank + rope, m.n_embd)
        m.norm(f"{p}.attn_kv_a_norm.weight", rank)
        if split:
            m.t(f"{p}.attn_k_b.weight", n_head, rank, nope)
            m.t(f"{p}.attn_v_b.weight", n_head, v_dim, rank)
        else:
            m.t(f"{p}.attn_kv_b.weight", n_head * (nope + v_dim), rank)
        m.t(f"{p}.attn_output.weight", m.n_embd, n_head * v_dim)
        if il == 0:
            m.ffn(p, n_ff)
        else:
            m.experts(p, n_expert=8, n_ff_exp=n_ff_exp, shared_ff=n_ff_exp)
            m.t(f"{p}.exp_probs_b.bias", 8)
    return m


def _gpt_oss() -> ArchModel:
    """Attention sinks, biases everywhere, every other layer a sliding window of 128."""
    m = ArchModel("gpt-oss", n_embd=256)
    m.base(n_layer=4, n_ff=0)
    m.heads(8, 2, 64)
    m.meta.update(
        {
            "attention.sliding_window": 128,
            "expert_count": 8,
            "expert_used_count": 2,
            "expert_feed_forward_length": 256,
        }
    )
    for il in range(4):
        p = f"blk.{il}"
        m.attention(p, 8, 2, 64, bias=True)
        m.t(f"{p}.attn_sinks.weight", 8)
        m.norm(f"{p}.post_attention_norm.weight")
        m.experts(p, n_expert=8, n_ff_exp=256, bias=True, norm=False)
    return m


def _phi3() -> ArchModel:
    """Fused QKV and fused gate+up projections; the window Phi-3 GGUFs carry is ignored by llama.cpp."""
    n_head, n_head_kv, head_dim, n_ff = 8, 2, 32, 768
    m = ArchModel("phi3", n_embd=256)
    m.base(n_layer=3, n_ff=n_ff)
    m.heads(n_head, n_head_kv, head_dim)
    m.meta["attention.sliding_window"] = 2047
    for il in range(3):
        p = f"blk.{il}"
        m.norm(f"{p}.attn_norm.weight")
        m.t(f"{p}.attn_qkv.weight", (n_head + 2 * n_head_kv) * head_dim, m.n_embd)
        m.t(f"{p}.attn_output.weight", m.n_embd, n_head * head_dim)
        m.norm(f"{p}.ffn_norm.weight")
        m.t(f"{p}.ffn_up.weight", 2 * n_ff, m.n_embd)
        m.t(f"{p}.ffn_down.weight", m.n_embd, n_ff)
    return m


def _command_r() -> ArchModel:
    """Parallel attention and feed-forward from one norm, tied output, logit scale."""
    m = ArchModel("command-r", n_embd=256)
    m.base(n_layer=3, n_ff=1024, tied=True)
    m.heads(8, 8, 32)
    m.meta.update({"logit_scale": 0.0625, "attention.layer_norm_epsilon": 1e-5})
    for il in range(3):
        p = f"blk.{il}"
        m.attention(p, 8, 8, 32)
        m.ffn(p, 1024, norm=False)
    return m


def _glm4() -> ArchModel:
    """Pre- and post-norms around attention and feed-forward, fused gate+up."""
    n_head, n_head_kv, head_dim, n_ff = 8, 2, 32, 768
    m = ArchModel("glm4", n_embd=256)
    m.base(n_layer=3, n_ff=n_ff)
    m.heads(n_head, n_head_kv, head_dim)
    for il in range(3):
        p = f"blk.{il}"
        m.attention(p, n_head, n_head_kv, head_dim, bias=False)
        m.norm(f"{p}.post_attention_norm.weight")
        m.norm(f"{p}.ffn_norm.weight")
        m.t(f"{p}.ffn_up.weight", 2 * n_ff, m.n_embd)
        m.t(f"{p}.ffn_down.weight", m.n_embd, n_ff)
        m.norm(f"{p}.post_ffw_norm.weight")
    return m


def _llama4() -> ArchModel:
    """Chunked attention (3 chunked : 1 global layers), one routed expert plus a shared one in every layer."""
    m = ArchModel("llama4", n_embd=256)
    m.base(n_layer=4, n_ff=512)
    m.heads(8, 2, 32)
    m.meta.update(
        {
            "expert_count": 4,
            "expert_used_count": 1,
            "expert_feed_forward_length": 256,
            "interleave_moe_layer_step": 1,
        }
    )
    for il in range(4):
        p = f"blk.{il}"
        m.attention(p, 8, 2, 32)
        m.experts(p, n_expert=4, n_ff_exp=256, shared_ff=256)
    return m


def _plain(arch: str, qk_norm: bool = False, tied: bool = False) -> ArchModel:
    """The llama graph under another name (mistral3, granite's scales, gemma's tied output...)."""
    m = ArchModel(arch, n_embd=256)
    m.base(n_layer=3, n_ff=768, tied=tied)
    m.heads(8, 2, 32)
    for il in range(3):
        m.attention(f"blk.{il}", 8, 2, 32, qk_norm=qk_norm)
        m.ffn(f"blk.{il}", 768)
    if arch == "granite":
        m.meta.update({"embedding_scale": 12.0, "residual_scale": 0.22, "attention.scale": 0.03, "logit_scale": 8.0})
    return m


def _qwen2moe() -> ArchModel:
    """Routed experts plus a gated shared expert in every layer."""
    m = ArchModel("qwen2moe", n_embd=256)
    m.base(n_layer=3, n_ff=768)
    m.heads(8, 2, 32)
    m.meta.update(
        {
            "expert_count": 8,
            "expert_used_count": 2,
            "expert_feed_forward_length": 128,
            "expert_shared_feed_forward_length": 512,
        }
    )
    for il in range(3):
        p = f"blk.{il}"
        m.attention(p, 8, 2, 32, bias=True)
        del m.tensors[f"{p}.attn_output.bias"]
        m.experts(p, n_expert=8, n_ff_exp=128, shared_ff=512)
        m.t(f"{p}.ffn_gate_inp_shexp.weight", m.n_embd)
    return m


def _glm4moe() -> ArchModel:
    """A leading dense layer, then routed experts with a shared one and expert-selection biases."""
    m = ArchModel("glm4moe", n_embd=256)
    m.base(n_layer=3, n_ff=1024)
    m.heads(8, 2, 32)
    m.meta.update(
        {
            "leading_dense_block_count": 1,
            "expert_count": 8,
            "expert_used_count": 2,
            "expert_shared_count": 1,
            "expert_feed_forward_length": 128,
            "expert_weights_scale": 1.0,
            "expert_weights_norm": True,
            "expert_gating_func": 2,
            "nextn_predict_layers": 0,
        }
    )
    for il in range(3):
        p = f"blk.{il}"
        m.attention(p, 8, 2, 32, bias=True)
        del m.tensors[f"{p}.attn_output.bias"]
        m.norm(f"{p}.post_attention_norm.weight")
        if il == 0:
            m.ffn(p, 1024, norm=False)
        else:
            m.experts(p, n_expert=8, n_ff_exp=128, shared_ff=128, norm=False)
            m.t(f"{p}.exp_probs_b.bias", 8)
    return m


def _olmo2() -> ArchModel:
    """Norms after attention and feed-forward only, and query/key norms over the whole projection."""
    m = ArchModel("olmo2", n_embd=256)
    m.base(n_layer=3, n_ff=768)
    m.heads(8, 8, 32)
    for il in range(3):
        p = f"blk.{il}"
        m.attention(p, 8, 8, 32)
        del m.tensors[f"{p}.attn_norm.weight"]
        m.norm(f"{p}.attn_q_norm.weight", 256)
        m.norm(f"{p}.attn_k_norm.weight", 256)
        m.norm(f"{p}.post_attention_norm.weight")
        m.ffn(p, 768, norm=False)
        m.norm(f"{p}.post_ffw_norm.weight")
    return m


def _cohere2() -> ArchModel:
    """Command-R's parallel block with 3 sliding-window layers to 1 global."""
    m = ArchModel("cohere2", n_embd=256)
    m.base(n_layer=4, n_ff=1024, tied=True)
    m.heads(8, 2, 32)
    m.meta.update({"logit_scale": 0.0625, "attention.layer_norm_epsilon": 1e-5, "attention.sliding_window": 256})
    for il in range(4):
        p = f"blk.{il}"
        m.attention(p, 8, 2, 32)
        m.ffn(p, 1024, norm=False)
    return m


BUILDERS: dict[str, Callable[[], ArchModel]] = {
    "qwen2": _qwen2,
    "qwen3": lambda: _qwen3(moe=False),
    "qwen3moe": lambda: _qwen3(moe=True),
    "gemma2": lambda: _gemma("gemma2"),
    "gemma3": lambda: _gemma("gemma3"),
    "deepseek2": _deepseek2,
    "deepseek2-kvb": lambda: _deepseek2(split=False),
    "mamba2": mamba2,
    "mamba2-wide": lambda: mamba2(n_embd=512, d_inner=1024, n_head=16),
    "mamba2-state": lambda: mamba2(d_state=128, n_group=2),
    "granitehybrid": granitehybrid,
    "lfm2": lfm2,
    "falcon-h1": falcon_h1,
    "qwen3next": qwen3next,
    "gpt-oss": _gpt_oss,
    "phi3": _phi3,
    "command-r": _command_r,
    "glm4": _glm4,
    "llama4": _llama4,
    "mistral3": lambda: _plain("mistral3"),
    "granite": lambda: _plain("granite"),
    "gemma": lambda: _plain("gemma", tied=True),
    "qwen2moe": _qwen2moe,
    "glm4moe": _glm4moe,
    "olmo2": _olmo2,
    "cohere2": _cohere2,
}


# The calibration zoo; the mamba2 variants above exist to fit the SSM working set on other dimensions. BOUNDED
# architectures load in llama.cpp but are not calibrated: they check the upper bound used for unknown ones.
ZOO = (
    "qwen2", "qwen3", "qwen3moe", "gemma2", "gemma3", "deepseek2", "mamba2", "granitehybrid", "gpt-oss",
    "phi3", "command-r", "glm4", "llama4", "deepseek2-kvb", "lfm2", "mistral3", "granite", "gemma", "qwen2moe",
    "glm4moe", "olmo2", "cohere2",
)  # fmt: skip
BOUNDED = ("qwen3next", "falcon-h1")


def write_arch_gguf(path: str | Path, name: str, seed: int = 0) -> Path:
    """Write the tiny model of architecture ``name`` (a key of ``BUILDERS``) to ``path``."""
    return write_model(BUILDERS[name](), path, name, seed)
