"""Remote pre-flight: a model's shape from the GGUF headers of files not downloaded yet, fetched by HTTP Range.

Admission must be decided before gigabytes move, so only the header is fetched: a first range, grown until the
lean header scan parses (it says how many bytes it needs), then the shape is built exactly as for a local file.
The file size comes from ``Content-Range`` (or ``Content-Length`` from a server that ignores ranges, whose body
is cut off after the bytes needed). What was learned is kept in memory per URL, so a retry costs nothing, and beside
a download once it starts, so an agent restarted mid-download does not fetch it again.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from agent.estimate.gguf_header import GGUFError, GGUFHeader, IncompleteHeader, read_header_prefix, read_model
from agent.estimate.gguf_shape import shape_from_model
from agent.estimate.shape import ModelShape
from agent.models.download import DownloadError, http_error
from agent.models.model_store import ModelFiles, RemoteFile, auth_headers, canonical
from agent.util.redact import redact_text
from agent.util.redact import redact_url as redact
from agent.util.safe_files import read_bytes

FIRST_RANGE = 256 << 10
MAX_HEADER = 256 << 20  # a header larger than this is not a model anyone serves
_TOTAL = re.compile(r"/(\d+)$")


@dataclass(frozen=True)
class RemoteHeader:
    url: str
    file_bytes: int
    validator: str | None
    header: GGUFHeader
    prefix: bytes  # the bytes fetched: saved beside a download, so a restarted agent does not fetch them again

    @property
    def fetched_bytes(self) -> int:
        return len(self.prefix)


def _cache(remote: RemoteFile) -> tuple[Path, Path]:
    return remote.path.with_name(remote.path.name + ".header"), remote.path.with_name(remote.path.name + ".header.json")


def save_header(remote: RemoteFile, found: RemoteHeader) -> None:
    """Keep the header beside a download that starts; a store that cannot be written is reported by the download."""
    data, meta = _cache(remote)
    with contextlib.suppress(OSError):
        if not meta.exists():
            data.parent.mkdir(parents=True, exist_ok=True)
            data.write_bytes(found.prefix)
            saved = {"url": canonical(found.url), "file_bytes": found.file_bytes, "validator": found.validator}
            meta.write_text(json.dumps(saved))


def load_header(remote: RemoteFile) -> RemoteHeader | None:
    """The header saved by an earlier download of the same URL, if any and readable."""
    data, meta = _cache(remote)
    try:
        saved = json.loads(read_bytes(meta, 64 << 10))  # regular files only, capped: agent/util/safe_files.py
        prefix = read_bytes(data, MAX_HEADER)
        if saved["url"] != canonical(remote.url):
            return None
        header = read_header_prefix(prefix, saved["file_bytes"], str(remote.path))
        return RemoteHeader(remote.url, saved["file_bytes"], saved["validator"], header, prefix)
    except (OSError, ValueError, KeyError, TypeError):  # GGUFError is a ValueError
        return None


def forget_header(remote: RemoteFile) -> None:
    for path in _cache(remote):
        path.unlink(missing_ok=True)


async def _range(session: aiohttp.ClientSession, url: str, start: int, end: int) -> tuple[bytes, int, str | None]:
    """Bytes ``start..end`` (inclusive), the file size and its validator; reads no more than needed."""
    headers = {"Range": f"bytes={start}-{end}", "Accept-Encoding": "identity", **auth_headers(url)}
    async with session.get(url, headers=headers) as response:
        if response.status >= 400:
            raise http_error(response, redact(url).removesuffix("?…").rsplit("/", 1)[-1])  # never the query
        validator = response.headers.get("ETag") or response.headers.get("Last-Modified")
        if response.status == 206:
            match = _TOTAL.search(response.headers.get("Content-Range", ""))
            if match is None:
                raise DownloadError("MemoryCheckFailed", f"{redact(url)}: no file size in Content-Range")
            return await _read(response, end - start + 1), int(match[1]), validator
        if response.content_length is None:  # 200 without a length: the size cannot be checked before download
            raise DownloadError(
                "MemoryCheckFailed", f"{redact(url)}: the server gives neither Content-Range nor Content-Length"
            )
        data = await _read(response, end + 1)  # the server ignores Range: read the prefix, drop the connection
        return data[start:], response.content_length, validator


async def _read(response: aiohttp.ClientResponse, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    while size < limit:
        block = await response.content.read(min(1 << 20, limit - size))
        if not block:
            break
        parts.append(block)
        size += len(block)
    return b"".join(parts)


async def fetch_header(session: aiohttp.ClientSession, remote: RemoteFile) -> RemoteHeader:
    """The GGUF header of ``remote``, fetched in growing ranges; GGUF errors carry the store path."""
    path = str(remote.path)
    try:
        prefix, total, validator = await _range(session, remote.url, 0, FIRST_RANGE - 1)
        while True:
            try:
                header = read_header_prefix(prefix, total, path)
                return RemoteHeader(remote.url, total, validator, header, prefix)
            except IncompleteHeader as exc:
                if len(prefix) >= total or exc.needed > MAX_HEADER:
                    raise GGUFError(f"{path}: the GGUF header is larger than {MAX_HEADER >> 20} MiB") from None
                want = min(total, MAX_HEADER, max(exc.needed + FIRST_RANGE, 4 * len(prefix)))  # few round trips
                more, _, _ = await _range(session, remote.url, len(prefix), want - 1)
                if not more:
                    raise GGUFError(f"{path}: the server sent no bytes from offset {len(prefix)}") from None
                prefix += more
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise DownloadError(
            "DownloadInterrupted",
            f"fetching the GGUF header of {redact(remote.url)} failed: {redact_text(str(exc))}",
            transient=True,
        ) from exc


def remote_shape(files: ModelFiles, headers: Mapping[str, RemoteHeader]) -> ModelShape:
    """The shape of a remote model from its fetched headers (every shard counted), as if it were on disk."""

    def read(shard_path: str) -> GGUFHeader:
        found = headers.get(shard_path)
        if found is None:
            raise GGUFError(f"{shard_path}: not among the files of {redact(files.remote[0].url)}")
        return found.header

    return shape_from_model(read_model(str(files.path), read=read))
