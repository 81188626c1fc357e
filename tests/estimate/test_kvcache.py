"""KV cache arithmetic against the rules llama.cpp follows (see shared reference and llama-kv-cache.cpp)."""

from __future__ import annotations

import dataclasses

import pytest

from agent.estimate.kvcache import InvalidSettings, kv_cache_bytes, kv_cells, row_bytes, validate_settings
from agent.estimate.shape import ModelShape, ServeSettings

MiB = 1 << 20


def make_shape(n_layer: int = 32, heads_kv: int = 8, head_dim: int = 128, **extra: object) -> ModelShape:
    fields: dict[str, object] = dict(
        path="m.gguf",
        architecture="llama",
        n_layer=n_layer,
        n_embd=4096,
        n_head=32,
        n_head_kv=(heads_kv,) * n_layer,
        key_length=(head_dim,) * n_layer,
        value_length=(head_dim,) * n_layer,
        n_vocab=32000,
        n_ff=14336,
        context_length=131072,
        weights_bytes=4 << 30,
        file_bytes=4 << 30,
        tensor_count=291,
    )
    fields.update(extra)
    return ModelShape(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("ctx", "parallel", "per_stream", "streams"),
    [(1000, 1, 1024, 1), (4096, 1, 4096, 1), (5000, 3, 1792, 3), (8192, 4, 2048, 4), (1, 1, 256, 1)],
)
def test_cells_follow_llama_cpp_padding_and_streams(ctx: int, parallel: int, per_stream: int, streams: int) -> None:
    cells = kv_cells(make_shape(), ServeSettings(ctx_size=ctx, parallel=parallel))
    assert (cells.full, cells.streams) == (per_stream, streams)


def test_unified_cache_is_one_stream_of_the_whole_context() -> None:
    cells = kv_cells(make_shape(), ServeSettings(ctx_size=5000, parallel=3, kv_unified=True))
    assert (cells.full, cells.streams) == (5120, 1)


def test_llama3_8b_gqa_at_8k_is_1_gib_in_f16() -> None:
    # 32 layers x 8 kv heads x 128 x 2 (K+V) x 2 bytes x 8192 cells = 1 GiB: the well-known figure.
    assert kv_cache_bytes(make_shape(), ServeSettings(ctx_size=8192)) == 1 << 30


def test_grouped_query_attention_is_counted_not_ignored() -> None:
    mha = kv_cache_bytes(make_shape(heads_kv=32), ServeSettings(ctx_size=8192))
    gqa = kv_cache_bytes(make_shape(heads_kv=8), ServeSettings(ctx_size=8192))
    mqa = kv_cache_bytes(make_shape(heads_kv=1), ServeSettings(ctx_size=8192))
    assert mha == 4 * gqa == 32 * mqa


@pytest.mark.parametrize(
    ("cache_type", "bytes_per_32"),
    [
        ("f32", 128),
        ("f16", 64),
        ("bf16", 64),
        ("q8_0", 34),
        ("q4_0", 18),
        ("iq4_nl", 18),
        ("q4_1", 20),
        ("q5_0", 22),
        ("q5_1", 24),
    ],
)
def test_cache_types_use_true_block_sizes(cache_type: str, bytes_per_32: int) -> None:
    assert row_bytes(cache_type, 8, 128) == bytes_per_32 * 32
    settings = ServeSettings(ctx_size=4096, cache_type_k=cache_type, cache_type_v=cache_type, flash_attn=True)
    expected = 32 * 8 * 4096 * 2 * (128 // 32) * bytes_per_32
    assert kv_cache_bytes(make_shape(), settings) == expected


def test_different_k_and_v_lengths_and_types() -> None:
    shape = make_shape(n_layer=2, heads_kv=4, head_dim=64, value_length=(128, 128))
    settings = ServeSettings(ctx_size=256, cache_type_k="q8_0", cache_type_v="f16", flash_attn=True)
    assert kv_cache_bytes(shape, settings) == 2 * 256 * (4 * 64 // 32 * 34 + 4 * 128 * 2)


def test_quantized_cache_needs_whole_blocks_per_head() -> None:
    # 2 heads of 16 make a 32-element row, but llama.cpp checks the head size: 16 is refused.
    with pytest.raises(InvalidSettings, match="does not divide the head size 16"):
        kv_cache_bytes(make_shape(head_dim=16, heads_kv=2), ServeSettings(cache_type_k="q8_0"))


def test_quantized_v_needs_flash_attention() -> None:
    with pytest.raises(InvalidSettings, match="flash attention"):
        validate_settings(ServeSettings(cache_type_v="q8_0"))
    validate_settings(ServeSettings(cache_type_v="q8_0", flash_attn=True))


@pytest.mark.parametrize(
    "settings",
    [
        ServeSettings(ctx_size=0),
        ServeSettings(parallel=0),
        ServeSettings(cache_type_k="q2_k"),
        ServeSettings(n_ubatch=0),
    ],
)
def test_invalid_settings_are_rejected(settings: ServeSettings) -> None:
    with pytest.raises(InvalidSettings):
        validate_settings(settings)


def test_sliding_window_layers_keep_only_the_window() -> None:
    swa = tuple(layer % 6 < 5 for layer in range(12))  # period 6: five sliding layers, then a full one
    shape = make_shape(n_layer=12, heads_kv=4, head_dim=256, sliding_window=1024, swa_layers=swa)
    settings = ServeSettings(ctx_size=32768)
    cells = kv_cells(shape, settings)
    assert cells.full == 32768
    assert cells.swa == 1024 + 512 + 0  # window + n_ubatch, already a multiple of 256
    per_cell = 4 * 256 * 2 * 2
    assert kv_cache_bytes(shape, settings) == per_cell * (10 * 1536 + 2 * 32768)
    full = dataclasses.replace(settings, swa_full=True)
    assert kv_cache_bytes(shape, full) == per_cell * 12 * 32768


def test_window_never_exceeds_the_context() -> None:
    shape = make_shape(n_layer=2, sliding_window=4096, swa_layers=(True, False))
    assert kv_cells(shape, ServeSettings(ctx_size=1024)).swa == 1024


def test_layers_without_attention_have_no_kv_but_recurrent_state_per_sequence() -> None:
    heads = (0, 0, 8, 0)
    state = (5000, 5000, 0, 5000)
    shape = make_shape(n_layer=4, n_head_kv=heads, recurrent_state_bytes=state)
    settings = ServeSettings(ctx_size=4096, parallel=2)
    attention = 8 * 128 * 2 * 2 * 4096  # one attention layer, 2 streams of 2048 cells
    assert kv_cache_bytes(shape, settings) == attention + 3 * 5000 * 2


def test_per_layer_heads_save_v_memory_only_with_flash_attention() -> None:
    # Measured in llama.cpp (deci, heads_kv [2, 4, 1, 2]): K per layer; V per layer with flash attention,
    # but sized for the widest layer without it (V is stored transposed).
    shape = make_shape(n_layer=4, n_head_kv=(2, 4, 1, 2), head_dim=32)
    k = 9 * 32 * 2 * 4096
    assert kv_cache_bytes(shape, ServeSettings(ctx_size=4096, flash_attn=True)) == 2 * k
    assert kv_cache_bytes(shape, ServeSettings(ctx_size=4096)) == k + 4 * 4 * 32 * 2 * 4096
