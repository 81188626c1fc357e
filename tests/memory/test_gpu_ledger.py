"""Admission with GPUs: a ledger per GPU beside the host's, shares over several GPUs, measured device memory."""

from __future__ import annotations

from fake_gpu import GiB, MiB
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from agent.memory.admission import Admission, Outcome
from agent.memory.footprint import Figure, Footprint

PLENTY = 10**13


def gpu_admission(*capacities: int, host: int = 64 * GiB) -> Admission:
    admission = Admission(host)
    admission.set_gpus(dict(enumerate(capacities)))
    return admission


def device_footprint(by_gpu: dict[int, int], source: str | None = "nvml", host: int = GiB) -> Footprint:
    devices = {i: Figure(b, source, True) for i, b in by_gpu.items()} if source else {}
    return Footprint(host=Figure(host, "rss", True), devices=devices, device_source=source, uses_device=True)


def test_a_device_estimate_bigger_than_every_gpu_can_never_fit() -> None:
    admission = gpu_admission(24 * GiB, 40 * GiB)
    decision = admission.request("big", GiB, "normal", False, PLENTY, device_need=41 * GiB)
    assert decision.outcome is Outcome.NEVER_FITS and "can never fit" in decision.message
    assert "GPU" in decision.message and not admission.waiting
    # Split over both GPUs (llama.cpp's default layer split) the share is 20.5 GiB: that fits the 24 and the 40.
    assert admission.request("big", GiB, "normal", False, PLENTY, 41 * GiB, gpu_count=2).outcome is Outcome.ADMITTED
    assert admission.holders["big"].gpus == (0, 1)
    assert {i: g.held["big"] for i, g in admission.gpu_ledgers.items()} == {0: 41 * GiB // 2, 1: 41 * GiB // 2}


def test_units_go_to_the_gpu_with_most_room_and_wait_when_every_gpu_is_full() -> None:
    admission = gpu_admission(24 * GiB, 24 * GiB)
    assert admission.request("a", GiB, "normal", False, PLENTY, device_need=20 * GiB).outcome is Outcome.ADMITTED
    assert admission.request("b", GiB, "normal", False, PLENTY, device_need=20 * GiB).outcome is Outcome.ADMITTED
    assert admission.holders["a"].gpus != admission.holders["b"].gpus
    waiting = admission.request("c", GiB, "normal", False, PLENTY, device_need=8 * GiB)
    assert waiting.outcome is Outcome.WAITING and "GPU memory" in waiting.message
    assert admission.ledger.used == 2 * GiB  # host memory had room: only the GPUs hold it back
    admission.forget("a")
    assert admission.grant(PLENTY) == ["c"]


def test_measured_device_memory_replaces_the_share_only_when_authoritative() -> None:
    admission = gpu_admission(80 * GiB)
    admission.request("u", GiB, "normal", False, PLENTY, device_need=8 * GiB)
    # The case: the process holds 8,860 MiB on the GPU and 0.70 GiB of host memory.
    measured = device_footprint({0: 8860 * MiB}, host=717 * MiB)
    admission.settle("u", measured.host_bytes, measured.authoritative, measured)
    assert admission.gpu_ledgers[0].held["u"] == 8860 * MiB and admission.ledger.held["u"] == 717 * MiB
    # Without NVML or nvidia-smi the device is not measured: the ledger keeps the larger of estimate and report.
    blind = gpu_admission(80 * GiB)
    blind.request("u", GiB, "normal", False, PLENTY, device_need=8 * GiB)
    unmeasured = device_footprint({}, source=None, host=700 * MiB)
    blind.settle("u", unmeasured.host_bytes, unmeasured.authoritative, unmeasured)
    assert blind.gpu_ledgers[0].held["u"] == 8 * GiB and blind.ledger.held["u"] == GiB


def test_a_footprint_over_the_gpu_budget_is_chosen_for_eviction_by_the_usual_order() -> None:
    admission = gpu_admission(20 * GiB)
    admission.request("low", GiB, "low", False, PLENTY, device_need=8 * GiB)
    admission.request("high", GiB, "high", False, PLENTY, device_need=8 * GiB)
    grown = device_footprint({0: 14 * GiB})
    admission.settle("high", grown.host_bytes, grown.authoritative, grown)
    ledger = admission.gpu_ledgers[0]
    assert ledger.used == 22 * GiB > ledger.capacity
    victims = admission.evict_for(ledger.used - ledger.capacity, ledger)
    assert [v.key for v in victims] == ["low"]  # lowest priority first, whoever grew
    assert admission.status()["gpus"]["0"]["reserved_bytes"] == 22 * GiB
    admission.forget("low")
    assert "low" not in ledger.held and ledger.used == 14 * GiB


def test_without_gpus_known_the_device_need_is_not_checked() -> None:
    admission = Admission(64 * GiB)
    assert admission.request("u", GiB, "normal", False, PLENTY, device_need=10**15).outcome is Outcome.ADMITTED


def test_a_grant_checked_again_before_launch_holds_one_share_per_gpu_only() -> None:
    admission = gpu_admission(24 * GiB, 24 * GiB)
    admission.request("a", GiB, "normal", False, PLENTY, device_need=20 * GiB)
    admission.request("b", GiB, "normal", False, PLENTY, device_need=10 * GiB)  # on the other GPU
    first = admission.holders["b"].gpus
    admission.forget("a")
    # Its worker asks again with a bigger estimate; wherever it lands, only those GPUs hold it.
    assert admission.request("b", GiB, "normal", False, PLENTY, device_need=22 * GiB).outcome is Outcome.ADMITTED
    holding = {i for i, ledger in admission.gpu_ledgers.items() if "b" in ledger.held}
    assert holding == set(admission.holders["b"].gpus) and len(holding) == 1 and first
    assert sum(ledger.used for ledger in admission.gpu_ledgers.values()) == 22 * GiB


def test_a_card_other_processes_fill_holds_units_back_whatever_the_budget_says() -> None:
    admission = gpu_admission(24 * GiB, 24 * GiB)
    admission.observe_gpus({0: 6 * GiB, 1: 4 * GiB})  # another tenant uses most of both cards
    waiting = admission.request("a", GiB, "normal", False, PLENTY, device_need=10 * GiB)
    assert waiting.outcome is Outcome.WAITING and not admission.holders
    assert "GPU 0 has 24.0 GiB free in its budget but 6.0 GiB on the device" in waiting.message
    assert "other processes" in waiting.message
    assert admission.request("b", GiB, "normal", False, PLENTY, device_need=5 * GiB).outcome is Outcome.ADMITTED
    assert admission.holders["b"].gpus == (0,)  # the card with room on the device, not only in its budget
    # "b" is still loading: the 5 GiB promised to it are not in the driver's figure yet, so GPU 0 has 1 GiB.
    assert admission.request("c", GiB, "normal", False, PLENTY, device_need=3 * GiB).outcome is Outcome.ADMITTED
    assert admission.holders["c"].gpus == (1,)
    assert admission.request("d", GiB, "normal", False, PLENTY, device_need=2 * GiB).outcome is Outcome.WAITING
    admission.observe_gpus({0: 24 * GiB, 1: 24 * GiB})  # the tenant left: waiters are weighed again
    assert admission.grant(PLENTY) == ["a", "d"]


def test_a_grant_checked_again_before_launch_sees_a_card_filled_meanwhile() -> None:
    admission = gpu_admission(24 * GiB)
    admission.observe_gpus({0: 24 * GiB})
    assert admission.request("a", GiB, "normal", False, PLENTY, device_need=8 * GiB).outcome is Outcome.ADMITTED
    admission.observe_gpus({0: 4 * GiB})  # before its launch another process took the card
    again = admission.request("a", GiB, "normal", False, PLENTY, device_need=8 * GiB)
    assert again.outcome is Outcome.WAITING and not admission.gpu_ledgers[0].held


KEYS = ("a", "b", "c", "d", "e")


class GPUAdmissionMachine(RuleBasedStateMachine):
    """Random arrivals, re-checks before launch, measurements and deletions on two GPUs: a new admission never
    takes a GPU over its budget, only the GPUs a unit holds carry it, and a deleted unit leaves nothing behind."""

    def __init__(self) -> None:
        super().__init__()
        self.admission = gpu_admission(100, 100, host=10**6)
        self.units: dict[str, tuple[int, int]] = {}  # key -> (device need, gpu count) of units not deleted

    def _check_admitted(self, key: str, outcome: Outcome) -> None:
        if outcome is Outcome.ADMITTED:
            for index in self.admission.holders[key].gpus:  # measured units may be over; admissions never are
                assert self.admission.gpu_ledgers[index].used <= 100

    @rule(key=st.sampled_from(KEYS), need=st.integers(1, 250), count=st.integers(1, 2))
    def arrive(self, key: str, need: int, count: int) -> None:
        if key in self.units:
            return
        decision = self.admission.request(key, 1, "normal", False, PLENTY, need, count)
        if decision.outcome is not Outcome.NEVER_FITS:
            self.units[key] = (need, count)
        else:
            assert -(-need // count) > 100
        self._check_admitted(key, decision.outcome)

    @rule(key=st.sampled_from(KEYS), grow=st.integers(-40, 40))
    def worker_comes_back(self, key: str, grow: int) -> None:
        if key not in self.admission.holders or key not in self.admission.loading:
            return
        need, count = self.units[key]
        need = max(1, need + grow)
        self.units[key] = (need, count)
        decision = self.admission.request(key, 1, "normal", False, PLENTY, need, count)
        if decision.outcome is Outcome.NEVER_FITS:
            del self.units[key]
        self._check_admitted(key, decision.outcome)

    @rule(key=st.sampled_from(KEYS), used=st.integers(0, 150), trusted=st.booleans())
    def loaded(self, key: str, used: int, trusted: bool) -> None:
        claim = self.admission.holders.get(key)
        if claim is None or key not in self.admission.loading or not claim.gpus:
            return
        footprint = device_footprint(dict.fromkeys(claim.gpus, used), "nvml" if trusted else None)
        self.admission.settle(key, 1, footprint.authoritative, footprint)
        for index in claim.gpus:
            held = self.admission.gpu_ledgers[index].held[key]
            assert held == used if trusted else held >= claim.share

    @rule(key=st.sampled_from(KEYS))
    def deleted(self, key: str) -> None:
        if key not in self.units:
            return
        self.admission.forget(key)
        del self.units[key]
        self.admission.grant(PLENTY)
        assert all(key not in ledger.held for ledger in self.admission.gpu_ledgers.values())

    @invariant()
    def only_holders_hold_and_only_on_their_gpus(self) -> None:
        for index, ledger in self.admission.gpu_ledgers.items():
            for key in ledger.held:
                assert key in self.admission.holders and index in self.admission.holders[key].gpus
            assert ledger.used == sum(ledger.held.values())


GPUAdmissionMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_gpu_admission_machine = GPUAdmissionMachine.TestCase
