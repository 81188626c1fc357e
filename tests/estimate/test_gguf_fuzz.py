"""Untrusted input: read_model returns or raises GGUFError, whatever the bytes, fast and in bounded memory."""

from __future__ import annotations

import struct
import tempfile
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.estimate.gguf_header import GGUFError, read_model
from agent.estimate.gguf_shape import shape_from_model

MEMORY_LIMIT = 4 * 2**20  # far below what any length field in these files could ask for


def _valid_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "seed.gguf"
        writer = gguf.GGUFWriter(path, "llama")
        writer.add_block_count(2)
        writer.add_embedding_length(8)
        writer.add_head_count(2)
        writer.add_head_count_kv([1, 2])
        writer.add_context_length(64)
        writer.add_sliding_window(16)
        writer.add_sliding_window_pattern(2)
        writer.add_token_list(["a", "bb", "ccc"])
        writer.add_token_scores([0.0, 1.0, 2.0])
        writer.add_string("test.s", "hello")
        writer.add_tensor("token_embd.weight", np.zeros((3, 8), dtype=np.float32))
        writer.add_tensor("blk.0.w", np.zeros((2, 32), dtype=np.float16))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()


VALID = _valid_bytes()


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp) / "fuzz.gguf"


def check(path: Path, data: bytes) -> None:
    """Read ``data`` as a model (and a shape): only success or GGUFError, within the memory limit."""
    path.write_bytes(data)
    tracemalloc.start()
    try:
        model = read_model(path)
        shape_from_model(model)
    except GGUFError as exc:
        assert str(path) in str(exc)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < MEMORY_LIMIT


def test_seed_file_is_valid(scratch: Path) -> None:
    scratch.write_bytes(VALID)
    shape = shape_from_model(read_model(scratch))
    assert shape.n_head_kv == (1, 2)
    assert shape.swa_layers == (True, False)


def test_truncation_at_every_offset(scratch: Path) -> None:
    for cut in range(len(VALID)):
        scratch.write_bytes(VALID[:cut])
        with pytest.raises(GGUFError):
            read_model(scratch)


@settings(max_examples=300, deadline=1000)
@given(st.binary(max_size=512))
def test_random_bytes(scratch: Path, data: bytes) -> None:
    check(scratch, data)


@settings(max_examples=300, deadline=1000)
@given(st.binary(max_size=400).map(lambda tail: b"GGUF" + struct.pack("<I", 3) + tail))
def test_random_bytes_after_a_valid_preamble(scratch: Path, data: bytes) -> None:
    check(scratch, data)


@settings(max_examples=500, deadline=1000)
@given(
    st.lists(
        st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)),
        min_size=1,
        max_size=8,
    )
)
def test_replaced_bytes(scratch: Path, edits: list[tuple[int, int]]) -> None:
    data = bytearray(VALID)
    for offset, value in edits:
        data[offset] = value
    check(scratch, bytes(data))


HUGE = st.sampled_from([2**16, 2**31 - 1, 2**32 - 1, 2**40, 2**62, 2**63, 2**64 - 1])


@settings(max_examples=400, deadline=1000)
@given(st.integers(0, len(VALID) - 8), HUGE, st.sampled_from([4, 8]))
def test_huge_count_or_length_anywhere(scratch: Path, offset: int, value: int, width: int) -> None:
    """Overwrite any field-sized window with a huge number: counts, lengths, dims, types and offsets."""
    data = bytearray(VALID)
    data[offset : offset + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")
    check(scratch, bytes(data))


@settings(max_examples=200, deadline=1000)
@given(st.integers(1, len(VALID) - 1), st.binary(min_size=1, max_size=64))
def test_inserted_bytes(scratch: Path, offset: int, blob: bytes) -> None:
    check(scratch, VALID[:offset] + blob + VALID[offset:])
