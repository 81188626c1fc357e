"""Download one remote model file into the model store: resumable, verified, atomic, never twice at once.

Bytes go to ``NAME.partial``; its validator (strong ETag, else Last-Modified) is kept in ``NAME.partial.json``
so an interrupted download resumes with ``Range`` guarded by ``If-Range``: a remote file that changed, or a
server that ignores ranges, answers 200 and the file restarts from zero. The sha256 is computed as bytes arrive
(a resumed prefix is hashed first) and the file is renamed into place only when complete and verified; its
digest is kept in ``NAME.sha256`` so a later check does not re-read gigabytes. ``NAME.lock`` (flock) keeps a
second agent sharing the store from writing the same file: it waits and then finds the file done.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import anyio.to_thread
import structlog

from agent.models.model_store import RemoteFile, auth_headers, canonical
from agent.util.quantity import format_bytes
from agent.util.redact import redact_text
from agent.util.redact import redact_url as redact
from agent.util.safe_files import open_regular, read_bytes

log = structlog.get_logger("metal_agent.download")
CHUNK = 1 << 20
WRITE_BATCH = 8 << 20  # bytes gathered before a write + hash in a worker thread
READ_BUFFER = 16 << 20  # the session's socket buffer: the network keeps flowing while a batch is written
FLUSH_SECONDS = 1.0  # ... or this long: a killed agent loses at most a second of a slow download
LOCK_POLL = 0.5
SIDECAR_BYTES = 64 << 10  # the JSON files kept beside a download are a few hundred bytes
MODEL_FILE_MODE = 0o640  # the default of the model_file_mode setting
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
DiskFree = Callable[[Path], int]


class DownloadError(Exception):
    """A download that did not complete; ``transient`` ones (network) are retried with backoff."""

    def __init__(self, reason: str, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.reason, self.transient = reason, transient


@dataclass
class Progress:
    """Bytes done of total for one file; shared by every unit that waits for it."""

    name: str
    done: int = 0
    total: int | None = None
    resumed_from: int = 0
    started: float = field(default_factory=time.monotonic)
    waiting_for_lock: bool = False
    logged_at: float = float("-inf")  # when its last progress log line was written

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return (self.done - self.resumed_from) / elapsed if elapsed > 0 else 0.0

    def text(self) -> str:
        if self.waiting_for_lock:
            return f"{self.name}: waiting for another agent downloading it into the same store"
        total = f" of {format_bytes(self.total)} ({self.done / self.total:.0%})" if self.total else ""
        rate = f", {format_bytes(int(self.rate()))}/s" if self.done > self.resumed_from else ""
        return f"{self.name}: {format_bytes(self.done)}{total}{rate}"


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def sidecar(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _hash_file(path: Path, limit: int | None = None) -> Any:
    hasher = hashlib.sha256()
    with open_regular(path) as (fd, _), os.fdopen(os.dup(fd), "rb") as file:  # never a FIFO or a device
        left = limit if limit is not None else -1
        while left:
            block = file.read(CHUNK if left < 0 else min(CHUNK, left))
            if not block:
                break
            hasher.update(block)
            left -= len(block) if left > 0 else 0
    return hasher


async def stored_digest(path: Path) -> str:
    """The sha256 of a complete stored file, from its sidecar or (once) by reading it."""
    digest_file = sidecar(path, ".sha256")
    with contextlib.suppress(OSError):
        recorded = json.loads(read_bytes(digest_file, SIDECAR_BYTES))
        if recorded["size"] == path.stat().st_size and recorded["mtime_ns"] == path.stat().st_mtime_ns:
            return str(recorded["sha256"])
    digest: str = (await anyio.to_thread.run_sync(_hash_file, path)).hexdigest()
    _record_digest(path, digest)
    return digest


def _record_digest(path: Path, digest: str) -> None:
    stat = path.stat()
    with contextlib.suppress(OSError):
        data = {"sha256": digest, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        sidecar(path, ".sha256").write_text(json.dumps(data))


@contextlib.asynccontextmanager
async def store_lock(path: Path, progress: Progress) -> AsyncIterator[None]:
    """An exclusive flock on ``NAME.lock``; released by the OS if the agent dies."""
    fd = os.open(sidecar(path, ".lock"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                progress.waiting_for_lock = True
                await anyio.sleep(LOCK_POLL)
        progress.waiting_for_lock = False
        yield
    finally:
        os.close(fd)


def dir_mode(file_mode: int) -> int:
    """The directory mode that matches a file mode: whoever may read the files may list and enter the directory."""
    return 0o700 | (0o050 if file_mode & 0o040 else 0) | (0o005 if file_mode & 0o004 else 0)


def prepare_store(directory: Path, file_mode: int = MODEL_FILE_MODE) -> None:
    """Create the store directory, or say clearly why it cannot hold a download."""
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=dir_mode(file_mode))
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise DownloadError(
            "StoreNotWritable", f"model store {directory} is not writable: {exc.strerror or exc}"
        ) from exc


def _validator(headers: Any) -> str | None:
    """What If-Range may carry: a strong ETag, else Last-Modified (weak ETags are not allowed there)."""
    etag = headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return str(etag)
    modified = headers.get("Last-Modified")
    return str(modified) if modified else None


@dataclass
class _Partial:
    """The ``.partial`` file and what is known about it: the remote validator and the running hash."""

    path: Path
    url: str
    validator: str | None = None
    total: int | None = None
    hasher: Any = field(default_factory=hashlib.sha256)

    @property
    def meta(self) -> Path:
        return sidecar(self.path, ".json")

    def load(self) -> int:
        """Bytes to resume from (0 when there is nothing usable); hashes the prefix."""
        try:
            meta = json.loads(read_bytes(self.meta, SIDECAR_BYTES))
            size = self.path.stat().st_size
        except (OSError, ValueError):
            return 0
        if meta.get("url") != canonical(self.url) or not meta.get("validator") or size == 0:
            return 0
        self.validator, self.total = meta["validator"], meta.get("total")
        self.hasher = _hash_file(self.path, size)
        return size

    def save_meta(self) -> None:
        meta = {"url": canonical(self.url), "validator": self.validator, "total": self.total}
        self.meta.write_text(json.dumps(meta))

    def remove(self) -> None:
        for path in (self.path, self.meta):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _private_opener(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)  # a partial download is the agent's until it is complete and renamed


def http_error(response: aiohttp.ClientResponse, name: str) -> DownloadError:
    """Server errors and rate limits are retried; a missing or forbidden file needs a spec change."""
    status = response.status
    transient = status >= 500 or status in (408, 429)
    kind = "SourceNotFound" if status in (404, 410) else "DownloadFailed"
    reason = redact_text((response.reason or "")[:100])  # the server's words: bounded, no URL secrets
    message = f"{name}: {redact(str(response.url))} answered HTTP {status} {reason}".rstrip()
    return DownloadError(kind, message, transient=transient)


def _check_disk(directory: Path, need: int, margin: int, disk_free: DiskFree, name: str) -> None:
    free = disk_free(directory)
    if free - need < margin:
        raise DownloadError(
            "DiskFull",
            f"{name}: needs {format_bytes(need)} more on the disk of {directory}, which has {format_bytes(free)} "
            f"free, and {format_bytes(margin)} must stay free; free some space or move the model store",
        )


async def download(
    session: aiohttp.ClientSession,
    remote: RemoteFile,
    progress: Progress,
    sha256: str | None = None,
    disk_free: DiskFree = free_bytes,
    margin: int = 1 << 30,
    file_mode: int = MODEL_FILE_MODE,
) -> bool:
    """Fetch ``remote`` to its store path unless it is there already (and matches ``sha256`` when given).

    Returns whether anything was fetched.
    """
    path = remote.path
    if path.is_file() and (sha256 is None or (await stored_digest(path)) == sha256.lower()):
        progress.done = progress.total = path.stat().st_size
        return False
    prepare_store(path.parent, file_mode)
    async with store_lock(path, progress):
        if path.is_file() and (sha256 is None or (await stored_digest(path)) == sha256.lower()):
            progress.done = progress.total = path.stat().st_size  # another agent finished it meanwhile
            return False
        partial = _Partial(sidecar(path, ".partial"), remote.url)
        offset = await anyio.to_thread.run_sync(partial.load)
        await _fetch(session, partial, offset, progress, disk_free, margin)
        digest = partial.hasher.hexdigest()
        if sha256 is not None and digest != sha256.lower():
            partial.remove()
            raise DownloadError(
                "ChecksumMismatch",
                f"{path.name}: sha256 {digest} does not match spec.sha256 {sha256.lower()}; the download was "
                "removed and nothing was started",
            )
        os.chmod(partial.path, file_mode)  # whatever the umask: models are not for every local user by default
        os.replace(partial.path, path)
        with contextlib.suppress(FileNotFoundError):
            partial.meta.unlink()
        _fsync_dir(path.parent)
        _record_digest(path, digest)
        return True


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def _fetch(
    session: aiohttp.ClientSession,
    partial: _Partial,
    offset: int,
    progress: Progress,
    disk_free: DiskFree,
    margin: int,
) -> None:
    headers = {"Accept-Encoding": "identity", **auth_headers(partial.url)}
    if offset and partial.validator:
        headers |= {"Range": f"bytes={offset}-", "If-Range": partial.validator}
    name = partial.path.name.removesuffix(".partial")
    try:
        async with session.get(partial.url, headers=headers) as response:
            if response.status == 416 and offset and offset == partial.total:
                return  # the partial already holds every byte
            if response.status == 416:
                partial.remove()
                raise DownloadError("DownloadInterrupted", f"{name}: the stored partial was invalid", transient=True)
            if response.status >= 400:
                raise http_error(response, name)
            if response.status == 206:
                match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
                if match is None or int(match[1]) != offset:
                    partial.remove()  # not the range asked for: start over rather than stitch unknown bytes
                    raise DownloadError("DownloadFailed", f"{name}: unexpected Content-Range", transient=True)
                total = None if match[3] == "*" else int(match[3])
            else:  # 200: a fresh start, or a changed remote file / a server that ignores Range
                if offset:
                    log.info("the remote file changed or the server ignores Range: restarting", file=name, kept=offset)
                offset, partial.hasher = 0, hashlib.sha256()
                partial.validator = _validator(response.headers)
                total = (offset + response.content_length) if response.content_length is not None else None
            partial.total = total
            progress.total, progress.done, progress.resumed_from = total, offset, offset
            progress.started = time.monotonic()
            _check_disk(partial.path.parent, (total or offset) - offset, margin, disk_free, name)
            await _write_body(response, partial, offset, progress, name)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise DownloadError(
            "DownloadInterrupted",
            f"{name}: connection to {redact(partial.url)} failed after {format_bytes(progress.done)}: "
            f"{type(exc).__name__}: {redact_text(str(exc))}",
            transient=True,
        ) from exc
    if partial.total is not None and progress.done != partial.total:
        raise DownloadError(
            "DownloadInterrupted",
            f"{name}: got {progress.done} of {partial.total} bytes; it resumes from there",
            transient=True,
        )


async def _write_body(
    response: aiohttp.ClientResponse, partial: _Partial, offset: int, progress: Progress, name: str
) -> None:
    mode = "r+b" if offset else "wb"
    try:
        file = open(partial.path, mode, opener=_private_opener)  # noqa: SIM115 (closed below)
    except OSError as exc:
        raise DownloadError("StoreNotWritable", f"{name}: cannot write {partial.path}: {exc.strerror}") from exc
    with file:
        file.seek(offset)
        file.truncate()
        partial.save_meta()
        batch: list[bytes] = []
        pending, flushed = 0, time.monotonic()

        def flush(blocks: list[bytes]) -> None:
            for block in blocks:
                file.write(block)
                partial.hasher.update(block)
            file.flush()

        try:
            try:
                async for chunk in response.content.iter_chunked(CHUNK):
                    batch.append(chunk)
                    pending += len(chunk)
                    progress.done += len(chunk)
                    if pending >= WRITE_BATCH or time.monotonic() - flushed >= FLUSH_SECONDS:
                        blocks, batch, pending = batch, [], 0  # handed over first: a cancel never writes them twice
                        await anyio.to_thread.run_sync(flush, blocks)
                        flushed = time.monotonic()
            finally:  # whatever arrived is kept for the resume, also when cancelled
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(flush, batch)
                    await anyio.to_thread.run_sync(os.fsync, file.fileno())
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DownloadError("DiskFull", f"{name}: the disk of {partial.path.parent} is full") from exc
            raise DownloadError("StoreNotWritable", f"{name}: cannot write {partial.path}: {exc.strerror}") from exc
