"""The agent's side of model files: where they are, how big a remote one is, and fetching it once.

One ``ModelFetcher`` per agent holds the HTTP session, the remote headers learned (so a retry refetches
nothing), and one lock and one progress record per stored file: two Models with the same source wait on the
same download. Progress goes to the unit's status, to a bar on a terminal, or to periodic log lines.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import anyio
import structlog

from agent.engine.unit_state import UnitRuntime
from agent.estimate.gguf_header import GGUFError
from agent.estimate.gguf_shape import plan_shape
from agent.models.download import MODEL_FILE_MODE, READ_BUFFER, DiskFree, DownloadError, Progress, download, free_bytes
from agent.models.model_store import ModelFiles, RemoteFile, SourceError, model_files
from agent.models.remote_header import RemoteHeader, fetch_header, forget_header, load_header, remote_shape, save_header
from agent.sources.manifest import ModelSpec
from agent.sources.units import ServingUnit

log = structlog.get_logger("metal_agent.download")
Report = Callable[[list[Progress], bool], Awaitable[None]]  # (progress, publish: log it and call report hooks)


@dataclass
class FetchSettings:
    store: Path
    roots: tuple[Path, ...] = ()
    min_free_disk: int = 1 << 30
    file_mode: int = MODEL_FILE_MODE  # permissions of downloaded model files
    report_interval: float = 1.0  # unit status updates while downloading
    log_interval: float = 10.0  # progress log lines when stderr is not a terminal
    connect_timeout: float = 30.0
    read_timeout: float = 60.0  # no byte for this long: the connection is dropped and the download resumes later
    disk_free: DiskFree = free_bytes
    terminal: bool = field(default_factory=lambda: sys.stderr.isatty())


class ModelFetcher:
    def __init__(self, settings: FetchSettings) -> None:
        self.settings = settings
        self.headers: dict[str, RemoteHeader] = {}  # by URL; dropped when a download finds the file changed
        self.progress: dict[Path, Progress] = {}
        self._locks: dict[Path, anyio.Lock] = {}
        self._session: aiohttp.ClientSession | None = None

    def files(self, model: ModelSpec) -> ModelFiles:
        """The Model's files; raises ``SourceError`` for a source that is refused."""
        return model_files(model, self.settings.store, self.settings.roots)

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            timeout = aiohttp.ClientTimeout(
                total=None, sock_connect=self.settings.connect_timeout, sock_read=self.settings.read_timeout
            )
            self._session = aiohttp.ClientSession(timeout=timeout, read_bufsize=READ_BUFFER)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def plan(self, files: ModelFiles) -> None:
        """Size a remote model not downloaded yet from its headers, so pre-flight and admission come first."""
        if not files.remote or files.downloaded():
            return
        for remote in files.remote:
            if remote.url not in self.headers:
                try:
                    saved = load_header(remote)
                    self.headers[remote.url] = saved or await fetch_header(self.session(), remote)
                except GGUFError as exc:
                    raise DownloadError("MemoryCheckFailed", f"cannot read the model's remote header: {exc}") from exc
        try:
            shape = remote_shape(files, {str(f.path): self.headers[f.url] for f in files.remote})
        except GGUFError as exc:
            raise DownloadError("MemoryCheckFailed", f"cannot read the model's remote header: {exc}") from exc
        plan_shape(files.path, shape)

    async def fetch(self, files: ModelFiles, sha256: str | None, report: Report) -> None:
        """Download every file of a remote model (once, however many units wait for it), reporting progress."""
        records = [self.progress.setdefault(f.path, Progress(f.path.name)) for f in files.remote]
        for remote, progress in zip(files.remote, records, strict=True):
            known = self.headers.get(remote.url)
            if known is not None:
                progress.total = progress.total or known.file_bytes
                save_header(remote, known)
        with single_errors():
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._report_loop, records, report)
                for index, remote in enumerate(files.remote):
                    await self._fetch_one(remote, sha256 if index == 0 else None)
                tasks.cancel_scope.cancel()

    async def _fetch_one(self, remote: RemoteFile, sha256: str | None) -> None:
        lock = self._locks.setdefault(remote.path, anyio.Lock())
        progress = self.progress[remote.path]
        async with lock:
            try:
                fetched = await download(
                    self.session(),
                    remote,
                    progress,
                    sha256,
                    self.settings.disk_free,
                    self.settings.min_free_disk,
                    self.settings.file_mode,
                )
            except BaseException:
                self._render(progress, final=True)
                raise
        if fetched:
            self._render(progress, final=True)
        known = self.headers.pop(remote.url, None)
        forget_header(remote)  # the file itself is there now
        if known is not None and progress.total is not None and known.file_bytes != progress.total:
            raise DownloadError(  # the estimate came from another file: check the one downloaded before it starts
                "RemoteChanged",
                f"{remote.path.name} changed on the server after its pre-flight; checking it again",
                transient=True,
            )

    async def _report_loop(self, records: list[Progress], report: Report) -> None:
        published = float("-inf")  # the first update is always published: the phase changes
        while True:
            now = time.monotonic()
            publish = now - published >= self.settings.log_interval
            await report(records, publish)
            published = now if publish else published
            for progress in records:
                self._render(progress)
            await anyio.sleep(self.settings.report_interval)

    def _render(self, progress: Progress, final: bool = False) -> None:
        if progress.total is None and progress.done == 0 and not progress.waiting_for_lock:
            return  # not started
        if self.settings.terminal:
            width = 30
            filled = int(width * progress.done / progress.total) if progress.total else 0
            bar = "#" * filled + "-" * (width - filled)
            sys.stderr.write(f"\r\x1b[2K[{bar}] {progress.text()}" + ("\n" if final else ""))
            sys.stderr.flush()
            return
        now = time.monotonic()
        if final or now - progress.logged_at >= self.settings.log_interval:
            progress.logged_at = now
            log.info(
                "download progress",
                file=progress.name,
                done_bytes=progress.done,
                total_bytes=progress.total,
                bytes_per_second=int(progress.rate()),
            )


@contextlib.contextmanager
def single_errors() -> Iterator[None]:
    """A task group's lone error raised as itself, so callers catch ``DownloadError`` and not a group."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if len(leaves) == 1:
            raise leaves[0] from None
        raise


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


def plan_remote(source: str, store: Path) -> Path:
    """Size a remote model from its headers without downloading it (``metal-agent estimate URL``).

    Returns the path to pre-flight: the file in the store when it is there, else its planned shape's path.
    """
    files = model_files(ModelSpec(name="estimate", namespace="", source=source), store, ())

    async def plan() -> None:
        fetcher = ModelFetcher(FetchSettings(store, terminal=False))
        try:
            await fetcher.plan(files)
        finally:
            await fetcher.close()

    anyio.run(plan)
    return files.path


def failure_status(exc: SourceError | DownloadError, runtime: UnitRuntime, base: float, cap: float) -> tuple[str, str]:
    """Phase and message: network trouble retries with backoff (the partial stays); the rest needs a spec change."""
    if isinstance(exc, DownloadError) and exc.transient:
        runtime.failures += 1
        delay = min(cap, base * 2 ** (runtime.failures - 1))
        runtime.retry_at = time.monotonic() + delay
        return "Downloading", f"{exc} (retry in {delay:g} s)"
    return "Failed", str(exc)


def download_status(records: list[Progress]) -> dict[str, object]:
    """The ``download`` block of a unit's status: bytes done and total over every file of the model."""
    totals = [p.total for p in records]
    return {
        "done_bytes": sum(p.done for p in records),
        "total_bytes": sum(t for t in totals if t is not None) if all(t is not None for t in totals) else None,
        "files": len(records),
    }


async def cancellable(
    work: Callable[[], Awaitable[None]],
    runtime: UnitRuntime,
    unit: ServingUnit,
    current: Callable[[], ServingUnit | None],
) -> bool:
    """Run ``work`` for ``unit``, cancelled when the unit is poked and its spec changed or it is gone.

    Returns False when cancelled; the unit's wake event then stays set, so its worker reconciles at once.
    """
    cancelled = False
    spec_hash = unit.spec_hash()

    async def watch(tasks: anyio.abc.TaskGroup) -> None:
        nonlocal cancelled
        while True:
            await runtime.wake.wait()
            if runtime.evict_message is not None:
                return  # the memory guard's poke: left set, so the worker evicts as soon as the work ends
            now = current()
            if now is None or not now.wanted or now.spec_hash() != spec_hash:
                cancelled = True
                tasks.cancel_scope.cancel()
                return
            runtime.wake = anyio.Event()  # a poke that changes nothing (status only)

    with single_errors():
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(watch, tasks)
            await work()
            tasks.cancel_scope.cancel()
    return not cancelled
