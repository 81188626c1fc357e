"""Tiny GGUFs of recurrent and hybrid architectures: mamba2, granite and falcon hybrids, lfm2, qwen3next.

Their layers keep a per-sequence state instead of (or beside) a KV cache; agent/estimate/tinyarch.py lists them in the
calibration zoo with the attention-only architectures.
"""

from __future__ import annotations

from agent.estimate.tinyarch_blocks import ArchModel


def mamba2(n_embd: int = 256, d_inner: int = 512, d_state: int = 64, n_group: int = 1, n_head: int = 8) -> ArchModel:
    m = ArchModel("mamba2", n_embd=n_embd)
    m.base(n_layer=3, n_ff=0)
    m.meta.update({"attention.head_count": 0, "attention.head_count_kv": 0})
    for il in range(3):
        m.mamba2(f"blk.{il}", d_inner=d_inner, d_state=d_state, n_group=n_group, n_ssm_head=n_head, d_conv=4)
    return m


def granitehybrid() -> ArchModel:
    kinds = [0, 0, 2, 0]  # mamba2, mamba2, attention (2 KV heads), mamba2
    m = ArchModel("granitehybrid", n_embd=256)
    m.base(n_layer=len(kinds), n_ff=512)
    m.heads(8, kinds, 32)
    m.meta.update(
        {
            "embedding_scale": 12.0,
            "residual_scale": 0.22,
            "attention.scale": 0.0078125,
            "logit_scale": 8.0,
            "rope.dimension_count": 32,
        }
    )
    for il, kv in enumerate(kinds):
        p = f"blk.{il}"
        if kv:
            m.attention(p, 8, kv, 32)
        else:
            m.mamba2(p, d_inner=512, d_state=64, n_group=1, n_ssm_head=16, d_conv=4)
        m.ffn(p, 512)
    return m


def falcon_h1() -> ArchModel:
    """Every layer runs attention and a mamba2 mixer side by side (a KV cache and an SSM state per layer)."""
    m = ArchModel("falcon-h1", n_embd=256)
    m.base(n_layer=3, n_ff=768)
    m.heads(8, 2, 32)
    for il in range(3):
        p = f"blk.{il}"
        m.mamba2(p, d_inner=512, d_state=64, n_group=1, n_ssm_head=8, d_conv=4)
        m.attention(p, 8, 2, 32)
        m.ffn(p, 768, norm=False)
        m.norm(f"{p}.ffn_norm")  # llama.cpp looks this one up without the ".weight" suffix
    return m


def lfm2() -> ArchModel:
    """Short-convolution layers (a small conv state per sequence) between attention layers."""
    kinds = [0, 0, 2, 0, 0, 2]  # conv, conv, attention (2 KV heads), ...
    m = ArchModel("lfm2", n_embd=256)
    m.base(n_layer=len(kinds), n_ff=768, tied=True)
    del m.tensors["output_norm.weight"]
    m.norms.discard("output_norm.weight")
    m.norm("token_embd_norm.weight")
    m.heads(8, kinds, 32)
    m.meta["shortconv.l_cache"] = 3
    for il, kv in enumerate(kinds):
        p = f"blk.{il}"
        if kv:
            m.attention(p, 8, kv, 32, qk_norm=True)
        else:
            m.norm(f"{p}.attn_norm.weight")
            m.t(f"{p}.shortconv.conv.weight", m.n_embd, 3)
            m.t(f"{p}.shortconv.in_proj.weight", 3 * m.n_embd, m.n_embd)
            m.t(f"{p}.shortconv.out_proj.weight", m.n_embd, m.n_embd)
        m.ffn(p, 768)
    return m


def qwen3next() -> ArchModel:
    """Gated delta-net layers (recurrent) with a full-attention layer every fourth, experts everywhere."""
    n_layer, n_head, n_head_kv, head_dim = 4, 4, 2, 64
    d_state, n_k_heads, n_v_heads, d_conv = 32, 2, 4, 4
    key_dim, value_dim = d_state * n_k_heads, d_state * n_v_heads
    m = ArchModel("qwen3next", n_embd=256)
    m.base(n_layer=n_layer, n_ff=512)
    m.heads(n_head, n_head_kv, head_dim)
    m.meta.update(
        {
            "full_attention_interval": 4,
            "ssm.conv_kernel": d_conv,
            "ssm.inner_size": value_dim,
            "ssm.state_size": d_state,
            "ssm.time_step_rank": n_v_heads,
            "ssm.group_count": n_k_heads,
            "expert_count": 4,
            "expert_used_count": 2,
            "expert_feed_forward_length": 128,
            "expert_shared_feed_forward_length": 128,
        }
    )
    for il in range(n_layer):
        p = f"blk.{il}"
        if (il + 1) % 4 == 0:
            m.norm(f"{p}.attn_norm.weight")
            m.t(f"{p}.attn_q.weight", 2 * n_head * head_dim, m.n_embd)
            m.t(f"{p}.attn_k.weight", n_head_kv * head_dim, m.n_embd)
            m.t(f"{p}.attn_v.weight", n_head_kv * head_dim, m.n_embd)
            m.t(f"{p}.attn_output.weight", m.n_embd, n_head * head_dim)
            m.norm(f"{p}.attn_q_norm.weight", head_dim)
            m.norm(f"{p}.attn_k_norm.weight", head_dim)
        else:
            m.norm(f"{p}.attn_norm.weight")
            m.t(f"{p}.ssm_in.weight", 2 * key_dim + 2 * value_dim, m.n_embd)
            m.t(f"{p}.ssm_conv1d.weight", 2 * key_dim + value_dim, d_conv)
            m.t(f"{p}.ssm_dt.bias", n_v_heads)
            m.t(f"{p}.ssm_a", n_v_heads)
            m.t(f"{p}.ssm_ba.weight", 2 * n_v_heads, m.n_embd)
            m.norm(f"{p}.ssm_norm.weight", d_state)
            m.t(f"{p}.ssm_out.weight", m.n_embd, value_dim)
        m.norm(f"{p}.post_attention_norm.weight")
        m.t(f"{p}.ffn_gate_inp.weight", 4, m.n_embd)
        m.t(f"{p}.ffn_gate_exps.weight", 4, 128, m.n_embd)
        m.t(f"{p}.ffn_up_exps.weight", 4, 128, m.n_embd)
        m.t(f"{p}.ffn_down_exps.weight", 4, m.n_embd, 128)
        m.t(f"{p}.ffn_gate_inp_shexp.weight", m.n_embd)
        m.t(f"{p}.ffn_gate_shexp.weight", 128, m.n_embd)
        m.t(f"{p}.ffn_up_shexp.weight", 128, m.n_embd)
        m.t(f"{p}.ffn_down_shexp.weight", m.n_embd, 128)
    return m
