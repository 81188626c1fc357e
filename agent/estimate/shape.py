"""What the estimator needs to know about a model and about how it will be served.

Both are plain values so that every estimator term is a pure function of them, testable without files.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# llama.cpp's server defaults (tools/server): batch sizes fix the compute buffer, cache-ram is a host consumer.
DEFAULT_N_BATCH = 2048
DEFAULT_N_UBATCH = 512
KV_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl")


@dataclass(frozen=True)
class SSMShape:
    """A mamba-style layer's dimensions: they size its working buffers in the compute graph."""

    d_inner: int
    d_state: int
    n_group: int
    n_head: int
    d_conv: int


@dataclass(frozen=True)
class ModelShape:
    """The hyper-parameters of a model that decide what llama.cpp allocates.

    Per-layer lists always have ``n_layer`` entries. ``missing`` names the metadata keys that were absent and
    replaced by a conservative assumption, so the estimate can say it is a fallback.
    """

    path: str
    architecture: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: tuple[int, ...]  # per layer; 0 = no KV cache in that layer (recurrent / no attention)
    key_length: tuple[int, ...]  # per layer, elements per KV head
    value_length: tuple[int, ...]
    n_vocab: int
    n_ff: int
    context_length: int  # training context
    weights_bytes: int  # exact tensor bytes, summed over every shard
    file_bytes: int  # bytes on disk, summed over every shard
    tensor_count: int
    n_expert: int = 0
    n_expert_used: int = 0
    sliding_window: int = 0
    swa_layers: tuple[bool, ...] = ()  # per layer, True where the layer uses the sliding window
    recurrent_state_bytes: tuple[int, ...] = ()  # per layer f32 state per sequence (0 where none)
    # Mixture of experts: each routed expert's FFN width (llama.cpp falls back to n_ff without the key), the
    # always-on shared experts' total width, and whether some layers keep a dense FFN of n_ff.
    n_ff_expert: int = 0
    n_ff_shared: int = 0
    dense_ffn: bool = True
    mla_rank: int = 0  # multi-head latent attention: kv_lora_rank, the latent's width (0 = not MLA)
    flash_query_width: int = 0  # with flash attention, the per-token attention width when not n_head x key_length (MLA)
    ssm: SSMShape | None = None  # the SSM (mamba2-style) layers' dimensions, when the model has any
    shard_count: int = 1
    missing: tuple[str, ...] = field(default=())
    # Weights llama.cpp keeps in host memory even with every layer on a GPU (the input layer: token_embd), and
    # whether the output layer reuses token_embd (no output.weight: llama.cpp then loads a copy onto the GPU).
    input_weights_bytes: int = 0
    output_tied: bool = False

    @property
    def is_fallback(self) -> bool:
        return bool(self.missing)


@dataclass(frozen=True)
class ServeSettings:
    """How the server will run the model: the knobs that change its memory."""

    ctx_size: int = 4096
    parallel: int = 1
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attn: bool = False
    n_batch: int = DEFAULT_N_BATCH
    n_ubatch: int = DEFAULT_N_UBATCH
    kv_unified: bool = False
    swa_full: bool = False
    cache_ram_bytes: int = 0  # llama-server --cache-ram (host prompt cache); the agent passes it explicitly
