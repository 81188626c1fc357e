"""Remote and local sources through the pipeline: pre-flight before download, Downloading, failures, cancels."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
from download_harness import Recording, make_agent, phase, unit
from memory_harness import drive

from agent.estimate.tinymodel import TinyShape, write_tiny_gguf
from agent.sources.standalone import Event, EventType
from tests.model_server import ModelServer

pytestmark = pytest.mark.anyio


async def test_a_remote_model_downloads_then_serves_with_progress(
    server: ModelServer, tiny: bytes, tmp_path: Path
) -> None:
    executor = Recording()
    agent = make_agent(tmp_path, executor)
    server.bytes_per_second = len(tiny) * 2  # about half a second: progress is reported on the way
    url = server.add("m/tiny.gguf", tiny)
    seen: list[dict[str, object]] = []

    def ready() -> bool:
        runtime = agent.runtimes.get("d/s")
        if runtime and runtime.download:
            seen.append(dict(runtime.download))
        return phase(agent) == ("Ready", "Ready")

    await drive(agent, unit(url, sha256=hashlib.sha256(tiny).hexdigest()), ready)
    assert executor.started == [agent.fetcher.files(unit(url)[0].obj).path]  # type: ignore[arg-type]
    assert executor.started[0].read_bytes() == tiny
    assert seen and all(s["total_bytes"] == len(tiny) for s in seen)
    assert any(0 < s["done_bytes"] < len(tiny) for s in seen)  # type: ignore[operator]
    status = agent.runtimes["d/s"].status()
    assert status["estimate"]["weights"] > 0 and status["download"] is None


async def test_a_remote_model_that_cannot_fit_is_never_downloaded(
    server: ModelServer, tiny: bytes, tmp_path: Path
) -> None:
    executor = Recording()
    agent = make_agent(tmp_path, executor)
    url = server.add("tiny.gguf", tiny)
    await drive(agent, unit(url, budget="1Mi"), lambda: phase(agent)[0] == "Failed")
    assert phase(agent) == ("Failed", "InsufficientMemory") and not executor.started
    gets = server.gets()
    assert gets and all(r.range and r.range.startswith("bytes=0-") for r in gets)
    assert sum(r.sent for r in gets) < len(tiny)  # the header only
    assert not [p for p in (tmp_path / "store").rglob("*") if p.is_file()]


async def test_a_wrong_checksum_fails_the_unit_removes_the_partial_and_spawns_nothing(
    server: ModelServer, tiny: bytes, tmp_path: Path
) -> None:
    executor = Recording()
    agent = make_agent(tmp_path, executor)
    url = server.add("tiny.gguf", tiny)
    await drive(agent, unit(url, sha256="ab" * 32), lambda: phase(agent)[0] == "Failed")
    assert phase(agent) == ("Failed", "ChecksumMismatch") and not executor.started
    assert "does not match spec.sha256" in agent.runtimes["d/s"].message
    assert not list((tmp_path / "store").rglob("*.partial")) and agent.ledger.used == 0


async def test_a_dropped_connection_is_retried_and_resumes(server: ModelServer, tiny: bytes, tmp_path: Path) -> None:
    executor = Recording()
    agent = make_agent(tmp_path, executor)
    url = server.add("tiny.gguf", tiny)
    server.cut_after = len(tiny) // 2
    reasons: set[str] = set()

    def ready() -> bool:
        reasons.add(phase(agent)[1])
        return phase(agent) == ("Ready", "Ready")

    await drive(agent, unit(url, sha256=hashlib.sha256(tiny).hexdigest()), ready)
    assert "DownloadInterrupted" in reasons
    full = [r for r in server.gets() if not (r.range or "").startswith("bytes=0-")]
    assert [(r.range, r.status) for r in full] == [(None, 200), (f"bytes={len(tiny) // 2}-", 206)]
    assert len(executor.started) == 1


async def test_disk_full_is_a_clear_reason(server: ModelServer, tiny: bytes, tmp_path: Path) -> None:
    executor = Recording()
    agent = make_agent(tmp_path, executor)
    agent.fetcher.settings.disk_free = lambda _: 1000
    url = server.add("tiny.gguf", tiny)
    await drive(agent, unit(url), lambda: phase(agent)[0] == "Failed")
    assert phase(agent) == ("Failed", "DiskFull") and "free some space" in agent.runtimes["d/s"].message
    assert not executor.started and agent.ledger.used == 0


async def test_local_paths_outside_the_roots_are_refused(tmp_path: Path) -> None:
    executor = Recording()
    agent = make_agent(tmp_path, executor)
    outside = write_tiny_gguf(tmp_path / "outside" / "m.gguf")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link.gguf").symlink_to(outside)
    events = unit(str(tmp_path / "root" / ".." / "outside" / "m.gguf"), "a") + unit(
        str(tmp_path / "root" / "link.gguf"), "b"
    )
    await drive(agent, events, lambda: phase(agent, "a")[0] == phase(agent, "b")[0] == "Failed")
    assert phase(agent, "a") == phase(agent, "b") == ("Failed", "SourceNotAllowed")
    assert "through a symlink" in agent.runtimes["d/b"].message and not executor.started


async def test_two_models_with_one_source_share_one_download(server: ModelServer, tiny: bytes, tmp_path: Path) -> None:
    executor = Recording()
    agent = make_agent(tmp_path, executor)
    server.bytes_per_second = len(tiny) * 4
    url = server.add("tiny.gguf", tiny)
    await drive(agent, unit(url, "a") + unit(url, "b"), lambda: phase(agent, "a")[0] == phase(agent, "b")[0] == "Ready")
    bodies = [r for r in server.gets() if not (r.range or "").startswith("bytes=0-")]
    assert len(bodies) == 1 and bodies[0].sent == len(tiny)
    assert len(executor.started) == 2 and executor.started[0] == executor.started[1]


async def wait_for(condition: Callable[[], bool], timeout: float = 20) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.02)


async def test_a_spec_change_mid_download_cancels_it_and_a_delete_leaves_the_partial(
    server: ModelServer, tiny: bytes, tmp_path: Path
) -> None:
    executor = Recording()
    agent = make_agent(tmp_path, executor)
    server.hold = threading.Event()
    server.hold.set()  # every body stalls after its first chunk
    url = server.add("tiny.gguf", tiny)
    model, service = unit(url)
    send, receive = anyio.create_memory_object_stream[Event](10)

    def downloading() -> bool:
        runtime = agent.runtimes.get("d/s")
        return (
            runtime is not None and runtime.phase == "Downloading" and bool((runtime.download or {}).get("done_bytes"))
        )

    def bodies() -> list[int]:
        return [r.sent for r in server.gets() if not (r.range or "").startswith("bytes=0-")]

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(agent.run, receive)
        await send.send(model)
        await send.send(service)
        await wait_for(downloading)
        partial = next((tmp_path / "store").rglob("tiny.gguf.partial"))
        await send.send(unit(url, ctx=2048)[1])  # the spec changes: this download stops, the new spec resumes it
        await wait_for(lambda: len(bodies()) == 2 and downloading())
        resumed = server.gets()[-1]
        assert resumed.range == f"bytes={partial.stat().st_size}-" and resumed.status == 206
        await send.send(Event(EventType.DELETED, service.obj))  # deleted mid-download: stops, the partial stays
        await wait_for(lambda: "d/s" not in agent.runtimes)
        assert partial.exists() and 0 < partial.stat().st_size < len(tiny)
        assert agent.ledger.used == 0 and not executor.started
        server.hold.clear()
        await send.send(Event(EventType.ADDED, service.obj))
        await wait_for(lambda: phase(agent) == ("Ready", "Ready"))
        assert len(executor.started) == 1 and executor.started[0].read_bytes() == tiny
        await agent.shutdown()
        tasks.cancel_scope.cancel()


async def test_a_remote_file_changed_after_its_pre_flight_is_checked_again(
    server: ModelServer, tiny: bytes, tmp_path: Path
) -> None:
    executor = Recording()
    agent = make_agent(tmp_path, executor)
    agent.config = dataclasses.replace(
        agent.config, backoff_base=0.5, backoff_cap=1
    )  # time to change the file before the retry
    url = server.add("tiny.gguf", tiny)
    server.cut_after = 1000
    bigger = write_tiny_gguf(tmp_path / "src" / "bigger.gguf", TinyShape(n_vocab_extra=400)).read_bytes()
    reasons: list[str] = []

    def ready() -> bool:
        reason = phase(agent)[1]
        if reason and (not reasons or reasons[-1] != reason):
            reasons.append(reason)
        if reason == "DownloadInterrupted" and server.files["/tiny.gguf"] == tiny:
            server.files["/tiny.gguf"] = bigger
            server.etag_version += 1
        return phase(agent) == ("Ready", "Ready")

    await drive(agent, unit(url), ready)
    assert "RemoteChanged" in reasons and executor.started[0].read_bytes() == bigger
    verdict = agent.runtimes["d/s"].verdict
    assert verdict is not None and verdict.shape is not None and verdict.shape.file_bytes == len(bigger)


async def test_server_errors_retry_and_a_missing_file_fails(server: ModelServer, tiny: bytes, tmp_path: Path) -> None:
    executor = Recording()
    agent = make_agent(tmp_path, executor)
    url = server.add("tiny.gguf", tiny)
    server.errors = [503, 503]  # two server errors in a row: retried with backoff, not a failure
    reasons: dict[str, str] = {}

    def ready() -> bool:
        if (runtime := agent.runtimes.get("d/s")) and runtime.reason:
            reasons.setdefault(runtime.reason, runtime.message)
        return phase(agent) == ("Ready", "Ready")

    await drive(agent, unit(url), ready)
    assert next(iter(reasons)) == "DownloadFailed" and "HTTP 503" in reasons["DownloadFailed"]
    assert "retry in" in reasons["DownloadFailed"]
    assert [r.status for r in server.log].count(503) == 2 and len(executor.started) == 1

    missing = make_agent(tmp_path / "other", Recording())
    await drive(missing, unit(server.url("gone.gguf")), lambda: phase(missing)[0] == "Failed")
    assert phase(missing) == ("Failed", "SourceNotFound") and "HTTP 404" in missing.runtimes["d/s"].message
