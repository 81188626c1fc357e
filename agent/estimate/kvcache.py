"""KV cache size exactly as llama.cpp allocates it.

llama.cpp sizes the cache in cells, not tokens: each stream's cell count is padded to 256, a server with
``-np N`` (not unified) splits the context into N streams, sliding-window layers keep only a window, and
recurrent layers keep a fixed f32 state per sequence. Quantized cache types store whole blocks, so q8_0 is
34 bytes per 32 elements, not one byte per element.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.estimate.gguf_constants import gguf
from agent.estimate.shape import KV_CACHE_TYPES, ModelShape, ServeSettings

CELL_PADDING = 256


class InvalidSettings(ValueError):
    """A serving setting llama.cpp would refuse (it names the setting and the value)."""


def _pad(n: int, to: int = CELL_PADDING) -> int:
    return -(-n // to) * to


def cache_type(name: str, field: str = "cacheType") -> gguf.GGMLQuantizationType:
    """The ggml type of a KV cache type name, or a clear error."""
    if name not in KV_CACHE_TYPES:
        raise InvalidSettings(f"{field}: {name!r} is not a KV cache type (one of {', '.join(KV_CACHE_TYPES)})")
    return gguf.GGMLQuantizationType[name.upper()]


def row_bytes(type_name: str, n_heads: int, head_dim: int, field: str = "cacheType") -> int:
    """Bytes of one cell's row (``n_heads`` × ``head_dim``); llama.cpp needs whole blocks per head."""
    block, size = gguf.GGML_QUANT_SIZES[cache_type(type_name, field)]
    if head_dim % block:
        raise InvalidSettings(
            f"{field}: {type_name} stores blocks of {block} elements, which does not divide the head size "
            f"{head_dim} (llama.cpp refuses it); use f16"
        )
    return n_heads * head_dim // block * size


def validate_settings(settings: ServeSettings) -> None:
    """Reject settings llama.cpp would refuse at load, before anything is started."""
    if settings.ctx_size < 1:
        raise InvalidSettings(f"ctxSize: {settings.ctx_size} must be a positive number of tokens")
    if not 1 <= settings.parallel <= 256:
        raise InvalidSettings(f"parallel: {settings.parallel} must be between 1 and 256 slots")
    if settings.n_ubatch < 1 or settings.n_batch < 1:
        raise InvalidSettings("batch sizes must be positive")
    cache_type(settings.cache_type_k, "cacheTypeK")
    cache_type(settings.cache_type_v, "cacheTypeV")
    if settings.cache_type_v not in ("f32", "f16", "bf16") and not settings.flash_attn:
        raise InvalidSettings(
            f"cacheTypeV: a quantized V cache ({settings.cache_type_v}) needs flash attention; "
            "enable flashAttention or use f16"
        )


@dataclass(frozen=True)
class KVCells:
    """Cells per stream for full-attention and sliding-window layers, and the number of streams."""

    full: int
    swa: int
    streams: int

    @property
    def total_full(self) -> int:
        return self.full * self.streams


def kv_cells(shape: ModelShape, settings: ServeSettings) -> KVCells:
    streams = 1 if settings.kv_unified else settings.parallel
    per_stream_ctx = settings.ctx_size if settings.kv_unified else -(-settings.ctx_size // settings.parallel)
    full = _pad(per_stream_ctx)
    swa = full
    if shape.sliding_window and not settings.swa_full:
        window = shape.sliding_window * (settings.parallel if settings.kv_unified else 1)
        swa = min(full, _pad(window + settings.n_ubatch))
    return KVCells(full=full, swa=swa, streams=streams)


@dataclass(frozen=True)
class KVCacheParts:
    """The caches llama.cpp builds: full-attention layers, sliding-window layers, recurrent state."""

    full: int = 0
    swa: int = 0
    recurrent: int = 0

    @property
    def total(self) -> int:
        return self.full + self.swa + self.recurrent


def kv_cache_parts(shape: ModelShape, settings: ServeSettings) -> KVCacheParts:
    cells = kv_cells(shape, settings)
    full = swa = 0
    # Without flash attention V is stored transposed, and llama.cpp then sizes every layer's V rows for the
    # widest layer (n_embd_v_gqa_max): per-layer head counts only save V memory with flash attention.
    widest_v = max((shape.n_head_kv[layer] * shape.value_length[layer] for layer in range(shape.n_layer)), default=0)
    for layer in range(shape.n_layer):
        heads = shape.n_head_kv[layer]
        if not heads:
            continue
        k = row_bytes(settings.cache_type_k, heads, shape.key_length[layer], "cacheTypeK")
        if settings.flash_attn:
            v = row_bytes(settings.cache_type_v, heads, shape.value_length[layer], "cacheTypeV")
        else:
            v = row_bytes(settings.cache_type_v, 1, widest_v, "cacheTypeV")
        if shape.swa_layers and shape.swa_layers[layer]:
            swa += (k + v) * cells.swa * cells.streams
        else:
            full += (k + v) * cells.full * cells.streams
    recurrent = sum(shape.recurrent_state_bytes) * max(1, settings.parallel)
    return KVCacheParts(full=full, swa=swa, recurrent=recurrent)


def kv_cache_bytes(shape: ModelShape, settings: ServeSettings) -> int:
    """Attention KV cache plus recurrent state, in bytes, as llama.cpp allocates them."""
    return kv_cache_parts(shape, settings).total
