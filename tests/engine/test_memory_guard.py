"""The memory guard's judgment of a measured footprint against the unit's reservation: an excess within
``budget_tolerance`` (a share of the reservation, as for the budget) is no news; a real one is warned about, for
the host reservation and for a GPU's alike. And its reads of the GPUs' free memory, which must not hang it."""

from __future__ import annotations

import threading

import anyio
import pytest
from memory_harness import until

from agent.engine import memory_guard
from agent.engine.memory_guard import Measured, MemoryGuard
from agent.engine.unit_state import UnitRuntime
from agent.estimate.preflight import Mode
from agent.memory import gpus
from agent.memory.admission import Admission, Outcome
from agent.memory.footprint import Figure, Footprint
from agent.memory.pressure import Sample, Thresholds, Watchdog

MiB = 1 << 20
RESERVED = 42 * MiB  # the demo's model (scripts/demo.sh)
HOST = 8192 * MiB


def guard(mode: Mode, tolerance: float = 0.02) -> MemoryGuard:
    admission = Admission(HOST // 2)
    admission.set_gpus({0: HOST // 2})
    watchdog = Watchdog(lambda: Sample(HOST, HOST), Thresholds(), 1.0)
    return MemoryGuard(admission, watchdog, {}, lambda total: total // 2, eviction=True, mode=mode, tolerance=tolerance)


def admitted(memory: MemoryGuard, device_need: int = 0) -> UnitRuntime:
    decision = memory.admission.request("d/s", RESERVED, "normal", False, HOST, device_need)
    assert decision.outcome is Outcome.ADMITTED
    runtime = memory.runtimes["d/s"] = UnitRuntime("d/s")
    return runtime


def host_footprint(measured: int) -> Footprint:
    return Footprint(host=Figure(measured, "rss", authoritative=True))


def gpu_footprint(device: int) -> Footprint:
    return Footprint(
        host=Figure(10 * MiB, "rss", authoritative=True),
        devices={0: Figure(device, "nvml", authoritative=True)},
        device_source="nvml",
        uses_device=True,
    )


@pytest.mark.parametrize("mode", [Mode.WARN, Mode.ENFORCE])
def test_a_footprint_a_few_hundred_kib_over_its_reservation_is_not_warned_about(mode: Mode) -> None:
    memory = guard(mode)
    runtime = admitted(memory)
    runtime.footprint = host_footprint(RESERVED + 300 * 1024)  # 0.7 %: the demo's case
    assert memory.measured(runtime, loaded=True) is Measured.FINE
    assert runtime.warning is None
    assert memory.admission.ledger.held["d/s"] == RESERVED + 300 * 1024  # the ledger holds what it really uses
    runtime.footprint = host_footprint(RESERVED + RESERVED // 50)  # exactly at the tolerance: still fine
    assert memory.measured(runtime, loaded=False) is Measured.FINE and runtime.warning is None


@pytest.mark.parametrize("mode", [Mode.WARN, Mode.ENFORCE])
def test_a_real_excess_over_the_reservation_is_warned_about_once(mode: Mode) -> None:
    memory = guard(mode)
    runtime = admitted(memory)
    runtime.footprint = host_footprint(RESERVED + RESERVED // 10)  # 10 %
    assert memory.measured(runtime, loaded=True) is Measured.WARNED
    assert runtime.warning is not None and runtime.warning["reason"] == "ExceedsReservation"
    assert "exceeds its reservation 42.0 MiB by 4.2 MiB (tolerance 2%)" in runtime.warning["message"]
    assert memory.measured(runtime, loaded=False) is Measured.FINE  # the same warning is not news again


def test_the_tolerance_is_the_setting_not_a_constant() -> None:
    memory = guard(Mode.WARN, tolerance=0.0)
    runtime = admitted(memory)
    runtime.footprint = host_footprint(RESERVED + 1024)  # 1 KiB over, and no tolerance at all: warned
    assert memory.measured(runtime, loaded=True) is Measured.WARNED
    memory = guard(Mode.WARN, tolerance=0.25)
    runtime = admitted(memory)
    runtime.footprint = host_footprint(RESERVED + RESERVED // 5)  # 20 % within a 25 % tolerance
    assert memory.measured(runtime, loaded=True) is Measured.FINE and runtime.warning is None


def test_a_gpu_reservation_has_the_same_tolerance() -> None:
    memory = guard(Mode.WARN)
    runtime = admitted(memory, device_need=RESERVED)
    runtime.footprint = gpu_footprint(RESERVED + 300 * 1024)
    assert memory.measured(runtime, loaded=True) is Measured.FINE and runtime.warning is None
    runtime.footprint = gpu_footprint(2 * RESERVED)
    assert memory.measured(runtime, loaded=False) is Measured.WARNED
    assert runtime.warning is not None and "GPU footprint" in runtime.warning["message"]


@pytest.mark.anyio
async def test_a_hung_gpu_read_holds_up_nobody_and_is_not_started_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """nvidia-smi on a wedged driver can hang: the watchdog (and a start) stop waiting for it, keep the last
    reading, and start no second read while it runs; once it returns, the next look reads again."""
    release, reads = threading.Event(), []

    def hung() -> dict[int, int]:
        reads.append(1)
        release.wait(10)
        return {0: MiB}

    monkeypatch.setattr(gpus, "free_memory", hung)
    monkeypatch.setattr(memory_guard, "GPU_READ_WAIT_S", 0.2)
    memory = guard(Mode.ENFORCE)
    memory.admission.observe_gpus({0: HOST})
    with anyio.fail_after(2):  # far less than the read takes
        await memory.observe_gpus()
        await memory.observe_gpus()
    assert reads == [1] and memory.admission.device_free == {0: HOST}  # one read; the last reading stands
    release.set()
    await until(lambda: not memory._reading_gpus, timeout=5)  # the abandoned read ends in its thread
    monkeypatch.setattr(gpus, "free_memory", lambda: {0: 3 * MiB})
    await memory.observe_gpus()
    assert memory.admission.device_free == {0: 3 * MiB}
