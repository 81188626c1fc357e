"""The /v1 endpoint and serving on demand, in-process: the agent's API, real stand-in servers, a simulated host.

The stand-in servers (tests/fake_openai.py) are real processes on real ports; the host memory is simulated so
that the budget fits exactly one of them (each holds about its estimate once loaded).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from fake_openai import plugin
from memory_harness import MiB, Sender, SimulatedHost, make_agent, running, until

from agent.engine.pipeline import Agent
from agent.estimate.tinymodel import TinyShape, write_tiny_gguf
from agent.processes.ports import free_port
from agent.service.api import serve
from agent.sources.manifest import ModelSpec, ServiceSpec
from agent.sources.standalone import Event, EventType

pytestmark = pytest.mark.anyio
TOTAL = 512 * MiB
ONE_UNIT = 0.137  # of 512 MiB: 70 MiB, room for one unit (estimate 44 MiB, about 45 MiB measured) but not two
BALLAST = "30"  # MiB a stand-in server holds besides the interpreter: its footprint is about its estimate


@dataclass
class Api:
    base: str
    agent: Agent
    send: Sender
    session: aiohttp.ClientSession

    async def post(
        self, model: str, path: str = "/v1/chat/completions", close_after: float = 0, **body: Any
    ) -> tuple[int, Any, Any]:
        payload = {"model": model, "messages": [{"role": "user", "content": "hi"}], **body}
        if close_after:
            payload["close_after"] = close_after
        async with self.session.post(self.base + path, json=payload) as response:
            return response.status, await response.json(), response.headers

    async def get(self, path: str) -> Any:
        async with self.session.get(self.base + path) as response:
            assert response.status == 200
            return await response.json()

    async def metric(self, name: str, **labels: str) -> float:
        async with self.session.get(self.base + "/metrics") as response:
            text = await response.text()
        from prometheus_client.parser import text_string_to_metric_families

        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0


def unit_events(tmp_path: Path, name: str, namespace: str = "d", **spec: Any) -> list[Event]:
    model_path = tmp_path / "m.gguf"
    if not model_path.exists():
        write_tiny_gguf(model_path, TinyShape())
    model = ModelSpec(name=name, namespace=namespace, source=str(model_path), memory_budget="512Mi")
    options: dict[str, Any] = {"runtime": "openai", "context_size": 1024, "extra_args": (BALLAST,), **spec}
    service = ServiceSpec(name=name, namespace=namespace, model_ref=name, **options)
    return [Event(EventType.ADDED, model), Event(EventType.ADDED, service)]


@asynccontextmanager
async def api(tmp_path: Path, fraction: float = 0.9, **settings: Any) -> AsyncIterator[Api]:
    host = SimulatedHost(TOTAL)
    agent = make_agent(tmp_path, plugin(tmp_path / "marker"), host=host, memory_fraction=fraction, **settings)
    port = free_port()
    runner = await serve(agent, "127.0.0.1", port)
    try:
        async with running(agent) as send, aiohttp.ClientSession() as session:
            yield Api(f"http://127.0.0.1:{port}", agent, send, session)
    finally:
        await runner.cleanup()


def phase(agent: Agent, key: str) -> str:
    runtime = agent.runtimes.get(key)
    return runtime.phase if runtime else ""


async def test_unknown_model_bad_bodies_and_oversized_bodies_get_openai_errors(tmp_path: Path) -> None:
    async with api(tmp_path, max_request_body=4096) as a:
        for event in unit_events(tmp_path, "chat"):
            a.send(event)
        await until(lambda: phase(a.agent, "d/chat") == "Ready", agent=a.agent)
        status, body, _ = await a.post("nope")
        assert status == 404 and body["error"]["code"] == "model_not_found" and "'nope'" in body["error"]["message"]
        assert set(body["error"]) >= {"message", "type", "code"}
        for data, code in ((b"{not json", "invalid_json"), (b'{"messages": []}', "model_required"),
                           (b'["chat"]', "model_required"), (b'{"model": 7}', "model_required")):  # fmt: skip
            async with a.session.post(a.base + "/v1/completions", data=data) as response:
                assert response.status == 400 and (await response.json())["error"]["code"] == code
        big = json.dumps({"model": "chat", "prompt": "x" * 5000}).encode()
        async with a.session.post(a.base + "/v1/completions", data=big) as response:
            assert response.status == 413 and (await response.json())["error"]["code"] == "request_too_large"
        assert await a.metric("metal_agent_requests_total", unit="", code="404") == 1
        assert await a.metric("metal_agent_requests_total", unit="", code="413") == 1


async def test_routes_by_model_lists_units_and_passes_headers_and_paths(tmp_path: Path) -> None:
    async with api(tmp_path) as a:
        for event in [*unit_events(tmp_path, "chat", alias="gpt-local"), *unit_events(tmp_path, "dup"),
                      *unit_events(tmp_path, "dup", namespace="other")]:  # fmt: skip
            a.send(event)
        await until(lambda: all(phase(a.agent, k) == "Ready" for k in ("d/chat", "d/dup", "other/dup")), agent=a.agent)
        listed = {entry["id"]: entry for entry in (await a.get("/v1/models"))["data"]}
        assert set(listed) == {"chat", "gpt-local", "d/dup", "other/dup"}  # the clashing name is qualified
        assert listed["chat"]["phase"] == "Ready" and listed["gpt-local"]["unit"] == "d/chat"
        assert listed["chat"]["context_size"] == 1024
        ports = {key: a.agent.runtimes[key].child.port for key in ("d/chat", "d/dup", "other/dup")}  # type: ignore[union-attr]
        for model, key in (("chat", "d/chat"), ("gpt-local", "d/chat"), ("d/dup", "d/dup"), ("other/dup", "other/dup")):
            status, body, _ = await a.post(model, path="/v1/embeddings")
            assert status == 200 and body["served_by"] == ports[key] and body["model"] == model
            assert body["path"] == "/v1/embeddings"
        status, body, _ = await a.post("dup")
        assert status == 404 and "ambiguous" in body["error"]["message"]
        headers = {"Authorization": "Bearer k"}
        async with a.session.post(a.base + "/v1/completions?x=1", json={"model": "chat"}, headers=headers) as response:
            body = await response.json()
        assert body["auth"] == "Bearer k" and body["path"] == "/v1/completions?x=1"
        # Cookies pass between a client and its server, never from one client to another through the relay.
        async with aiohttp.ClientSession() as alice, aiohttp.ClientSession() as bob:
            async with alice.post(a.base + "/v1/completions", json={"model": "chat", "set_cookie": "s=alice"}) as r:
                assert r.headers["Set-Cookie"].startswith("s=alice")
            async with alice.post(
                a.base + "/v1/completions", json={"model": "chat"}, headers={"Cookie": "s=alice"}
            ) as r:
                assert (await r.json())["cookie"] == "s=alice"  # hers, sent by her client
            async with bob.post(a.base + "/v1/completions", json={"model": "chat"}) as r:
                assert (await r.json())["cookie"] is None
        # A server that hangs up without an answer, and stays: a 502 (after a look whether it was going away).
        pid = a.agent.runtimes["d/chat"].child.pid  # type: ignore[union-attr]
        status, body, _ = await a.post("chat", hang_up=True)
        assert status == 502 and body["error"]["code"] == "upstream_error"
        assert a.agent.runtimes["d/chat"].child.pid == pid  # type: ignore[union-attr]
        # The alias changes: the names follow at once (they are not kept from before).
        renamed = unit_events(tmp_path, "chat", alias="renamed")[1]
        a.send(Event(EventType.MODIFIED, renamed.obj))
        await until(a.send.delivered)
        assert (await a.post("gpt-local"))[0] == 404
        await until(lambda: phase(a.agent, "d/chat") == "Ready", agent=a.agent)
        status, body, _ = await a.post("renamed")
        assert status == 200, body


async def test_an_answer_comes_back_whole_large_or_small_and_one_that_breaks_off_is_a_502(tmp_path: Path) -> None:
    async with api(tmp_path) as a:
        for event in unit_events(tmp_path, "chat"):
            a.send(event)
        await until(lambda: phase(a.agent, "d/chat") == "Ready", agent=a.agent)
        for pad in (0, 3 << 20):  # read whole, and (beyond WHOLE_ANSWER) streamed with its Content-Length
            payload = {"model": "chat", "pad": pad, "messages": []}
            async with a.session.post(a.base + "/v1/embeddings", json=payload) as response:
                data = await response.read()
                assert response.status == 200 and int(response.headers["Content-Length"]) == len(data)
                assert response.headers["Content-Type"] == "application/json"
            assert json.loads(data)["pad"] == "x" * pad
        pid = a.agent.runtimes["d/chat"].child.pid  # type: ignore[union-attr]
        status, body, _ = await a.post("chat", short_by=1)  # read whole: nothing went out yet, so a 502
        assert status == 502 and body["error"]["code"] == "upstream_error", body
        payload = {"model": "chat", "short_by": 5 << 20, "messages": []}  # streamed: the answer ends unfinished
        async with a.session.post(a.base + "/v1/embeddings", json=payload) as response:
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
        assert (tmp_path / "marker").read_text().count("short") == 2  # asked once each: no second try
        assert a.agent.runtimes["d/chat"].child.pid == pid  # type: ignore[union-attr]


async def test_a_stream_arrives_in_chunks_and_a_client_that_leaves_cancels_upstream(tmp_path: Path) -> None:
    async with api(tmp_path) as a:
        for event in unit_events(tmp_path, "chat"):
            a.send(event)
        await until(lambda: phase(a.agent, "d/chat") == "Ready", agent=a.agent)
        payload = {"model": "chat", "stream": True, "chunks": 4, "interval": 0.2}
        arrivals = []
        async with a.session.post(a.base + "/v1/chat/completions", json=payload) as response:
            assert response.headers["Content-Type"].startswith("text/event-stream")
            async for chunk in response.content.iter_any():
                arrivals.append((anyio.current_time(), chunk))
        text = b"".join(c for _, c in arrivals).decode()
        assert text.count("data: ") == 5 and text.endswith("data: [DONE]\n\n")
        # Chunk by chunk: the first event is there long before the last (0.2 s apart at the server).
        first_event = next(t for t, c in arrivals if b'"i": 0' in c)
        assert arrivals[-1][0] - first_event > 0.5
        for _ in range(3):  # the server closed the kept-alive connection after the stream: the relay opens another
            status, _, _ = await a.post("chat")
            assert status == 200
        # The server drops a kept-alive connection just as the next request goes out on it: sent again, once.
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(a.post, "chat", "/v1/chat/completions", 0.5)
            await anyio.sleep(0.2)  # its answer is back, its connection still open for another 0.3 s
        status, _, _ = await a.post("chat")
        assert status == 200
        marker = tmp_path / "marker"
        assert not marker.exists()
        slow = {"model": "chat", "stream": True, "chunks": 200, "interval": 0.05}
        async with a.session.post(a.base + "/v1/chat/completions", json=slow) as response:
            await response.content.readline()  # the first event came; then the client goes away
        await until(lambda: marker.exists() and "disconnected" in marker.read_text(), timeout=10)
        await until(lambda: a.agent.ondemand.demand("d/chat").in_flight == 0)


async def test_on_demand_unit_idles_cold_starts_once_for_concurrent_requests_and_idles_out(tmp_path: Path) -> None:
    async with api(tmp_path) as a:
        for event in unit_events(tmp_path, "lazy", on_demand=True, idle_timeout=1.0):
            a.send(event)
        await until(lambda: phase(a.agent, "d/lazy") == "Idle", agent=a.agent)
        unit = next(u for u in a.agent.status()["units"] if u["unit"] == "d/lazy")
        assert unit["pid"] is None and unit["reserved_bytes"] == 0 and unit["budget"]["bytes"] == 512 * MiB
        assert unit["on_demand"]["state"] == "Idle" and "on demand" in unit["message"]
        assert (await a.get("/v1/models"))["data"][0]["phase"] == "Idle"
        results: list[tuple[int, Any, Any]] = []

        async def ask() -> None:
            results.append(await a.post("lazy"))

        async with anyio.create_task_group() as tasks:
            for _ in range(5):
                tasks.start_soon(ask)
        assert [status for status, _, _ in results] == [200] * 5
        assert len({body["served_by"] for _, body, _ in results}) == 1  # one server: one start for all five
        assert await a.metric("metal_agent_cold_starts_total", unit="d/lazy") == 1
        assert await a.metric("metal_agent_request_wait_seconds_count") == 5
        assert await a.metric("metal_agent_requests_total", unit="d/lazy", code="200") == 5
        pid = a.agent.runtimes["d/lazy"].child.pid  # type: ignore[union-attr]
        unit = next(u for u in a.agent.status()["units"] if u["unit"] == "d/lazy")
        assert unit["on_demand"]["state"] == "Ready" and unit["on_demand"]["stops_in_s"] is not None
        # A request that comes while the server is being stopped (its idle timer just ran out) is not sent to
        # the server on its way out: it waits for it to go and starts a new one.
        a.agent.ondemand.expire(time.monotonic() + 3600)
        status, _, _ = await a.post("lazy")
        assert status == 200 and await a.metric("metal_agent_cold_starts_total", unit="d/lazy") == 2
        assert a.agent.runtimes["d/lazy"].child.pid != pid  # type: ignore[union-attr]
        pid = a.agent.runtimes["d/lazy"].child.pid  # type: ignore[union-attr]
        # No request for its idle timeout (1 s): stopped, memory released.
        await until(lambda: phase(a.agent, "d/lazy") == "Idle", timeout=10, agent=a.agent)
        assert a.agent.ledger.used == 0 and a.agent.runtimes["d/lazy"].child is None
        import psutil

        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        assert await a.metric("metal_agent_idle_stops_total") == 2
        status, _, _ = await a.post("lazy")  # and it comes back on the next request
        assert status == 200 and await a.metric("metal_agent_cold_starts_total", unit="d/lazy") == 3


async def test_two_on_demand_units_in_room_for_one_swap_and_never_run_together(tmp_path: Path) -> None:
    async with api(tmp_path, fraction=ONE_UNIT) as a:
        for name in ("a", "b"):
            for event in unit_events(tmp_path, name, on_demand=True):
                a.send(event)
        await until(lambda: phase(a.agent, "d/a") == phase(a.agent, "d/b") == "Idle", agent=a.agent)
        both_running = []

        async def watch() -> None:
            while True:
                running_now = [k for k in ("d/a", "d/b") if a.agent.runtimes[k].child is not None]
                if len(running_now) > 1:
                    both_running.append(running_now)
                await anyio.sleep(0.01)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(watch)
            for model in ("a", "b", "a", "b", "a"):
                status, body, _ = await a.post(model)
                assert status == 200, body
                assert body["model"] == model
            tasks.cancel_scope.cancel()
        assert both_running == []
        assert await a.metric("metal_agent_evictions_total", reason="MakeRoom") == 4
        assert await a.metric("metal_agent_cold_starts_total", unit="d/a") == 3


async def test_a_request_that_cannot_get_memory_gets_503_naming_the_holder(tmp_path: Path) -> None:
    async with api(tmp_path, fraction=ONE_UNIT, request_wait=1.0) as a:
        for event in [*unit_events(tmp_path, "always"), *unit_events(tmp_path, "lazy", on_demand=True)]:
            a.send(event)
        await until(lambda: phase(a.agent, "d/always") == "Ready" and phase(a.agent, "d/lazy") == "Idle")
        status, body, headers = await a.post("lazy")
        assert status == 503 and headers["Retry-After"].isdigit()
        message = body["error"]["message"]
        assert "not ready within 1 s" in message and "d/always holds" in message, message
        assert phase(a.agent, "d/always") == "Ready"  # an always-on unit is never stopped to make room
        await until(lambda: phase(a.agent, "d/lazy") == "Idle")  # nobody waits: it leaves the queue
        assert "d/lazy" not in a.agent.admission.waiting


async def test_a_unit_serving_a_request_is_not_stopped_to_make_room(tmp_path: Path) -> None:
    async with api(tmp_path, fraction=ONE_UNIT, request_wait=30.0) as a:
        for name in ("a", "b"):
            for event in unit_events(tmp_path, name, on_demand=True):
                a.send(event)
        await until(lambda: phase(a.agent, "d/a") == phase(a.agent, "d/b") == "Idle")
        done: list[float] = []
        slow = {"model": "a", "stream": True, "chunks": 20, "interval": 0.1}

        async def stream_a() -> None:
            async with a.session.post(a.base + "/v1/chat/completions", json=slow) as response:
                await response.read()
            done.append(anyio.current_time())

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(stream_a)
            await until(lambda: a.agent.ondemand.demand("d/a").in_flight == 1 and phase(a.agent, "d/a") == "Ready")
            await until(lambda: phase(a.agent, "d/a") == "Ready")
            status, body, _ = await a.post("b")
            answered = anyio.current_time()
        assert status == 200 and body["model"] == "b"
        assert done and done[0] <= answered  # b started only once a's stream had ended


async def test_a_client_that_gives_up_while_waiting_releases_its_units_place_in_the_queue(tmp_path: Path) -> None:
    async with api(tmp_path, fraction=ONE_UNIT, request_wait=60.0) as a:
        for event in [*unit_events(tmp_path, "always"), *unit_events(tmp_path, "lazy", on_demand=True)]:
            a.send(event)
        await until(lambda: phase(a.agent, "d/always") == "Ready" and phase(a.agent, "d/lazy") == "Idle")
        payload = {"model": "lazy", "messages": []}
        with pytest.raises(TimeoutError):
            timeout = aiohttp.ClientTimeout(total=0.5)
            async with a.session.post(a.base + "/v1/chat/completions", json=payload, timeout=timeout) as response:
                await response.read()
        assert phase(a.agent, "d/lazy") == "Pending"  # it was waiting for memory when the client left
        # Long before its 60 s wait would have ended: nobody wants it any more, it leaves the queue.
        await until(lambda: phase(a.agent, "d/lazy") == "Idle", timeout=10, agent=a.agent)
        assert a.agent.ondemand.demand("d/lazy").in_flight == 0 and "d/lazy" not in a.agent.admission.waiting


async def test_room_is_made_by_stopping_the_lower_priority_then_the_least_recently_used(tmp_path: Path) -> None:
    # 160 MiB: three loaded servers (about 47 MiB each) and no fourth estimate (44 MiB) beside them.
    async with api(tmp_path, fraction=160 / 512) as a:
        for name, priority in (("a", "low"), ("b", "normal"), ("c", "normal"), ("d", "normal")):
            for event in unit_events(tmp_path, name, on_demand=True, priority=priority):
                a.send(event)
        await until(lambda: all(phase(a.agent, f"d/{n}") == "Idle" for n in "abcd"), agent=a.agent)
        for name in ("b", "c", "a"):  # a, the low-priority one, is the most recently used
            assert (await a.post(name))[0] == 200
        assert all(phase(a.agent, f"d/{n}") == "Ready" for n in "abc")
        assert (await a.post("d"))[0] == 200
        assert [phase(a.agent, f"d/{n}") for n in "abcd"] == ["Idle", "Ready", "Ready", "Ready"]  # priority first
        assert (await a.post("a"))[0] == 200
        assert [phase(a.agent, f"d/{n}") for n in "abcd"] == ["Ready", "Idle", "Ready", "Ready"]  # then the LRU
        assert await a.metric("metal_agent_evictions_total", reason="MakeRoom") == 2


async def test_an_always_on_unit_that_served_requests_is_not_counted_as_memory_coming_back(tmp_path: Path) -> None:
    # 115 MiB: two loaded servers (about 47 MiB each) and no third estimate (44 MiB) beside them.
    async with api(tmp_path, fraction=115 / 512, request_wait=20.0) as a:
        for event in [*unit_events(tmp_path, "always"), *unit_events(tmp_path, "a", on_demand=True),
                      *unit_events(tmp_path, "b", on_demand=True)]:  # fmt: skip
            a.send(event)
        await until(lambda: phase(a.agent, "d/always") == "Ready" and phase(a.agent, "d/b") == "Idle")
        for model in ("always", "a", "b"):  # b needs a's memory; the always-on unit's stays where it is
            status, body, _ = await a.post(model)
            assert status == 200, body
        assert [phase(a.agent, f"d/{n}") for n in ("always", "a", "b")] == ["Ready", "Idle", "Ready"]


async def test_the_cluster_listener_routes_by_the_service_in_host_and_serves_only_v1(tmp_path: Path) -> None:
    async with api(tmp_path) as a:
        for event in [*unit_events(tmp_path, "chat"), *unit_events(tmp_path, "dup"),
                      *unit_events(tmp_path, "dup", namespace="other"),
                      *unit_events(tmp_path, "lazy", on_demand=True, idle_timeout=60.0)]:  # fmt: skip
            a.send(event)
        await until(lambda: all(phase(a.agent, k) == "Ready" for k in ("d/chat", "d/dup", "other/dup")), agent=a.agent)
        await until(lambda: phase(a.agent, "d/lazy") == "Idle", agent=a.agent)
        port = free_port()
        runner = await serve(a.agent, "127.0.0.1", port, cluster=True)
        try:
            base = f"http://127.0.0.1:{port}"

            async def post(host: str, model: str) -> tuple[int, Any]:
                payload = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
                async with a.session.post(base + "/v1/chat/completions", json=payload, headers={"Host": host}) as r:
                    return r.status, await r.json()

            def served(key: str) -> int:
                return a.agent.runtimes[key].child.port  # type: ignore[union-attr]

            # The Service the client called decides, whatever model name its OpenAI client sends.
            for host in ("chat.d.svc.cluster.local:8080", "chat.d.svc:8080", "chat.d", "chat:8080", "CHAT.D.SVC."):
                status, body = await post(host, "gpt-4o")
                assert status == 200 and body["served_by"] == served("d/chat"), host
            assert (await post("dup.other.svc:8080", "d/dup"))[1]["served_by"] == served("other/dup")
            # A Host that names no unit, or a bare name two namespaces have: the body's model decides.
            for host, model, key in (("dup:8080", "other/dup", "other/dup"), ("10.96.0.12:8080", "chat", "d/chat"),
                                     ("nope.d.svc:8080", "d/dup", "d/dup"), ("chat.elsewhere.svc", "d/dup", "d/dup"),
                                     (f"127.0.0.1:{port}", "chat", "d/chat")):  # fmt: skip
                status, body = await post(host, model)
                assert status == 200 and body["served_by"] == served(key), host
            status, body = await post("10.96.0.12:8080", "gpt-4o")
            assert status == 404 and body["error"]["code"] == "model_not_found"
            # An Idle on-demand unit starts on a request through its Service.
            status, body = await post("lazy.d.svc.cluster.local:8080", "gpt-4o")
            assert status == 200 and body["served_by"] == served("d/lazy") and phase(a.agent, "d/lazy") == "Ready"
            assert a.agent.ondemand.demand("d/lazy").last_request is not None  # the idle timer saw it
            # /v1/models through a Service lists that unit; the agent's own state is not served to the cluster.
            async with a.session.get(base + "/v1/models", headers={"Host": "lazy.d.svc:8080"}) as response:
                assert [m["unit"] for m in (await response.json())["data"]] == ["d/lazy"]
            async with a.session.get(base + "/v1/models", headers={"Host": "10.96.0.12"}) as response:
                assert len((await response.json())["data"]) == 4
            for path in ("/status", "/metrics", "/readyz"):
                async with a.session.get(base + path) as response:
                    assert response.status == 404, path
            async with a.session.get(base + "/healthz") as response:
                assert response.status == 200
        finally:
            await runner.cleanup()
