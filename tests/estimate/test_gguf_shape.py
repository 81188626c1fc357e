"""Metadata -> ModelShape: llama.cpp's rules, conservative fallbacks and sanity bounds."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest

from agent.estimate.gguf_header import GGUFError
from agent.estimate.gguf_shape import FALLBACK_CONTEXT, load_shape
from agent.estimate.tinymodel import TinyShape, n_vocab, write_tiny_gguf

Setup = Callable[[gguf.GGUFWriter], None]


def write_model(
    path: Path,
    arch: str = "llama",
    setup: Setup | None = None,
    base: bool = True,
    layers: int = 4,
    split_max_tensors: int = 0,
) -> Path:
    """A metadata-rich model with one small tensor per layer; ``setup`` adds or overrides keys."""
    writer = gguf.GGUFWriter(path, arch, split_max_tensors=split_max_tensors)
    if base:
        writer.add_block_count(layers)
        writer.add_embedding_length(256)
        writer.add_head_count(8)
        writer.add_context_length(8192)
        writer.add_feed_forward_length(512)
        writer.add_vocab_size(1000)
    if setup:
        setup(writer)
    writer.add_tensor("token_embd.weight", np.zeros((1000, 256), dtype=np.float16))
    for il in range(layers):
        writer.add_tensor(f"blk.{il}.attn_norm.weight", np.ones(256, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_tiny_llama_matches_its_recipe(tmp_path: Path) -> None:
    recipe = TinyShape(n_layer=3, n_embd=128, n_head=8, n_head_kv=2, head_dim=32, n_ff=320, n_ctx_train=2048)
    path = write_tiny_gguf(tmp_path / "tiny.gguf", recipe)
    shape = load_shape(path)
    assert (shape.architecture, shape.n_layer, shape.n_embd, shape.n_head) == ("llama", 3, 128, 8)
    assert shape.n_head_kv == (2, 2, 2)
    assert shape.key_length == shape.value_length == (32, 32, 32)
    assert (shape.n_ff, shape.context_length, shape.n_vocab) == (320, 2048, n_vocab(recipe))
    assert shape.weights_bytes == sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)
    assert shape.file_bytes == path.stat().st_size
    assert shape.tensor_count == len(gguf.GGUFReader(path).tensors)
    assert shape.shard_count == 1
    assert shape.swa_layers == (False,) * 3 and shape.sliding_window == 0
    assert shape.recurrent_state_bytes == (0, 0, 0)
    assert shape.missing == ()


def test_head_dim_defaults_to_embd_over_heads_as_in_llama_cpp(tmp_path: Path) -> None:
    shape = load_shape(write_tiny_gguf(tmp_path / "tiny.gguf", TinyShape(n_embd=64, n_head=4, head_dim=None)))
    assert shape.key_length == shape.value_length == (16, 16)
    assert not shape.is_fallback  # llama.cpp applies the same default: nothing is guessed


def test_missing_head_count_kv_means_no_gqa(tmp_path: Path) -> None:
    shape = load_shape(write_model(tmp_path / "m.gguf"))
    assert shape.n_head_kv == (8,) * 4
    assert shape.key_length == (32,) * 4
    assert not shape.missing  # llama.cpp's own default, so the estimate stays exact


def test_per_layer_head_count_kv_and_ff_arrays(tmp_path: Path) -> None:
    def setup(w: gguf.GGUFWriter) -> None:
        w.add_head_count_kv([0, 2, 0, 4])
        w.add_key_length(64)
        w.add_value_length(48)
        w.add_array("mixed.feed_forward_length", [512, 1024, 768, 512])

    shape = load_shape(write_model(tmp_path / "m.gguf", "mixed", setup, base=False))
    assert shape.n_head_kv == (0, 2, 0, 4)
    assert shape.key_length == (64,) * 4 and shape.value_length == (48,) * 4
    assert shape.n_ff == 1024
    # No SSM keys: zero-KV layers are simply attention-free, with no recurrent state.
    assert shape.recurrent_state_bytes == (0,) * 4
    # Essential keys came from the tensors, and are reported as assumptions.
    assert (shape.n_layer, shape.n_embd) == (4, 256)
    assert {"mixed.block_count", "mixed.embedding_length"} <= set(shape.missing)


def test_per_layer_array_of_wrong_length_is_rejected(tmp_path: Path) -> None:
    path = write_model(tmp_path / "m.gguf", setup=lambda w: w.add_head_count_kv([1, 2]))
    with pytest.raises(GGUFError, match=r"llama.attention.head_count_kv is an array of 2 items; expected .* \(4\)"):
        load_shape(path)


def test_sliding_window_period(tmp_path: Path) -> None:
    def setup(w: gguf.GGUFWriter) -> None:
        w.add_sliding_window(1024)
        w.add_sliding_window_pattern(3)

    shape = load_shape(write_model(tmp_path / "m.gguf", setup=setup, layers=6))
    assert shape.sliding_window == 1024
    assert shape.swa_layers == (True, True, False, True, True, False)


def test_sliding_window_per_layer_bools_and_swa_head_dim(tmp_path: Path) -> None:
    def setup(w: gguf.GGUFWriter) -> None:
        w.add_sliding_window(512)
        w.add_sliding_window_pattern([False, True, True, False])
        w.add_key_length(128)
        w.add_value_length(128)
        w.add_uint32("llama.attention.key_length_swa", 64)
        w.add_uint32("llama.attention.value_length_swa", 64)

    shape = load_shape(write_model(tmp_path / "m.gguf", setup=setup))
    assert shape.swa_layers == (False, True, True, False)
    assert shape.key_length == (128, 64, 64, 128) == shape.value_length


def test_gemma2_window_without_pattern_alternates(tmp_path: Path) -> None:
    shape = load_shape(write_model(tmp_path / "m.gguf", "gemma2", lambda w: w.add_sliding_window(4096)))
    assert shape.swa_layers == (True, False, True, False)
    assert shape.sliding_window == 4096


def test_window_without_pattern_on_unknown_arch_is_full_attention(tmp_path: Path) -> None:
    shape = load_shape(write_model(tmp_path / "m.gguf", "somearch", lambda w: w.add_sliding_window(4096)))
    assert shape.swa_layers == (False,) * 4
    assert shape.sliding_window == 0


def test_mamba_state_per_layer(tmp_path: Path) -> None:
    def setup(w: gguf.GGUFWriter) -> None:
        w.add_head_count(0)
        w.add_ssm_conv_kernel(4)
        w.add_ssm_inner_size(512)
        w.add_ssm_state_size(16)
        w.add_ssm_time_step_rank(16)

    shape = load_shape(write_model(tmp_path / "m.gguf", "mamba", setup))
    assert shape.n_head_kv == (0,) * 4
    state = 4 * ((4 - 1) * 512 + 16 * 512)  # f32 conv state + ssm state, one sequence
    assert shape.recurrent_state_bytes == (state,) * 4
    assert shape.missing == ()


def test_hybrid_recurrent_layers_follow_zero_kv_heads(tmp_path: Path) -> None:
    def setup(w: gguf.GGUFWriter) -> None:
        w.add_head_count_kv([0, 0, 0, 2])
        w.add_ssm_conv_kernel(4)
        w.add_ssm_inner_size(512)
        w.add_ssm_state_size(64)
        w.add_ssm_group_count(2)

    shape = load_shape(write_model(tmp_path / "m.gguf", "granitehybrid", setup))
    state = 4 * (3 * (512 + 2 * 2 * 64) + 64 * 512)
    assert shape.recurrent_state_bytes == (state, state, state, 0)
    assert shape.n_head_kv == (0, 0, 0, 2)


def test_rwkv_state(tmp_path: Path) -> None:
    def setup(w: gguf.GGUFWriter) -> None:
        w.add_head_count(0)
        w.add_uint32("rwkv6.wkv.head_size", 64)

    shape = load_shape(write_model(tmp_path / "m.gguf", "rwkv6", setup))
    assert shape.recurrent_state_bytes == (4 * (2 * 256 + 256 * 64),) * 4
    assert shape.n_head_kv == (0,) * 4


def test_vocab_fallbacks(tmp_path: Path) -> None:
    def tokens(w: gguf.GGUFWriter) -> None:
        w.add_token_list([f"t{i}" for i in range(777)])

    from_tokens = load_shape(write_model(tmp_path / "a.gguf", "x", tokens, base=False))
    assert from_tokens.n_vocab == 777
    from_tensor = load_shape(write_model(tmp_path / "b.gguf", "x", base=False))
    assert from_tensor.n_vocab == 1000
    assert "tokenizer.ggml.tokens" in from_tensor.missing


def test_missing_context_and_ff_are_conservative(tmp_path: Path) -> None:
    def setup(w: gguf.GGUFWriter) -> None:
        w.add_block_count(2)
        w.add_embedding_length(256)
        w.add_head_count(4)

    shape = load_shape(write_model(tmp_path / "m.gguf", "x", setup, base=False, layers=2))
    assert shape.context_length == FALLBACK_CONTEXT
    assert shape.n_ff == 4 * 256
    assert {"x.context_length", "x.feed_forward_length"} <= set(shape.missing)


def test_missing_essentials_without_tensors_is_an_error(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(tmp_path / "m.gguf", "x")
    writer.add_head_count(4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(GGUFError, match=r"x.block_count is missing and the layer count cannot be derived"):
        load_shape(tmp_path / "m.gguf")


def test_missing_architecture(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + bytes([3, 0, 0, 0]) + bytes(16))
    with pytest.raises(GGUFError, match=r"general.architecture is missing"):
        load_shape(tmp_path / "m.gguf")


@pytest.mark.parametrize(
    ("key", "value", "vtype"),
    [
        ("llama.block_count", 2**60, gguf.GGUFValueType.UINT64),
        ("llama.context_length", 2**50, gguf.GGUFValueType.UINT64),
        ("llama.embedding_length", 2**21, gguf.GGUFValueType.UINT32),
        ("llama.attention.head_count", 0, gguf.GGUFValueType.UINT32),
        ("llama.attention.head_count_kv", 2**20, gguf.GGUFValueType.UINT32),
        ("llama.vocab_size", 2**30, gguf.GGUFValueType.UINT32),
        ("llama.block_count", -3, gguf.GGUFValueType.INT32),
    ],
)
def test_absurd_values_are_rejected(tmp_path: Path, key: str, value: int, vtype: gguf.GGUFValueType) -> None:
    def setup(w: gguf.GGUFWriter) -> None:
        w.kv_data[0].pop(key, None)
        w.add_key_value(key, value, vtype)

    path = write_model(tmp_path / "m.gguf", setup=setup)
    with pytest.raises(GGUFError, match=rf"{key} = {value} is outside the sane range"):
        load_shape(path)


def test_wrong_value_type_is_rejected(tmp_path: Path) -> None:
    def setup(w: gguf.GGUFWriter) -> None:
        w.kv_data[0].pop("llama.block_count")
        w.add_string("llama.block_count", "32")

    with pytest.raises(GGUFError, match=r"llama.block_count must be an integer, got '32'"):
        load_shape(write_model(tmp_path / "m.gguf", setup=setup))


def test_split_model_shape(tmp_path: Path) -> None:
    write_model(tmp_path / "m.gguf", setup=lambda w: w.add_head_count_kv(2), split_max_tensors=2)
    shards = sorted(tmp_path.glob("m-*.gguf"))
    assert len(shards) == 3
    shape = load_shape(shards[0])
    assert shape.shard_count == 3
    assert shape.tensor_count == 5
    assert shape.weights_bytes == 1000 * 256 * 2 + 4 * 256 * 4
    assert shape.file_bytes == sum(p.stat().st_size for p in shards)
    assert shape.n_head_kv == (2,) * 4


def test_shapes_are_cached_until_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, TinyShape(n_layer=2))
    assert load_shape(path) is load_shape(path)
    write_tiny_gguf(path, TinyShape(n_layer=3))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))  # a distinct mtime even on coarse clocks
    assert load_shape(path).n_layer == 3
