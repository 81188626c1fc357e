"""Per-architecture modelling without llama.cpp: each promise of the second calibration zoo, checked on shapes.

Every test here would have failed before the estimator modelled the family the way llama.cpp allocates it
(tests/estimate/test_arch_agreement.py checks the same models against real llama.cpp).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from agent.estimate.compute_model import compute_buffer_bytes, compute_model_and_bound, is_calibrated
from agent.estimate.estimator import estimate
from agent.estimate.gguf_header import GGUFError
from agent.estimate.gguf_shape import load_shape
from agent.estimate.kvcache import kv_cache_parts, kv_cells
from agent.estimate.llama_memlog import parse_memory_log
from agent.estimate.shape import ModelShape, ServeSettings
from agent.estimate.tinyarch import BUILDERS, write_arch_gguf
from agent.estimate.tinyarch_blocks import write_model

FA = ServeSettings(ctx_size=4096, flash_attn=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("arch")


def shape_of(folder: Path, name: str) -> ModelShape:
    return load_shape(write_arch_gguf(folder / f"{name}.gguf", name))


def test_mla_caches_only_the_latent_and_no_v(folder: Path) -> None:
    shape = shape_of(folder, "deepseek2")
    assert set(shape.value_length) == {0} and set(shape.key_length) == {128 + 32}
    settings = ServeSettings(ctx_size=4096)
    # K only: 4096 cells x 3 layers x (kv_lora_rank + rope) x f16 (llama.cpp: 3.75 MiB, V 0.00 MiB).
    assert kv_cache_parts(shape, settings).full == 4096 * 3 * 160 * 2


def test_expert_layers_use_the_expert_feed_forward_width(folder: Path) -> None:
    moe, dense = shape_of(folder, "qwen3moe"), shape_of(folder, "qwen3")
    assert (moe.n_ff_expert, moe.n_ff, moe.dense_ffn) == (128, 768, False)
    # Two experts of 128 need less than one dense FFN of 768 (the old model counted 2 x 768).
    assert compute_buffer_bytes(moe, FA) < compute_buffer_bytes(dense, FA)
    deepseek = shape_of(folder, "deepseek2")  # a leading dense layer and a shared expert
    assert (deepseek.n_ff_expert, deepseek.n_ff_shared, deepseek.dense_ffn) == (128, 128, True)


def test_llama4_chunks_attention_by_8192_without_a_window_key(folder: Path) -> None:
    shape = shape_of(folder, "llama4")
    assert shape.sliding_window == 8192 and shape.swa_layers == (True, True, True, False)
    cells = kv_cells(shape, ServeSettings(ctx_size=16384))
    assert (cells.full, cells.swa) == (16384, 8192 + 512)


def test_the_sliding_window_mask_counts_with_flash_attention(folder: Path) -> None:
    shape = shape_of(folder, "gemma3")
    no_window = dataclasses.replace(shape, swa_layers=(False,) * shape.n_layer, sliding_window=0)
    extra = compute_buffer_bytes(shape, FA) - compute_buffer_bytes(no_window, FA)
    assert extra == kv_cells(shape, FA).swa * 512 * 2  # one f16 mask of the window's cells per micro-batch token


def test_ssm_layers_have_working_buffers_whatever_the_attention_settings(folder: Path) -> None:
    shape = shape_of(folder, "mamba2")
    assert shape.ssm is not None and not any(shape.n_head_kv)
    plain = compute_buffer_bytes(shape, ServeSettings(ctx_size=4096))
    assert plain == compute_buffer_bytes(shape, FA) == compute_buffer_bytes(shape, ServeSettings(ctx_size=32768))
    assert plain > 8 * 2**20  # llama.cpp reserves 8.41 MiB; the old model had 2.5-4.5 MiB
    hybrid = shape_of(folder, "granitehybrid")
    assert hybrid.ssm is not None and hybrid.n_head_kv == (0, 0, 2, 0)


def test_an_unknown_architecture_is_bounded_and_says_so(folder: Path) -> None:
    known = shape_of(folder, "qwen3")
    unknown = dataclasses.replace(known, architecture="futurenet")
    assert is_calibrated(known) and not is_calibrated(unknown)
    est, bound = estimate(known, FA), estimate(unknown, FA)
    assert bound.compute_bytes == compute_model_and_bound(known, FA)[1] > est.compute_bytes
    assert not any("calibrated" in note for note in est.notes) and not est.fallback and bound.fallback
    (note,) = [note for note in bound.notes if "not been calibrated" in note]
    assert "'futurenet'" in note and "over" in note


def test_recurrent_state_is_read_from_the_log() -> None:
    log = (
        "load_tensors:   CPU_Mapped model buffer size =     6.43 MiB\n"
        "llama_context:        CPU  output buffer size =     0.00 MiB\n"
        "llama_memory_recurrent: size =    0.40 MiB (     1 cells,   3 layers,  1 seqs  0 rs_seq), "
        "R (f32):    0.02 MiB, S (f32):    0.38 MiB, P (f32):    0.00 MiB\n"
        "sched_reserve:        CPU compute buffer size =     8.41 MiB\n"
    )
    report = parse_memory_log(log)
    assert report.kv == () and report.state_text == "0.40"
    assert report.total_bytes == round((6.43 + 0.40 + 8.41) * 2**20)


def test_mla_needs_both_mla_lengths_and_old_files_keep_their_v(folder: Path) -> None:
    old = shape_of(folder, "deepseek2-kvb")  # converted before the split: plain multi-head attention
    assert set(old.value_length) == {64} and old.n_head_kv == (8, 8, 8) and not old.mla_rank
    half = BUILDERS["deepseek2"]()
    half.meta["attention.value_length_mla"] = 0  # not MLA after all: V is cached as the file says
    shape = load_shape(write_model(half, folder / "half-mla.gguf", "half-mla"))
    assert set(shape.value_length) == {128} and not shape.mla_rank


@pytest.mark.parametrize(
    ("key", "value"),
    [("expert_feed_forward_length", 2**30), ("attention.key_length_mla", 2**20), ("ssm.inner_size", 2**30)],
)
def test_absurd_family_keys_are_rejected(folder: Path, key: str, value: int) -> None:
    model = BUILDERS["deepseek2" if "ssm" not in key else "mamba2"]()
    model.meta[key] = value
    with pytest.raises(GGUFError, match=key.split(".")[-1]):
        load_shape(write_model(model, folder / f"absurd-{key}.gguf", "absurd"))
