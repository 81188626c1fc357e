"""The lean GGUF header reader: agreement with gguf.GGUFReader, split models, and every malformation."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path

import gguf
import numpy as np
import pytest

from agent.estimate.gguf_header import ArrayInfo, GGUFError, read_header, read_model

T = gguf.GGUFValueType
F32 = int(gguf.GGMLQuantizationType.F32)
Q8_0 = int(gguf.GGMLQuantizationType.Q8_0)


def write_with_gguf(path: Path, n_tokens: int = 300, split_max_tensors: int = 0) -> Path:
    """A small llama-like model written by the reference writer."""
    writer = gguf.GGUFWriter(path, "llama", split_max_tensors=split_max_tensors)
    writer.add_block_count(2)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv([2, 1])
    writer.add_context_length(4096)
    writer.add_rope_freq_base(10000.0)
    writer.add_bool("test.flag", True)
    writer.add_int64("test.big", -(2**40))
    writer.add_float64("test.f64", 0.5)
    writer.add_string("test.template", "{{ héllo }}")
    writer.add_token_list([f"t{i}" for i in range(n_tokens)])
    writer.add_token_scores([float(i) for i in range(n_tokens)])
    writer.add_array("test.long", list(range(70_000)))
    writer.add_tensor("token_embd.weight", np.zeros((n_tokens, 64), dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((64, 64), dtype=np.float16))
    writer.add_tensor(
        "blk.1.attn_q.weight",
        np.zeros((64, 34 * 2), dtype=np.uint8),
        raw_dtype=gguf.GGMLQuantizationType.Q8_0,
    )
    writer.add_tensor("blk.1.norm.weight", np.ones(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- a hand-rolled writer for files the reference writer refuses to produce -------------------------------


def gstr(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + struct.pack("<I", vtype) + payload


def kv_u32(key: str, value: int) -> bytes:
    return kv(key, T.UINT32, struct.pack("<I", value))


def kv_array(key: str, item_type: int, length: int, items: bytes) -> bytes:
    return kv(key, T.ARRAY, struct.pack("<IQ", item_type, length) + items)


def tensor_info(name: str, dims: Sequence[int], ggml_type: int = F32, offset: int = 0) -> bytes:
    return gstr(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, offset)


def raw_gguf(
    path: Path,
    kvs: Sequence[bytes] = (),
    tensors: Sequence[bytes] = (),
    data_bytes: int = 0,
    version: int = 3,
    counts: tuple[int, int] | None = None,
    pad: bool = True,
) -> Path:
    n_tensors, n_kv = counts if counts is not None else (len(tensors), len(kvs))
    head = struct.pack("<IIQQ", gguf.GGUF_MAGIC, version, n_tensors, n_kv) + b"".join(kvs) + b"".join(tensors)
    head += b"\0" * (-len(head) % 32 if pad else 0)
    path.write_bytes(head + b"\0" * data_bytes)
    return path


# --- agreement with the reference reader ----------------------------------------------------------------


def test_matches_gguf_reader(tmp_path: Path) -> None:
    path = write_with_gguf(tmp_path / "m.gguf")
    header = read_header(path)
    reference = gguf.GGUFReader(path)

    assert header.version == 3
    assert header.file_bytes == path.stat().st_size
    assert header.alignment == 32
    assert [t.name for t in header.tensors] == [t.name for t in reference.tensors]
    for ours, theirs in zip(header.tensors, reference.tensors, strict=True):
        assert ours.dims == tuple(int(d) for d in theirs.shape)
        assert ours.ggml_type == int(theirs.tensor_type)
        assert ours.nbytes == int(theirs.n_bytes)
    assert read_model(path).weights_bytes == sum(int(t.n_bytes) for t in reference.tensors)

    for name, field in reference.fields.items():
        if name.startswith("GGUF."):
            continue
        ours_value = header.metadata[name]
        if field.types[0] == T.ARRAY:
            assert isinstance(ours_value, ArrayInfo)
            assert ours_value.item_type == field.types[1]
            assert ours_value.length == len(field.data)
            if ours_value.values is not None:
                assert list(ours_value.values) == field.contents()
        else:
            assert ours_value == field.contents()


def test_arrays_keep_short_numeric_values_and_skip_strings_and_long_arrays(tmp_path: Path) -> None:
    header = read_header(write_with_gguf(tmp_path / "m.gguf", n_tokens=500))
    assert header.metadata["llama.attention.head_count_kv"] == ArrayInfo(T.INT32, 2, (2, 1))
    assert header.metadata["tokenizer.ggml.tokens"] == ArrayInfo(T.STRING, 500, None)
    assert header.metadata["test.long"] == ArrayInfo(T.INT32, 70_000, None)
    assert header.metadata["test.template"] == "{{ héllo }}"
    assert header.metadata["test.flag"] is True


def test_string_array_longer_than_read_buffer(tmp_path: Path) -> None:
    """Strings that straddle and exceed the reader's chunk are walked correctly."""
    writer = gguf.GGUFWriter(tmp_path / "big.gguf", "llama")
    writer.add_array("test.strings", ["x" * 3_000_000, "short", "y" * 700_000, *["z"] * 50_000])
    writer.add_uint32("test.after", 7)
    writer.add_tensor("a", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    header = read_header(tmp_path / "big.gguf")
    assert header.metadata["test.strings"] == ArrayInfo(T.STRING, 50_003, None)
    assert header.metadata["test.after"] == 7
    assert header.tensors[0].nbytes == 32


def test_string_walk_ends_exactly_after_the_last_string_at_every_count(tmp_path: Path) -> None:
    """Arrays of 1-17 strings (every remainder of the eight-a-step walk, empty strings among them), each followed
    by a value that is only read right when the walk stopped exactly where the strings end."""
    writer = gguf.GGUFWriter(tmp_path / "counts.gguf", "llama")
    for count in range(1, 18):
        writer.add_array(f"test.s{count}", [f"s{i}" * (i % 5) or "" for i in range(count)])
        writer.add_uint32(f"test.after{count}", count)
    writer.add_tensor("a", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    header = read_header(tmp_path / "counts.gguf")
    for count in range(1, 18):
        assert header.metadata[f"test.s{count}"] == ArrayInfo(T.STRING, count, None)
        assert header.metadata[f"test.after{count}"] == count
    assert header.tensors[0].nbytes == 32


def test_version_2_is_read_like_version_3(tmp_path: Path) -> None:
    path = write_with_gguf(tmp_path / "m.gguf")
    v3 = read_header(path)
    data = bytearray(path.read_bytes())
    data[4:8] = struct.pack("<I", 2)
    path.write_bytes(bytes(data))
    v2 = read_header(path)
    assert v2.version == 2
    assert (v2.metadata, v2.tensors) == (v3.metadata, v3.tensors)


# --- split models -----------------------------------------------------------------------------------------


def test_split_model_sums_every_shard(tmp_path: Path) -> None:
    write_with_gguf(tmp_path / "m.gguf", split_max_tensors=2)
    shards = sorted(tmp_path.glob("m-*.gguf"))
    assert [p.name for p in shards] == ["m-00001-of-00002.gguf", "m-00002-of-00002.gguf"]
    model = read_model(shards[0])
    assert len(model.headers) == 2
    assert len(model.tensors) == 4
    reference = [gguf.GGUFReader(p) for p in shards]
    assert model.weights_bytes == sum(int(t.n_bytes) for r in reference for t in r.tensors)
    assert model.file_bytes == sum(p.stat().st_size for p in shards)
    assert model.metadata["llama.block_count"] == 2


def test_split_model_missing_shard(tmp_path: Path) -> None:
    write_with_gguf(tmp_path / "m.gguf", split_max_tensors=1)
    (tmp_path / "m-00003-of-00004.gguf").unlink()
    with pytest.raises(GGUFError, match=r"shard 3 of 4 is missing"):
        read_model(tmp_path / "m-00001-of-00004.gguf")


def test_split_model_rejects_non_first_shard(tmp_path: Path) -> None:
    write_with_gguf(tmp_path / "m.gguf", split_max_tensors=2)
    with pytest.raises(GGUFError, match=r"shard 2 of 2; pass the first shard"):
        read_model(tmp_path / "m-00002-of-00002.gguf")


def test_split_shard_disagreeing_count(tmp_path: Path) -> None:
    write_with_gguf(tmp_path / "m.gguf", split_max_tensors=2)
    second = tmp_path / "m-00002-of-00002.gguf"
    raw_gguf(second, [kv("split.no", T.UINT16, struct.pack("<H", 1)), kv("split.count", T.UINT16, b"\x03\x00")])
    with pytest.raises(GGUFError, match=r"split.count is 3, expected 2"):
        read_model(tmp_path / "m-00001-of-00002.gguf")


def test_split_count_without_shard_name(tmp_path: Path) -> None:
    path = raw_gguf(tmp_path / "plain.gguf", [kv("split.count", T.UINT16, b"\x02\x00")])
    with pytest.raises(GGUFError, match=r"other shards cannot be found"):
        read_model(path)


def test_split_tensor_count_mismatch(tmp_path: Path) -> None:
    first = [kv("split.no", T.UINT16, b"\x00\x00"), kv("split.count", T.UINT16, b"\x02\x00")]
    raw_gguf(tmp_path / "x-00001-of-00002.gguf", [*first, kv("split.tensors.count", T.INT32, b"\x05\0\0\0")])
    second = [kv("split.no", T.UINT16, b"\x01\x00"), kv("split.count", T.UINT16, b"\x02\x00")]
    raw_gguf(tmp_path / "x-00002-of-00002.gguf", second, [tensor_info("a", [8])], data_bytes=32)
    with pytest.raises(GGUFError, match=r"split.tensors.count is 5 but the shards hold 1"):
        read_model(tmp_path / "x-00001-of-00002.gguf")


# --- malformed files --------------------------------------------------------------------------------------

MALFORMED: dict[str, tuple[dict[str, object], str]] = {
    "v1": ({"version": 1}, r"unsupported GGUF version 1"),
    "v4": ({"version": 4}, r"unsupported GGUF version 4"),
    "huge kv count": ({"counts": (0, 2**62)}, r"metadata count \d+ is impossible"),
    "huge tensor count": ({"counts": (2**40, 0)}, r"tensor count \d+ is impossible"),
    "kv count past end": (
        {"kvs": [kv("a", T.STRING, gstr("x" * 40))], "counts": (0, 2), "pad": False},
        r"truncated: needs 8 bytes at offset 85",
    ),
    "empty key": ({"kvs": [kv_u32("", 1)]}, r"empty metadata key"),
    "huge key length": ({"kvs": [struct.pack("<Q", 2**60) + b"\0" * 32]}, r"metadata key is \d+ bytes long"),
    "huge string value": ({"kvs": [kv("a", T.STRING, struct.pack("<Q", 2**50))]}, r"string value of 'a'"),
    "string past end": ({"kvs": [kv("a", T.STRING, struct.pack("<Q", 5000) + b"ab")]}, r"truncated"),
    "unknown value type": ({"kvs": [kv("a", 99, b"\0" * 8)]}, r"key 'a' has unknown value type 99"),
    "unknown array item type": ({"kvs": [kv_array("a", 42, 1, b"\0" * 8)]}, r"unknown value type 42"),
    "nested array": ({"kvs": [kv_array("a", T.ARRAY, 1, b"\0" * 16)]}, r"nested array"),
    "huge numeric array": ({"kvs": [kv_array("a", T.UINT32, 2**61, b"")]}, r"more than the file can hold"),
    "huge string array": ({"kvs": [kv_array("a", T.STRING, 2**40, b"")]}, r"more than the file can hold"),
    "string array item past end": (
        {"kvs": [kv_array("a", T.STRING, 2, gstr("ok") + struct.pack("<Q", 2**40))]},
        r"string of \d+ bytes .* runs past the end",
    ),
    # The fast walk takes eight strings a step: a bad length in the middle of a step, or one too large for an offset.
    "string array item past end mid-step": (
        {"kvs": [kv_array("a", T.STRING, 20, gstr("ok") * 11 + struct.pack("<Q", 2**40) + gstr("k") * 8)]},
        r"string of 1099511627776 bytes at offset \d+ runs past the end",
    ),
    "string array item of 2**64-1 bytes": (
        {"kvs": [kv_array("a", T.STRING, 20, gstr("ok") * 9 + struct.pack("<Q", 2**64 - 1) + gstr("k") * 10)]},
        r"string of 18446744073709551615 bytes .* runs past the end",
    ),
    "string array shorter than its count": (
        {"kvs": [kv_array("a", T.STRING, 34, gstr("ok") * 30)], "pad": False},
        r"truncated|runs past the end",
    ),
    "duplicate key": ({"kvs": [kv_u32("a", 1), kv_u32("a", 2)]}, r"duplicate metadata key 'a'"),
    "bad alignment": ({"kvs": [kv_u32("general.alignment", 3)]}, r"general.alignment must be a power of two"),
    "zero alignment": ({"kvs": [kv_u32("general.alignment", 0)]}, r"power of two"),
    "too many dims": ({"tensors": [tensor_info("t", [1, 1, 1, 1, 1])]}, r"'t' has 5 dimensions"),
    "zero dims": ({"tensors": [gstr("t") + struct.pack("<IIQ", 0, F32, 0)]}, r"'t' has 0 dimensions"),
    "zero dim": ({"tensors": [tensor_info("t", [8, 0])]}, r"invalid dimension 0"),
    "negative dim": ({"tensors": [tensor_info("t", [8, 2**64 - 1])]}, r"invalid dimension"),
    "overflowing dims": ({"tensors": [tensor_info("t", [2**62, 2**62, 2**62])]}, r"larger than the file"),
    "unknown ggml type": ({"tensors": [tensor_info("t", [8], ggml_type=5)]}, r"unknown ggml type 5"),
    "huge ggml type": ({"tensors": [tensor_info("t", [8], ggml_type=2**31)]}, r"unknown ggml type"),
    "not a block multiple": ({"tensors": [tensor_info("t", [33], ggml_type=Q8_0)]}, r"multiple of the block"),
    "data past end": ({"tensors": [tensor_info("t", [8])]}, r"'t' .* runs past the end of the file"),
    "offset past end": ({"tensors": [tensor_info("t", [8], offset=2**40)]}, r"runs past the end"),
    "unaligned offset": ({"tensors": [tensor_info("t", [8], offset=4)], "data_bytes": 64}, r"not aligned"),
    "duplicate tensor": (
        {"tensors": [tensor_info("t", [8]), tensor_info("t", [8], offset=32)], "data_bytes": 64},
        r"duplicate tensor name 't'",
    ),
    "huge tensor name": ({"tensors": [struct.pack("<Q", 2**50) + b"\0" * 32]}, r"tensor name is \d+ bytes"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_file_raises_clear_error(tmp_path: Path, case: str) -> None:
    kwargs, message = MALFORMED[case]
    path = raw_gguf(tmp_path / "bad.gguf", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(GGUFError, match=message) as info:
        read_model(path)
    assert str(path) in str(info.value)


def test_valid_hand_written_file_reads(tmp_path: Path) -> None:
    """The hand-rolled writer is itself sound, so the malformed cases above fail for their stated reason."""
    path = raw_gguf(tmp_path / "ok.gguf", [kv_u32("a", 1)], [tensor_info("t", [8, 2])], data_bytes=64)
    assert read_model(path).weights_bytes == 64 == sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)


def test_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGML" + b"\0" * 60)
    with pytest.raises(GGUFError, match=r"not a GGUF file"):
        read_model(path)


def test_big_endian_is_rejected_clearly(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(tmp_path / "be.gguf", "llama", endianess=gguf.GGUFEndian.BIG)
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(GGUFError, match=r"big-endian GGUF files are not supported"):
        read_model(tmp_path / "be.gguf")


def test_truncated_valid_file(tmp_path: Path) -> None:
    data = write_with_gguf(tmp_path / "m.gguf").read_bytes()
    for cut in (0, 3, 7, 20, 100, 2000, len(data) - 1):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(GGUFError, match=r"truncated|runs past the end"):
            read_model(tmp_path / "cut.gguf")


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match=r"cannot read"):
        read_model(tmp_path / "absent.gguf")
    with pytest.raises(GGUFError, match=r"cannot read"):
        read_model(tmp_path)
