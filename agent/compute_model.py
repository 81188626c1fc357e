"""Compute buffers and runtime overhead, calibrated against real llama.cpp (docs/calibration.md).

ggml allocates one compute buffer sized for the peak of a graph over one micro-batch (``n_ubatch`` tokens,
``n_kv`` = the cells of one stream). Measured, the peak is: the attention mask (a graph input, alive
throughout) plus the larger of the attention score matrix (without flash attention) and the feed-forward
intermediates, plus a per-token working set proportional to the model's width. Each term below is a
tensor llama.cpp really builds; the per-token coefficients were fitted to the measurements, rounded up.
"""

from __future__ import annotations

from agent.kvcache import kv_cells
from agent.shape import ModelShape, ServeSettings

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
    rows = SSM_IN_ROWS * in_proj + SSM_CONV_ROWS * conv_width + SSM_INNER_ROWS * ssm.d_inner + SSM_EMBD_ROWS * shape.n_embd
    return tokens * F32 * rows + SSM_STATE_COPIES * min(sequences, tokens) * ssm.d_state * ssm.d_inner * F32


def compute_buffer_bytes(shape: ModelShape, settings: ServeSettings) -> int:
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
    return mask + max(max(scores, ffn) + per_token, ssm)


def output_buffer_bytes(shape: ModelShape, settings: ServeSettings) -> int:
    """Logits kept for one output per sequence (measured: n_vocab x 4 bytes x slots)."""
    return shape.n_vocab * F32 * settings.parallel


def runtime_overhead_bytes(shape: ModelShape, settings: ServeSettings) -> int:
    return output_buffer_bytes(shape, settings) + RUNTIME_BASELINE_BYTES + settings.cache_ram_bytes
