"""A GPU server's memory (llama.cpp on CUDA): the estimate split into device memory and host memory.

Measured on an H200 (docs/running.md, "What is measured how"): the process's device memory is the GPU-placed weights
(every layer and the output layer with ``-ngl 99``; a tied output layer is a *copy* of ``token_embd``), the KV
cache, the CUDA compute buffer (the same graph the CPU calibration sized) and a constant CUDA context overhead
(context, cuBLAS, kernel images: 589 MiB there, a setting, learned from the first server). The host keeps the
input layer (``token_embd``), a pinned compute buffer for the graph inputs (the attention mask and the input
embeddings), the output buffer, and the CUDA runtime's resident baseline.
"""

from __future__ import annotations

import dataclasses

from agent.estimate.compute_model import F16, F32, output_buffer_bytes
from agent.estimate.estimator import Estimate, estimate
from agent.estimate.kvcache import kv_cells
from agent.estimate.shape import ModelShape, ServeSettings
from agent.util.quantity import format_bytes

MiB = 1 << 20
# Resident host memory of a CUDA llama-server beyond its host buffers: 333-360 MiB measured (the CUDA runtime
# and driver libraries); rounded up.
CUDA_HOST_BASELINE_BYTES = 384 * MiB
# Per token of a micro-batch, the pinned host compute buffer holds four n_embd-wide f32 rows (input embeddings
# gathered from the host-kept token_embd and their copies); half a row more without flash attention.
INPUT_ROWS, NO_FLASH_EXTRA_HALF_ROWS = 4, 1


def host_compute_bytes(shape: ModelShape, settings: ServeSettings) -> int:
    """llama.cpp's ``CUDA_Host compute buffer``: the mask over one stream's cells plus the input rows."""
    tokens = min(settings.n_ubatch, settings.n_batch, settings.ctx_size)
    n_kv = kv_cells(shape, settings).full
    mask = n_kv * tokens * (F16 if settings.flash_attn else F32)
    rows = tokens * shape.n_embd * F32 * INPUT_ROWS
    extra = 0 if settings.flash_attn else tokens * shape.n_embd * F32 * NO_FLASH_EXTRA_HALF_ROWS // 2
    return mask + rows + extra


def offloaded_layers(shape: ModelShape, gpu_layers: int | None) -> int:
    """Layers on the GPU: all of them for None, 0 or a negative count (LLMKube's and the agent's 'all')."""
    if gpu_layers is None or gpu_layers <= 0 or gpu_layers >= shape.n_layer:
        return shape.n_layer
    return gpu_layers


def gpu_estimate(
    shape: ModelShape, settings: ServeSettings, context_overhead: int, gpu_layers: int | None = None
) -> Estimate:
    """The estimate for llama.cpp with CUDA: ``device_bytes`` (what nvidia-smi will show for the process) and
    ``host_bytes``; their sum is ``total_bytes``."""
    base = estimate(shape, settings)
    layers = offloaded_layers(shape, gpu_layers)
    all_on_gpu = layers == shape.n_layer
    share = layers / shape.n_layer if shape.n_layer else 1.0
    input_bytes = shape.input_weights_bytes
    layer_bytes = shape.weights_bytes - input_bytes  # every block and the output layer (when it has its own)
    if all_on_gpu:
        device_weights = layer_bytes + (input_bytes if shape.output_tied else 0)  # the output layer's copy
        host_weights = input_bytes
    else:  # partial offload: the layers' share goes to the GPU, the output layer stays on the host
        device_weights = int(layer_bytes * share)
        host_weights = shape.weights_bytes - device_weights
    device_kv = int(base.kv_cache_bytes * share)
    host_kv = base.kv_cache_bytes - device_kv
    device_compute = base.compute_bytes
    host_compute = host_compute_bytes(shape, settings)
    output = output_buffer_bytes(shape, settings)
    host_overhead = output + CUDA_HOST_BASELINE_BYTES + settings.cache_ram_bytes
    device = device_weights + device_kv + device_compute + context_overhead
    host = host_weights + host_kv + host_compute + host_overhead
    note = (
        f"CUDA: {format_bytes(device)} on the GPU ({format_bytes(context_overhead)} CUDA context overhead), "
        f"{format_bytes(host)} in host memory (token_embd, pinned compute, runtime)"
    )
    if not all_on_gpu:
        note += f"; {layers} of {shape.n_layer} layers on the GPU"
    return dataclasses.replace(
        base,
        weights_bytes=device_weights + host_weights,
        kv_cache_bytes=base.kv_cache_bytes,
        compute_bytes=device_compute + host_compute,
        overhead_bytes=context_overhead + host_overhead,
        device_bytes=device,
        host_bytes=host,
        notes=(*base.notes, note),
    )
