"""Read the parts of a GGUF header that memory budgeting needs, fast and safely.

``gguf.GGUFReader`` decodes every vocabulary string and memory-maps the whole file; on a 152k-token vocabulary
that takes seconds. Budgeting needs only scalar metadata, short numeric arrays (per-layer head counts,
sliding-window patterns) and tensor shapes, so this reader walks string arrays by their length prefixes and
seeks past everything else. Model files come from untrusted places: every count and length is checked against
the bytes left in the file before anything is read or allocated, so a hostile file costs bounded time and
memory and fails with one clear ``GGUFError``.
"""

from __future__ import annotations

import io
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from agent.estimate.gguf_constants import gguf
from agent.util.safe_files import open_regular

MAX_ARRAY_VALUES = 65_536  # numeric arrays up to this length keep their values; longer ones are skipped
MAX_KV_COUNT = 1_000_000
MAX_TENSOR_COUNT = 1_000_000
MAX_KEY_BYTES = 65_535
MAX_STRING_VALUE_BYTES = 16 * 2**20  # chat templates are tens of KiB; anything this large is not metadata
MAX_TENSOR_NAME_BYTES = 4096
GGML_MAX_DIMS = 4  # ggml.h; the gguf package does not export it
_CHUNK = 1 << 20

# Smallest encodings, used to reject counts that cannot fit in the bytes left.
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, one-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset

_T = gguf.GGUFValueType
_SCALAR_FORMATS: dict[gguf.GGUFValueType, str] = {
    _T.UINT8: "B",
    _T.INT8: "b",
    _T.UINT16: "H",
    _T.INT16: "h",
    _T.UINT32: "I",
    _T.INT32: "i",
    _T.FLOAT32: "f",
    _T.BOOL: "?",
    _T.UINT64: "Q",
    _T.INT64: "q",
    _T.FLOAT64: "d",
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_QUANT_SIZES = {int(kind): sizes for kind, sizes in gguf.GGML_QUANT_SIZES.items()}  # ggml type -> (block, bytes)
# A tensor info after its name and dimension count: the dimensions, the ggml type and the data offset.
_TENSOR_REST = {n: struct.Struct(f"<{n}QIQ") for n in range(1, GGML_MAX_DIMS + 1)}
_SHARD_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")

Scalar = int | float | bool | str


class GGUFError(ValueError):
    """A GGUF file that cannot be budgeted: malformed, unsupported or inconsistent."""


class IncompleteHeader(GGUFError):
    """The header runs past the bytes fetched so far (a remote prefix): fetch at least ``needed`` bytes."""

    def __init__(self, message: str, needed: int) -> None:
        super().__init__(message)
        self.needed = needed


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]
    ggml_type: int
    nbytes: int


@dataclass(frozen=True)
class ArrayInfo:
    """An array value: its values only when numeric and short enough to matter for budgeting."""

    item_type: gguf.GGUFValueType
    length: int
    values: tuple[int | float | bool, ...] | None


@dataclass(frozen=True)
class GGUFHeader:
    path: str
    version: int
    file_bytes: int
    alignment: int
    metadata: dict[str, Scalar | ArrayInfo]
    tensors: tuple[TensorInfo, ...]


@dataclass(frozen=True)
class GGUFModel:
    """One model, possibly split over several shards; metadata comes from the first shard."""

    path: str
    headers: tuple[GGUFHeader, ...]
    metadata: dict[str, Scalar | ArrayInfo]
    tensors: tuple[TensorInfo, ...]
    weights_bytes: int
    file_bytes: int


class _Cursor:
    """A bounds-checked, chunk-buffered reader: every read first proves the bytes exist in the file."""

    def __init__(self, file: BinaryIO, size: int, fail: Callable[[str], GGUFError], available: int = -1) -> None:
        self._file = file
        self.size = size
        self.available = size if available < 0 else available  # bytes readable: less than size for a prefix
        self.fail = fail
        self.pos = 0
        self._buf = b""
        self._buf_start = 0

    def window(self, n: int) -> tuple[bytes, int]:
        """Return a buffer and the index of ``pos`` in it, holding at least ``n`` bytes from ``pos``."""
        if n > self.size - self.pos:
            raise self.fail(f"truncated: needs {n} bytes at offset {self.pos}, file has {self.size}")
        off = self.pos - self._buf_start
        if off < 0 or off + n > len(self._buf):
            if self.pos + n > self.available:
                raise IncompleteHeader(f"header continues past the first {self.available} bytes", self.pos + n)
            self._file.seek(self.pos)
            self._buf = self._file.read(max(n, _CHUNK))
            self._buf_start = self.pos
            off = 0
            if len(self._buf) < n:
                raise self.fail(f"truncated: short read at offset {self.pos}")
        return self._buf, off

    def read(self, n: int) -> bytes:
        buf, off = self.window(n)
        self.pos += n
        return buf[off : off + n]

    def unpack(self, fmt: struct.Struct) -> int:
        buf, off = self.window(fmt.size)
        self.pos += fmt.size
        value: int = fmt.unpack_from(buf, off)[0]
        return value

    def skip(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(f"{what} of {n} bytes at offset {self.pos} runs past the end of the file")
        self.pos += n

    def skip_strings(self, count: int) -> None:
        """Walk ``count`` length-prefixed strings without decoding them (vocabularies, merges).

        A vocabulary holds hundreds of thousands of strings, so the walk over each buffered window is as tight
        as Python allows (``_walk_lengths``); a string that ends past the window is seeked over, and one that
        ends past the file fails.
        """
        while count:
            buf, off = self.window(8)
            done, off = _walk_lengths(buf, off, count, self.size - self._buf_start)
            if done < count and off + 8 <= len(buf):  # the next string ends past the file
                length = _U64.unpack_from(buf, off)[0]
                raise self.fail(f"string of {length} bytes at offset {self._buf_start + off + 8} runs past the end")
            self.pos = self._buf_start + off  # may lie past the window: the next one starts there
            count -= done

    def string(self, limit: int, what: str) -> str:
        length = self.unpack(_U64)
        if length > limit:
            raise self.fail(f"{what} is {length} bytes long at offset {self.pos - 8} (limit {limit})")
        return self.read(length).decode("utf-8", errors="replace")


def _walk_lengths(buf: bytes, off: int, count: int, limit: int) -> tuple[int, int]:
    """Follow up to ``count`` length prefixes from ``buf[off]``: (strings passed, offset after the last one).

    Stops at the first length prefix that is not wholly in ``buf`` or at a string that would end past ``limit``
    (the bytes the file has from ``buf[0]``). Eight strings per step with no checks between them: a prefix past
    the buffer raises, which sends that step to the careful loop, and so does a step that ends past ``limit``.
    """
    unpack = _U64.unpack_from
    done, end = 0, len(buf)
    step = off
    try:
        while count - done >= 8:
            step = off
            off += 8 + unpack(buf, off)[0]
            off += 8 + unpack(buf, off)[0]
            off += 8 + unpack(buf, off)[0]
            off += 8 + unpack(buf, off)[0]
            off += 8 + unpack(buf, off)[0]
            off += 8 + unpack(buf, off)[0]
            off += 8 + unpack(buf, off)[0]
            off += 8 + unpack(buf, off)[0]
            if off > limit:
                off = step
                break
            done += 8
    except (struct.error, OverflowError):  # a length prefix past the buffer (or an offset past any buffer)
        off = step
    while done < count and off + 8 <= end:
        after = off + 8 + unpack(buf, off)[0]
        if after > limit:
            break
        off = after
        done += 1
    return done, off


def _value_type(cur: _Cursor, raw: int, key: str) -> gguf.GGUFValueType:
    try:
        return gguf.GGUFValueType(raw)
    except ValueError:
        raise cur.fail(f"key {key!r} has unknown value type {raw}") from None


def _read_scalar(cur: _Cursor, vtype: gguf.GGUFValueType, key: str) -> Scalar:
    if vtype == _T.STRING:
        return cur.string(MAX_STRING_VALUE_BYTES, f"string value of {key!r}")
    fmt = struct.Struct("<" + _SCALAR_FORMATS[vtype])
    value: Scalar = fmt.unpack_from(cur.read(fmt.size))[0]
    return value


def _read_array(cur: _Cursor, key: str) -> ArrayInfo:
    item_type = _value_type(cur, cur.unpack(_U32), key)
    length = cur.unpack(_U64)
    if item_type == _T.ARRAY:
        raise cur.fail(f"key {key!r} is a nested array, which GGUF readers do not support")
    if item_type == _T.STRING:
        if length > (cur.size - cur.pos) // 8:
            raise cur.fail(f"string array {key!r} claims {length} items, more than the file can hold")
        cur.skip_strings(length)
        return ArrayInfo(item_type, length, None)
    code = _SCALAR_FORMATS[item_type]
    item_size = struct.calcsize(code)
    if length > (cur.size - cur.pos) // item_size:
        raise cur.fail(f"array {key!r} claims {length} items, more than the file can hold")
    if length > MAX_ARRAY_VALUES:
        cur.skip(length * item_size, f"array {key!r}")
        return ArrayInfo(item_type, length, None)
    values = struct.unpack_from(f"<{length}{code}", cur.read(length * item_size))
    return ArrayInfo(item_type, length, values)


def _read_tensor_info(cur: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
    name = cur.string(MAX_TENSOR_NAME_BYTES, "tensor name")
    n_dims = cur.unpack(_U32)
    if not 1 <= n_dims <= GGML_MAX_DIMS:
        raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (must be 1..{GGML_MAX_DIMS})")
    layout = _TENSOR_REST[n_dims]
    buf, off = cur.window(layout.size)  # unpacked in place: a big model has thousands of tensor infos
    *dims, ggml_type, offset = layout.unpack_from(buf, off)
    cur.pos += layout.size
    return name, tuple(dims), ggml_type, offset


def _tensor_nbytes(cur: _Cursor, name: str, dims: tuple[int, ...], ggml_type: int) -> int:
    sizes = _QUANT_SIZES.get(ggml_type)
    if sizes is None:
        raise cur.fail(f"tensor {name!r} has unknown ggml type {ggml_type}")
    block_size, type_size = sizes
    elements = 1
    for dim in dims:
        if not 0 < dim < 2**63:
            raise cur.fail(f"tensor {name!r} has invalid dimension {dim} in {dims}")
        elements *= dim
        if elements > cur.size * block_size:  # more elements than the file could ever hold: stop early
            raise cur.fail(f"tensor {name!r} with dims {dims} is larger than the file ({cur.size} bytes)")
    if dims[0] % block_size:
        raise cur.fail(f"tensor {name!r}: dims[0]={dims[0]} is not a multiple of the block size {block_size}")
    return elements // block_size * type_size


def _read_version(cur: _Cursor, fail: Callable[[str], GGUFError]) -> int:
    magic = cur.unpack(_U32)
    if magic != gguf.GGUF_MAGIC:
        raise fail(f"not a GGUF file (magic {magic:#010x}, expected {gguf.GGUF_MAGIC:#010x})")
    version = cur.unpack(_U32)
    if version & 0xFFFF == 0 and int.from_bytes(version.to_bytes(4, "little"), "big") in (2, 3):
        raise fail("big-endian GGUF files are not supported")
    if version not in (2, 3):
        raise fail(f"unsupported GGUF version {version} (only 2 and 3 are supported)")
    return version


def read_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """Read one GGUF file's metadata and tensor infos, checking tensor data lies within the file."""
    path_str = os.fspath(path)

    def fail(message: str) -> GGUFError:
        return GGUFError(f"{path_str}: {message}")

    try:
        with open_regular(path_str) as (fd, size), os.fdopen(os.dup(fd), "rb") as file:  # never a FIFO or device
            return _parse(_Cursor(file, size, fail), path_str, fail)
    except OSError as exc:
        raise fail(f"cannot read: {exc.strerror or exc}") from exc


def read_header_prefix(prefix: bytes, file_bytes: int, path: str) -> GGUFHeader:
    """The header of a ``file_bytes`` file from its first bytes (HTTP Range); ``IncompleteHeader`` if too few."""

    def fail(message: str) -> GGUFError:
        return GGUFError(f"{path}: {message}")

    return _parse(_Cursor(io.BytesIO(prefix), file_bytes, fail, len(prefix)), path, fail)


def _parse(cur: _Cursor, path: str, fail: Callable[[str], GGUFError]) -> GGUFHeader:
    version = _read_version(cur, fail)
    tensor_count = cur.unpack(_U64)
    kv_count = cur.unpack(_U64)
    if kv_count > MAX_KV_COUNT or kv_count * _MIN_KV_BYTES > cur.size - cur.pos:
        raise fail(f"metadata count {kv_count} is impossible for a file of {cur.size} bytes")
    if tensor_count > MAX_TENSOR_COUNT or tensor_count * _MIN_TENSOR_INFO_BYTES > cur.size - cur.pos:
        raise fail(f"tensor count {tensor_count} is impossible for a file of {cur.size} bytes")

    metadata: dict[str, Scalar | ArrayInfo] = {}
    for _ in range(kv_count):
        key = cur.string(MAX_KEY_BYTES, "metadata key")
        if not key:
            raise fail(f"empty metadata key at offset {cur.pos}")
        if key in metadata:
            raise fail(f"duplicate metadata key {key!r}")
        vtype = _value_type(cur, cur.unpack(_U32), key)
        metadata[key] = _read_array(cur, key) if vtype == _T.ARRAY else _read_scalar(cur, vtype, key)

    alignment = metadata.get(gguf.Keys.General.ALIGNMENT, gguf.GGUF_DEFAULT_ALIGNMENT)
    if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
        raise fail(f"{gguf.Keys.General.ALIGNMENT} must be a power of two, got {alignment!r}")

    raw_infos = [_read_tensor_info(cur) for _ in range(tensor_count)]
    data_start = -(-cur.pos // alignment) * alignment
    tensors: list[TensorInfo] = []
    seen: set[str] = set()
    for name, dims, ggml_type, offset in raw_infos:
        if name in seen:
            raise fail(f"duplicate tensor name {name!r}")
        seen.add(name)
        nbytes = _tensor_nbytes(cur, name, dims, ggml_type)
        if offset % alignment:
            raise fail(f"tensor {name!r} data offset {offset} is not aligned to {alignment}")
        if data_start + offset + nbytes > cur.size:
            raise fail(
                f"tensor {name!r} ({nbytes} bytes at data offset {offset}) runs past the end of the file "
                f"({cur.size} bytes); the file is truncated or corrupt"
            )
        tensors.append(TensorInfo(name, tuple(dims), ggml_type, nbytes))
    return GGUFHeader(path, version, cur.size, alignment, metadata, tuple(tensors))


def _split_int(header: GGUFHeader, key: str) -> int | None:
    value = header.metadata.get(key)
    if value is None:
        return None
    if type(value) is not int:
        raise GGUFError(f"{header.path}: {key} must be an integer, got {value!r}")
    return value


def _shard_paths(first: GGUFHeader) -> list[str]:
    """Locate every shard of a split model from the first one (llama.cpp's ``-0000N-of-0000M`` naming)."""
    count = _split_int(first, gguf.Keys.Split.LLM_KV_SPLIT_COUNT)
    match = _SHARD_NAME.match(Path(first.path).name)
    if count is None or count <= 1:
        if match and int(match["count"]) > 1:
            raise GGUFError(f"{first.path}: named as shard of {int(match['count'])} but has no split.count key")
        return [first.path]
    if count > 99_999:
        raise GGUFError(f"{first.path}: split.count {count} is absurd")
    if match is None:
        raise GGUFError(
            f"{first.path}: split.count is {count} but the file name does not follow "
            f"NAME-00001-of-{count:05d}.gguf, so the other shards cannot be found"
        )
    if int(match["count"]) != count:
        raise GGUFError(f"{first.path}: file name says {int(match['count'])} shards but split.count is {count}")
    directory = Path(first.path).parent
    return [first.path] + [
        str(directory / f"{match['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(2, count + 1)
    ]


def read_model(path: str | os.PathLike[str], read: Callable[[str], GGUFHeader] | None = None) -> GGUFModel:
    """Read a model (a split model from its first shard); ``read`` reads a shard's header (default: from disk)."""
    path_str = os.fspath(path)
    match = _SHARD_NAME.match(Path(path_str).name)
    if match and int(match["no"]) != 1:
        raise GGUFError(
            f"{path_str}: this is shard {int(match['no'])} of {int(match['count'])}; "
            f"pass the first shard (…-00001-of-{match['count']}.gguf)"
        )
    first = (read or read_header)(path_str)
    split_no = _split_int(first, gguf.Keys.Split.LLM_KV_SPLIT_NO)
    if split_no not in (None, 0):
        raise GGUFError(f"{path_str}: split.no is {split_no}; pass the first shard of the split model")
    paths = _shard_paths(first)
    headers = [first]
    for index, shard_path in enumerate(paths[1:], start=1):
        if read is None and not os.path.exists(shard_path):
            raise GGUFError(f"{path_str}: shard {index + 1} of {len(paths)} is missing: {shard_path}")
        shard = (read or read_header)(shard_path)
        for key, expected in (
            (gguf.Keys.Split.LLM_KV_SPLIT_NO, index),
            (gguf.Keys.Split.LLM_KV_SPLIT_COUNT, len(paths)),
        ):
            if _split_int(shard, key) != expected:
                raise GGUFError(f"{shard_path}: {key} is {shard.metadata.get(key)!r}, expected {expected}")
        headers.append(shard)

    tensors = tuple(t for header in headers for t in header.tensors)
    if len({t.name for t in tensors}) != len(tensors):
        raise GGUFError(f"{path_str}: the same tensor name appears in more than one shard")
    declared = _split_int(first, gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT)
    if declared is not None and len(paths) > 1 and declared != len(tensors):
        raise GGUFError(f"{path_str}: split.tensors.count is {declared} but the shards hold {len(tensors)} tensors")
    return GGUFModel(
        path=path_str,
        headers=tuple(headers),
        metadata=first.metadata,
        tensors=tensors,
        weights_bytes=sum(t.nbytes for t in tensors),
        file_bytes=sum(h.file_bytes for h in headers),
    )
