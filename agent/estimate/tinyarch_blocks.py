"""Building blocks of tiny GGUFs: a model's metadata and tensor shapes, assembled layer by layer, then written.

agent/estimate/tinyarch.py composes them into the architectures of the calibration zoo. Shapes are numpy-style
(``(n_out, n_in)``), the reverse of ggml's ``ne``; norms are ones, every other tensor small random values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGUFWriter

from agent.estimate.tinymodel import MetadataValue, add_tiny_vocab, add_value, n_vocab_for

Value = MetadataValue
N_VOCAB_EXTRA = 500


@dataclass
class ArchModel:
    """Metadata (keys without the ``{arch}.`` prefix) and tensor shapes of one tiny model."""

    arch: str
    n_embd: int
    meta: dict[str, Value] = field(default_factory=dict)
    tensors: dict[str, tuple[int, ...]] = field(default_factory=dict)
    norms: set[str] = field(default_factory=set)

    def t(self, name: str, *shape: int) -> None:
        self.tensors[name] = shape

    def norm(self, name: str, *shape: int) -> None:
        self.tensors[name] = shape or (self.n_embd,)
        self.norms.add(name)

    def base(self, n_layer: int, n_ff: int, tied: bool = False) -> None:
        vocab = n_vocab_for(N_VOCAB_EXTRA)
        self.meta.update(
            {
                "context_length": 32768,
                "embedding_length": self.n_embd,
                "block_count": n_layer,
                "feed_forward_length": n_ff,
                "attention.layer_norm_rms_epsilon": 1e-6,
                "rope.freq_base": 10000.0,
                "vocab_size": vocab,
            }
        )
        self.t("token_embd.weight", vocab, self.n_embd)
        self.norm("output_norm.weight")
        if not tied:
            self.t("output.weight", vocab, self.n_embd)

    def heads(self, n_head: int, n_head_kv: int | list[int], head_dim: int) -> None:
        self.meta.update(
            {
                "attention.head_count": n_head,
                "attention.head_count_kv": n_head_kv,
                "attention.key_length": head_dim,
                "attention.value_length": head_dim,
                "rope.dimension_count": head_dim,
            }
        )

    def attention(
        self, p: str, n_head: int, n_head_kv: int, head_dim: int, qk_norm: bool = False, bias: bool = False
    ) -> None:
        self.norm(f"{p}.attn_norm.weight")
        for name, rows in (
            ("attn_q", n_head * head_dim),
            ("attn_k", n_head_kv * head_dim),
            ("attn_v", n_head_kv * head_dim),
        ):
            self.t(f"{p}.{name}.weight", rows, self.n_embd)
            if bias:
                self.t(f"{p}.{name}.bias", rows)
        self.t(f"{p}.attn_output.weight", self.n_embd, n_head * head_dim)
        if bias:
            self.t(f"{p}.attn_output.bias", self.n_embd)
        if qk_norm:
            self.norm(f"{p}.attn_q_norm.weight", head_dim)
            self.norm(f"{p}.attn_k_norm.weight", head_dim)

    def ffn(self, p: str, n_ff: int, norm: bool = True) -> None:
        if norm:
            self.norm(f"{p}.ffn_norm.weight")
        self.t(f"{p}.ffn_gate.weight", n_ff, self.n_embd)
        self.t(f"{p}.ffn_up.weight", n_ff, self.n_embd)
        self.t(f"{p}.ffn_down.weight", self.n_embd, n_ff)

    def experts(
        self, p: str, n_expert: int, n_ff_exp: int, shared_ff: int = 0, bias: bool = False, norm: bool = True
    ) -> None:
        if norm:
            self.norm(f"{p}.ffn_norm.weight")
        self.t(f"{p}.ffn_gate_inp.weight", n_expert, self.n_embd)
        self.t(f"{p}.ffn_gate_exps.weight", n_expert, n_ff_exp, self.n_embd)
        self.t(f"{p}.ffn_up_exps.weight", n_expert, n_ff_exp, self.n_embd)
        self.t(f"{p}.ffn_down_exps.weight", n_expert, self.n_embd, n_ff_exp)
        if bias:
            self.t(f"{p}.ffn_gate_inp.bias", n_expert)
            self.t(f"{p}.ffn_gate_exps.bias", n_expert, n_ff_exp)
            self.t(f"{p}.ffn_up_exps.bias", n_expert, n_ff_exp)
            self.t(f"{p}.ffn_down_exps.bias", n_expert, self.n_embd)
        if shared_ff:
            self.t(f"{p}.ffn_gate_shexp.weight", shared_ff, self.n_embd)
            self.t(f"{p}.ffn_up_shexp.weight", shared_ff, self.n_embd)
            self.t(f"{p}.ffn_down_shexp.weight", self.n_embd, shared_ff)

    def mamba2(self, p: str, d_inner: int, d_state: int, n_group: int, n_ssm_head: int, d_conv: int) -> None:
        self.norm(f"{p}.attn_norm.weight")
        conv_dim = d_inner + 2 * n_group * d_state
        self.t(f"{p}.ssm_in.weight", 2 * d_inner + 2 * n_group * d_state + n_ssm_head, self.n_embd)
        self.t(f"{p}.ssm_conv1d.weight", conv_dim, d_conv)
        self.t(f"{p}.ssm_conv1d.bias", conv_dim)
        self.t(f"{p}.ssm_dt.bias", n_ssm_head)
        self.t(f"{p}.ssm_a", n_ssm_head, 1)
        self.t(f"{p}.ssm_d", n_ssm_head, 1)
        self.norm(f"{p}.ssm_norm.weight", n_group, d_inner // n_group)
        self.t(f"{p}.ssm_out.weight", self.n_embd, d_inner)
        self.meta.update(
            {
                "ssm.conv_kernel": d_conv,
                "ssm.inner_size": d_inner,
                "ssm.state_size": d_state,
                "ssm.time_step_rank": n_ssm_head,
                "ssm.group_count": n_group,
            }
        )


def write_model(model: ArchModel, path: str | Path, name: str, seed: int = 0) -> Path:
    """Write ``model`` to ``path`` as a GGUF named ``tiny-{name}`` with the tiny vocabulary."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), model.arch)
    w.add_name(f"tiny-{name}")
    for key, value in model.meta.items():
        add_value(w, f"{model.arch}.{key}", value)
    add_tiny_vocab(w, N_VOCAB_EXTRA)
    for tensor, shape in model.tensors.items():
        if tensor in model.norms:
            data = np.ones(shape, dtype=np.float32)
        else:
            data = (rng.standard_normal(shape) * 0.02).astype(np.float32)
        w.add_tensor(tensor, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
