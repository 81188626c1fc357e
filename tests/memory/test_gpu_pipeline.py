"""CUDA servers in the running pipeline: measured per process on the GPU, held in a GPU ledger, enforced.

A fake llama-server (real process, real port) prints llama.cpp's buffer report; a fake NVML says what it holds
on the GPU. Together they "lie" the way the issue saw: buffers small, the process's VRAM large.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import psutil
import pytest
from fake_gpu import FakeNVML, GiB, MiB
from fake_servers import write_fake_llama_server
from memory_harness import SimulatedHost, phase, running, until

from agent.engine.pipeline import Agent
from agent.estimate.preflight import Mode
from agent.estimate.tinymodel import TinyShape, write_tiny_gguf
from agent.memory import gpus
from agent.sources.manifest import ModelSpec, ServiceSpec
from agent.sources.standalone import Event, EventType
from agent.testing import build_agent

BUFFERS = {"EMBD_MIB": "0.1", "MODEL_MIB": "1.5", "KV_MIB": "2", "COMPUTE_MIB": "20", "HOST_COMPUTE_MIB": "1"}
REPORTED_DEVICE = round((1.5 + 2 + 20) * MiB)


@pytest.fixture(autouse=True)
def fresh_overhead(monkeypatch: pytest.MonkeyPatch) -> None:
    # the one the CUDA plugin holds (through agent.plugin), reset: nothing learned, the default setting
    monkeypatch.setattr(gpus.CONTEXT_OVERHEAD, "learned", {})
    monkeypatch.setattr(gpus.CONTEXT_OVERHEAD, "default", gpus.DEFAULT_CONTEXT_OVERHEAD)
    for name, value in BUFFERS.items():
        monkeypatch.setenv(f"FAKE_LLAMA_{name}", value)


def server_usage(device_mib: dict[str, int]) -> FakeNVML:
    """A fake NVML on an 8 GiB GPU: each fake llama-server holds ``device_mib['now']`` MiB on GPU 0."""

    def used(pid: int) -> dict[int, int]:
        try:
            if "fake-llama-server" in " ".join(psutil.Process(pid).cmdline()):
                return {0: device_mib["now"] * MiB}
        except psutil.Error:
            pass
        return {}

    return FakeNVML([8 * GiB], used)


def fake_servers_running() -> int:
    """The fake llama-servers among this process's children (one that exits while they are listed is not)."""
    count = 0
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):  # gone since the listing (a log writer ending after its server)
            count += "fake-llama-server" in " ".join(child.cmdline())
    return count


def make_agent(tmp_path: Path, mode: Mode = Mode.ENFORCE) -> Agent:
    host = SimulatedHost(64 * GiB)
    agent = build_agent(
        tmp_path / "state", plugin_settings={"llama_server": write_fake_llama_server(tmp_path)}, memory=host,
        memory_fraction=0.9, mode=mode, startup_timeout=20, grace_period=2, probe_interval=0.05,
        pressure_interval=0.05, model_roots=(tmp_path,),
        server_env=("FAKE_LLAMA_*",),  # the stand-in's buffer sizes pass the servers' environment allowlist
    )  # fmt: skip
    host.agent = agent
    return agent


def events(tmp_path: Path, budget: str) -> list[Event]:
    model = write_tiny_gguf(tmp_path / "m.gguf", TinyShape())
    spec = ModelSpec(name="m", namespace="d", source=str(model), accelerator="cuda", memory_budget=budget)
    service = ServiceSpec(name="s", namespace="d", model_ref="m", context_size=1024)
    return [Event(EventType.ADDED, spec), Event(EventType.ADDED, service)]


@pytest.mark.anyio
async def test_measured_gpu_memory_goes_to_the_gpu_ledger_and_teaches_the_context_overhead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server_usage(usage := {"now": 700}).install(monkeypatch)
    agent = make_agent(tmp_path)
    assert agent.admission.gpu_ledgers[0].capacity == int(8 * GiB * 0.9)
    async with running(agent) as send:
        for event in events(tmp_path, "2Gi"):
            send(event)
        await until(lambda: phase(agent, "s") == ("Ready", "Ready"), agent=agent)
        runtime = agent.runtimes["d/s"]
        assert runtime.child is not None and runtime.verdict and runtime.verdict.estimate
        assert psutil.Process(runtime.child.pid).environ().get("CUDA_VISIBLE_DEVICES") == "0"
        measured = agent.status()["units"][0]["measured"]
        assert measured["device_source"] == "nvml" and measured["devices"]["0"]["bytes"] == 700 * MiB
        assert measured["host"]["source"] == "rss" and measured["authoritative"]
        assert measured["llama_buffers"]["CUDA0"] == REPORTED_DEVICE  # printed because the agent passed -lv 4
        # The GPU ledger holds what the GPU really holds, not the host RSS; the host ledger the host part.
        assert agent.admission.gpu_ledgers[0].held["d/s"] == 700 * MiB
        await until(lambda: agent.admission.device_free == {0: 8 * GiB - 700 * MiB}, agent=agent)  # next sample
        status = agent.status()
        assert status["units"][0]["reserved_gpu_bytes"] == {"0": 700 * MiB}
        assert status["units"][0]["reserved_from"] == "measured"
        warning = agent.runtimes["d/s"].warning  # 700 MiB is above the device estimate it was admitted with
        assert (
            warning is not None and warning["reason"] == "ExceedsReservation" and "GPU footprint" in warning["message"]
        )
        assert status["admission"]["gpus"]["0"] == {
            "budget_bytes": int(8 * GiB * 0.9), "reserved_bytes": 700 * MiB, "held": {"d/s": 700 * MiB},
            "device_free_bytes": 8 * GiB - 700 * MiB,  # read at every memory sample
        }  # fmt: skip
        assert status["units"][0]["estimate"]["device"] > 600 * MiB  # the estimate's split is shown too
        scraped = agent.metrics.registry
        assert scraped.get_sample_value("metal_agent_gpu_reserved_bytes", {"gpu": "0"}) == 700 * MiB
        assert scraped.get_sample_value("metal_agent_gpu_budget_bytes", {"gpu": "0"}) == int(8 * GiB * 0.9)
        assert scraped.get_sample_value("metal_agent_gpu_free_bytes", {"gpu": "0"}) == 8 * GiB - 700 * MiB
        assert agent.ledger.held["d/s"] == measured["host"]["bytes"] < 700 * MiB
        learned = agent.status()["cuda_context_overhead"]["learned_bytes"]
        assert learned == {"0": 700 * MiB - REPORTED_DEVICE}
        # It grows: the ledger follows the high-water mark.
        usage["now"] = 900
        await until(lambda: agent.admission.gpu_ledgers[0].held["d/s"] == 900 * MiB, agent=agent)
        send(Event(EventType.DELETED, ServiceSpec(name="s", namespace="d", model_ref="m")))
        await until(lambda: not agent.admission.gpu_ledgers[0].held and not agent.ledger.held, agent=agent)


@pytest.mark.anyio
async def test_a_server_over_its_own_budget_is_stopped_in_enforce_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server_usage({"now": 1536}).install(monkeypatch)  # 1.5 GiB on the GPU against a 1 GiB budget
    agent = make_agent(tmp_path)
    async with running(agent) as send:
        for event in events(tmp_path, "1Gi"):
            send(event)
        await until(lambda: phase(agent, "s") == ("Failed", "ExceedsBudget"), agent=agent)
        runtime = agent.runtimes["d/s"]
        assert runtime.child is None and "1.5 GiB" in runtime.message and "1.0 GiB" in runtime.message
        assert "memoryBudget" in runtime.message and "GPU from nvml" in runtime.message
        assert not agent.ledger.held and not agent.admission.gpu_ledgers[0].held
        assert fake_servers_running() == 0


@pytest.mark.anyio
async def test_warn_mode_keeps_it_running_with_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server_usage({"now": 1536}).install(monkeypatch)
    agent = make_agent(tmp_path, Mode.WARN)
    async with running(agent) as send:
        for event in events(tmp_path, "1Gi"):
            send(event)
        await until(lambda: phase(agent, "s")[0] == "Ready" and agent.runtimes["d/s"].warning is not None)
        warning = agent.runtimes["d/s"].warning
        assert warning is not None and warning["reason"] == "ExceedsBudget"


@pytest.mark.anyio
@pytest.mark.parametrize("why", ["not supported", "pid not visible"])
async def test_without_a_device_figure_the_ledger_keeps_the_estimate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, why: str
) -> None:
    nvml = server_usage({"now": 100})

    def unavailable(handle: int) -> list[object]:
        if why == "pid not visible":  # a container's PID namespace: NVML lists host pids, none of them ours
            return []
        raise nvml.NVMLError("Not Supported")

    nvml.nvmlDeviceGetComputeRunningProcesses = unavailable  # type: ignore[method-assign]
    nvml.install(monkeypatch)
    monkeypatch.setenv("PATH", str(tmp_path))  # and no nvidia-smi
    agent = make_agent(tmp_path)
    async with running(agent) as send:
        for event in events(tmp_path, "2Gi"):
            send(event)
        await until(lambda: phase(agent, "s") == ("Ready", "Ready"), agent=agent)
        runtime = agent.runtimes["d/s"]
        assert runtime.verdict and runtime.verdict.estimate and runtime.verdict.estimate.device_bytes
        measured = agent.status()["units"][0]["measured"]
        assert not measured["authoritative"] and measured["device_source"] == "llama.cpp log"
        assert agent.status()["units"][0]["reserved_from"] == "max(estimate, measured)"
        # llama.cpp's buffers (23.5 MiB) miss the CUDA context: the ledger keeps the device estimate.
        assert agent.admission.gpu_ledgers[0].held["d/s"] == runtime.verdict.estimate.device_bytes > 600 * MiB
        assert not agent.status()["cuda_context_overhead"]["learned_bytes"]


@pytest.mark.anyio
async def test_a_card_another_process_fills_holds_the_unit_pending_until_it_frees(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The budget (90 % of 8 GiB) has room, but another tenant holds 7.5 GiB of the card: starting the server
    would take the card past its memory (and crash the other tenant). It waits, saying why, and starts once the
    tenant leaves."""
    nvml = server_usage({"now": 700}).install(monkeypatch)
    nvml.foreign = {0: 7 * GiB + 512 * MiB}
    agent = make_agent(tmp_path)
    async with running(agent) as send:
        for event in events(tmp_path, "2Gi"):
            send(event)
        await until(lambda: phase(agent, "s")[0] == "Pending", agent=agent)
        runtime = agent.runtimes["d/s"]
        assert "512.0 MiB on the device (other processes use it)" in runtime.message, runtime.message
        assert runtime.child is None and not agent.admission.gpu_ledgers[0].held
        nvml.foreign = {}
        await until(lambda: phase(agent, "s") == ("Ready", "Ready"), agent=agent)
        assert agent.admission.gpu_ledgers[0].held["d/s"] == 700 * MiB


@pytest.mark.anyio
async def test_an_on_demand_unit_short_of_gpu_memory_stops_an_idle_one_on_the_card(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two on-demand CUDA units; the card (another tenant holds 7 GiB of its 8) has room for one server. A request
    for the second stops the idle first to make room, as on the host, and never runs both."""
    nvml = server_usage({"now": 700}).install(monkeypatch)
    nvml.foreign = {0: 7 * GiB}
    agent = make_agent(tmp_path)
    model = write_tiny_gguf(tmp_path / "m.gguf", TinyShape())
    async with running(agent) as send:
        for name in ("a", "b"):
            send(Event(EventType.ADDED, ModelSpec(name=name, namespace="d", source=str(model), accelerator="cuda")))
            send(Event(EventType.ADDED, ServiceSpec(name=name, namespace="d", model_ref=name, context_size=1024,
                                                    on_demand=True)))  # fmt: skip
        await until(lambda: phase(agent, "a")[0] == phase(agent, "b")[0] == "Idle", agent=agent)
        async with agent.ondemand.serving("d/a") as child:
            first = child.pid
        await until(lambda: agent.admission.device_free == {0: GiB - 700 * MiB}, agent=agent)
        async with agent.ondemand.serving("d/b") as child:
            assert phase(agent, "a")[0] == "Idle" and agent.runtimes["d/a"].child is None
            assert agent.runtimes["d/b"].child is child
            assert not psutil.pid_exists(first) or psutil.Process(first).status() == psutil.STATUS_ZOMBIE
        assert agent.metrics.registry.get_sample_value("metal_agent_evictions_total", {"reason": "MakeRoom"}) == 1


@pytest.mark.anyio
async def test_units_arriving_together_on_a_shared_card_start_only_as_many_as_it_has_room_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another tenant leaves 1 GiB of the card and the driver answers slowly: of three units that arrive together,
    one starts and the others wait, never two at once."""
    nvml = server_usage({"now": 700}).install(monkeypatch)
    nvml.foreign = {0: 7 * GiB}
    read = nvml.nvmlDeviceGetMemoryInfo

    def slow_read(handle: int) -> object:  # later looks come while a read is still running
        time.sleep(0.3)
        return read(handle)

    nvml.nvmlDeviceGetMemoryInfo = slow_read  # type: ignore[method-assign]
    agent = make_agent(tmp_path)
    model = write_tiny_gguf(tmp_path / "m.gguf", TinyShape())
    running_servers: list[int] = []

    def servers() -> int:
        count = fake_servers_running()
        running_servers.append(count)
        return count

    async with running(agent) as send:
        for name in ("a", "b", "c"):
            send(Event(EventType.ADDED, ModelSpec(name=name, namespace="d", source=str(model), accelerator="cuda")))
        for name in ("a", "b", "c"):
            send(Event(EventType.ADDED, ServiceSpec(name=name, namespace="d", model_ref=name, context_size=1024)))
        phases = lambda: sorted(phase(agent, name) for name in ("a", "b", "c"))  # noqa: E731
        waiting = ("Pending", "InsufficientMemory")
        await until(lambda: phases() == [waiting, waiting, ("Ready", "Ready")] and servers() == 1, agent=agent)
        for runtime in agent.runtimes.values():
            assert runtime.phase == "Ready" or "on the device (other processes use it)" in runtime.message
    assert max(running_servers) == 1
