"""Compute buffers and runtime overhead, calibrated against real llama.cpp (docs/calibration.md).

ggml allocates one compute buffer sized for the peak of a graph over one micro-batch (``n_ubatch`` tokens,
``n_kv`` = the cells of one stream). Measured, the peak is: the attention masks (graph inputs, alive
throughout; a second one for sliding-window layers) plus the largest phase of a layer: the attention score
matrix (without flash attention) or the feed-forward intermediates (dense, routed experts or shared experts),
each beside attention's per-token working set, or an SSM layer's buffers. Each term is a tensor llama.cpp
really builds; the per-token coefficients were fitted to measurements of some models and settings and checked
on the others. Architectures never measured get an upper bound instead of the model, and say so.
"""

from __future__ import annotations

from agent.estimate.kvcache import kv_cache_bytes, kv_cells
from agent.estimate.shape import ModelShape, ServeSettings

F32, F16 = 4, 2
MiB = 1 << 20

# Per-token working set, in f32 values. Without flash attention: 4 x n_embd (residual, norms, attention
# output, FFN input), 3 x the query width (Q, its rotation, the attention result) and the K+V projections of
# one layer. Flash attention fuses most of it away: n_embd and 2 x the query width remain.
EMBD_ROWS, QUERY_ROWS, FLASH_EMBD_ROWS, FLASH_QUERY_ROWS = 4, 3, 1, 2
# Gate, up and their product are alive together in a SwiGLU block, beside the residual and the norm; a
# mixture of experts adds the router's weights of every expert and one more row for the combined output.
FFN_ROWS, FFN_EMBD_ROWS = 3, 2
# SSM layers, fitted on mamba2 shapes (docs/calibration.md).
SSM_IN_ROWS, SSM_CONV_ROWS, SSM_INNER_ROWS, SSM_EMBD_ROWS, SSM_STATE_COPIES = 1, 2, 2, 3, 2
# Architectures whose graphs were measured against llama.cpp (tests/test_llama_agreement.py and
# tests/test_arch_agreement.py). Any other gets an upper bound: every phase summed, times this margin, plus a
# share of its KV cache for caches or buffers it may keep that the generic rules do not know of.
CALIBRATED_ARCHITECTURES = frozenset(
    {
        "llama", "deci", "qwen2", "qwen3", "qwen3moe", "gemma2", "gemma3", "deepseek2", "mamba2",
        "granitehybrid", "lfm2", "gpt-oss", "phi3", "command-r", "glm4", "llama4", "mistral3", "granite", "gemma",
        "qwen2moe", "glm4moe", "olmo2", "cohere2",
    }
)  # fmt: skip
UNCALIBRATED_MARGIN, UNCALIBRATED_KV_SHARE = 1.5, 0.25
# Measured RSS of the server process over its reported buffers (xllamacpp 2026.10.11549, CPU): 26.3 MiB for
# the smallest model; rounded up. Covers the runtime, its libraries and HTTP threads.
RUNTIME_BASELINE_BYTES = 32 * MiB


def _micro_batch(settings: ServeSettings) -> int:
    return min(settings.n_ubatch, settings.n_batch, settings.ctx_size)


def _ffn_rows(shape: ModelShape) -> int:
    """f32 values per token alive at the feed-forward peak: the widest of the dense and the expert layers."""
    dense = FFN_ROWS * shape.n_ff + FFN_EMBD_ROWS * shape.n_embd if shape.dense_ffn else 0
    if not shape.n_expert:
        return dense
    routed = FFN_ROWS * shape.n_ff_expert * max(1, shape.n_expert_used) + shape.n_ff_expert + shape.n_expert
    # The shared experts run after the routed ones have been combined (their intermediates are freed by then).
    experts = max(routed, FFN_ROWS * shape.n_ff_shared)
    return max(dense, experts + FFN_EMBD_ROWS * shape.n_embd)


def ssm_bytes(shape: ModelShape, tokens: int, sequences: int) -> int:
    """An SSM (mamba2) layer's peak: per token its input projection (z, x, B, C, dt), the convolution's input
    window and output, the scan's output and the gated result, beside the residual stream; per sequence the
    scan's state read and written (d_state x d_inner f32 each)."""
    ssm = shape.ssm
    if ssm is None:
        return 0
    conv_width = ssm.d_inner + 2 * ssm.n_group * ssm.d_state
    in_proj = ssm.d_inner + conv_width + ssm.n_head
    rows = (
        SSM_IN_ROWS * in_proj + SSM_CONV_ROWS * conv_width + SSM_INNER_ROWS * ssm.d_inner + SSM_EMBD_ROWS * shape.n_embd
    )
    return tokens * F32 * rows + SSM_STATE_COPIES * min(sequences, tokens) * ssm.d_state * ssm.d_inner * F32


def is_calibrated(shape: ModelShape) -> bool:
    return shape.architecture in CALIBRATED_ARCHITECTURES


def compute_buffer_bytes(shape: ModelShape, settings: ServeSettings) -> int:
    """The compute buffer llama.cpp reserves; for an architecture never measured, an upper bound instead."""
    if is_calibrated(shape):
        return _phases(shape, settings)[0]
    return compute_model_and_bound(shape, settings)[1]


def uncalibrated_margin_bytes(shape: ModelShape, settings: ServeSettings) -> int:
    """How much the bound used for an unmeasured architecture may exceed the calibrated model (0 if measured)."""
    if is_calibrated(shape):
        return 0
    calibrated, bound = compute_model_and_bound(shape, settings)
    return bound - calibrated


def compute_model_and_bound(shape: ModelShape, settings: ServeSettings) -> tuple[int, int]:
    """(the calibrated model, an upper bound): the model takes the largest phase of the graph; the bound adds
    every phase up (as if nothing were ever freed, flash attention or not), any recurrent state twice, a margin
    on top, and a share of the KV cache."""
    calibrated, phases = _phases(shape, settings)
    bound = int(phases * UNCALIBRATED_MARGIN + kv_cache_bytes(shape, settings) * UNCALIBRATED_KV_SHARE)
    return calibrated, max(calibrated, bound)


def _phases(shape: ModelShape, settings: ServeSettings) -> tuple[int, int]:
    """(the calibrated model: masks + the largest phase, every phase added up)."""
    tokens = _micro_batch(settings)
    cells = kv_cells(shape, settings)
    n_kv = cells.full
    attention_layers = [layer for layer in range(shape.n_layer) if shape.n_head_kv[layer]]
    # Sliding-window layers have a mask of their own (f16 with flash attention, f32 without), alive with the
    # full-attention mask throughout the graph.
    mask_cells = n_kv + (cells.swa if any(shape.swa_layers) else 0)
    mask = mask_cells * tokens * (F16 if settings.flash_attn else F32) if attention_layers else 0
    scores = 0 if settings.flash_attn or not attention_layers else n_kv * tokens * shape.n_head * F32
    if shape.mla_rank and not settings.flash_attn:
        # Without flash attention MLA reads V as a transposed view of the latent K cache: one f16 copy.
        scores += n_kv * shape.mla_rank * F16
    ffn = tokens * F32 * _ffn_rows(shape)
    ssm = ssm_bytes(shape, tokens, settings.parallel)
    query_width = max((shape.n_head * shape.key_length[layer] for layer in attention_layers), default=shape.n_embd)
    kv_width = max(
        (shape.n_head_kv[layer] * (shape.key_length[layer] + shape.value_length[layer]) for layer in attention_layers),
        default=0,
    )
    if not attention_layers:
        rows = 0
    elif settings.flash_attn:
        rows = FLASH_EMBD_ROWS * shape.n_embd + FLASH_QUERY_ROWS * (shape.flash_query_width or query_width)
    else:
        rows = EMBD_ROWS * shape.n_embd + QUERY_ROWS * query_width + kv_width
    per_token = tokens * F32 * rows
    # The attention working set is alive around attention and feed-forward, not inside an SSM layer.
    calibrated = mask + max(max(scores, ffn) + per_token, ssm)
    state = 2 * max(shape.recurrent_state_bytes, default=0) * settings.parallel
    widest = tokens * F32 * (EMBD_ROWS * shape.n_embd + QUERY_ROWS * query_width + kv_width)
    return calibrated, mask + scores + ffn + max(per_token, widest) + ssm + state


def output_buffer_bytes(shape: ModelShape, settings: ServeSettings) -> int:
    """Logits kept for one output per sequence (measured: n_vocab x 4 bytes x slots)."""
    return shape.n_vocab * F32 * settings.parallel


def runtime_overhead_bytes(shape: ModelShape, settings: ServeSettings) -> int:
    return output_buffer_bytes(shape, settings) + RUNTIME_BASELINE_BYTES + settings.cache_ram_bytes
