"""Admission: the wait queue's order, never-fits refusal, pressure blocking, measured footprints, eviction order.

The state machine drives the real ``Admission`` through random interleavings of arrivals, admissions from the
queue, loads, deletions, budget changes, evictions and pressure; the ledger never exceeds the budget and every
byte a departed unit held is released.
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Literal

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from agent.memory.admission import EVICTED, MEMORY_PRESSURE, Admission, Outcome
from agent.memory.eviction import Candidate, choose_victims, eviction_order
from agent.sources.manifest import PRIORITIES

PLENTY = 10**12  # OS memory available, where a test is not about the OS


def test_a_unit_bigger_than_the_whole_budget_is_refused_not_queued() -> None:
    admission = Admission(100)
    decision = admission.request("a", 101, "normal", False, PLENTY)
    assert decision.outcome is Outcome.NEVER_FITS and "can never fit" in decision.message
    assert not admission.waiting and admission.ledger.used == 0 and admission.counts["rejected"] == 1


def test_waiters_are_admitted_by_priority_then_arrival_when_memory_frees() -> None:
    admission = Admission(100)
    assert admission.request("running", 100, "normal", False, PLENTY).outcome is Outcome.ADMITTED
    for key, priority in (("low-1", "low"), ("normal-1", "normal"), ("critical-1", "critical"), ("normal-2", "normal")):
        decision = admission.request(key, 40, priority, False, PLENTY)
        assert decision.outcome is Outcome.WAITING and decision.reason == "InsufficientMemory"
    assert admission.status()["waiting"] == ["critical-1", "normal-1", "normal-2", "low-1"]
    admission.forget("running")
    assert admission.grant(PLENTY) == ["critical-1", "normal-1"]  # 80 of 100; normal-2 does not fit
    assert admission.take_new_grants() == {"critical-1", "normal-1"}
    assert admission.ledger.used == 80 and list(admission.waiting) == ["low-1", "normal-2"]


def test_backfill_within_a_priority_never_past_a_higher_one() -> None:
    admission = Admission(100)
    admission.request("big-running", 70, "normal", False, PLENTY)
    assert admission.request("normal-big", 50, "normal", False, PLENTY).outcome is Outcome.WAITING
    assert admission.request("high-big", 50, "high", False, PLENTY).outcome is Outcome.WAITING
    # A small normal unit would fit in the 30 free, but a high-priority unit waits for memory first.
    small = admission.request("normal-small", 10, "normal", False, PLENTY)
    assert small.outcome is Outcome.WAITING and "high-priority" in small.message
    # Within one level a later small unit may start while an earlier big one waits.
    admission.forget("high-big")
    assert admission.grant(PLENTY) == ["normal-small"]
    assert "normal-big" in admission.waiting


def test_the_os_available_memory_is_checked_too_and_promised_memory_counts() -> None:
    admission = Admission(1000)
    # The ledger has room, but a foreign process took the memory: the unit waits and says so.
    decision = admission.request("a", 300, "normal", False, available=200)
    assert decision.outcome is Outcome.WAITING and "another process" in decision.message
    assert admission.grant(available=400) == ["a"]
    # "a" is loading: the OS does not see its 300 yet, so 400 available leaves only 100 for others.
    assert admission.request("b", 200, "normal", False, available=400).outcome is Outcome.WAITING
    admission.settle("a", 280)  # loaded: the OS now shows its memory in use
    assert admission.request("b", 200, "normal", False, available=220).outcome is Outcome.ADMITTED


def test_a_grant_is_checked_again_before_launch() -> None:
    admission = Admission(1000)
    admission.request("a", 1000, "normal", False, PLENTY)
    admission.request("b", 300, "normal", False, PLENTY)
    admission.forget("a")
    assert admission.grant(PLENTY) == ["b"]
    # Between the grant and the launch a foreign process ate the memory: b goes back to the queue.
    decision = admission.request("b", 300, "normal", False, available=100)
    assert decision.outcome is Outcome.WAITING and admission.ledger.used == 0 and "b" in admission.waiting


def test_measured_footprint_replaces_the_estimate_and_keeps_its_high_water_mark() -> None:
    admission = Admission(100)
    admission.request("a", 60, "normal", False, PLENTY)
    assert admission.settle("a", 45) == 60 and admission.ledger.used == 45
    assert admission.request("b", 55, "normal", False, PLENTY).outcome is Outcome.ADMITTED  # room freed
    assert admission.observe("a", 40) == 45 and admission.observe("a", 50) == 50  # never shrinks after load
    assert admission.ledger.used == 105  # over budget by what is really used: nothing more is admitted
    assert admission.request("c", 1, "normal", False, PLENTY).outcome is Outcome.WAITING


def test_pressure_blocks_admission_and_unblocking_admits_in_order() -> None:
    admission = Admission(100)
    admission.block("memory pressure is warning: 15% available")
    decision = admission.request("a", 10, "normal", False, PLENTY)
    assert decision.outcome is Outcome.WAITING and decision.reason == MEMORY_PRESSURE
    assert "warning" in decision.message and admission.grant(PLENTY) == []
    admission.unblock()
    assert admission.grant(PLENTY) == ["a"]


def test_eviction_order_protected_last_then_priority_then_largest() -> None:
    units = [
        Candidate("protected-batch", rank=4, protected=True, footprint=90, seq=0),
        Candidate("critical-big", rank=0, protected=False, footprint=80, seq=1),
        Candidate("batch-small", rank=4, protected=False, footprint=10, seq=2),
        Candidate("batch-big", rank=4, protected=False, footprint=30, seq=3),
        Candidate("normal", rank=2, protected=False, footprint=50, seq=4),
    ]
    order = [c.key for c in eviction_order(units)]
    assert order == ["batch-big", "batch-small", "normal", "critical-big", "protected-batch"]
    assert [c.key for c in choose_victims(units, 35)] == ["batch-big", "batch-small"]  # only as many as needed
    assert [c.key for c in choose_victims(units, 0)] == []
    assert len(choose_victims(units, 10**9)) == 5


def test_a_smaller_budget_evicts_lowest_priority_first() -> None:
    admission = Admission(100)
    admission.request("critical", 50, "critical", False, PLENTY)
    admission.request("batch", 30, "batch", False, PLENTY)
    admission.request("low", 20, "low", False, PLENTY)
    victims = admission.set_capacity(70)
    assert [v.key for v in victims] == ["batch"] and admission.evicting == {"batch"}
    assert admission.request("new", 1, "critical", False, PLENTY).outcome is Outcome.WAITING  # still held
    admission.forget("batch")
    admission.requeue(victims[0], EVICTED, "evicted")
    assert admission.ledger.used == 70 and admission.waiting["batch"].reason == EVICTED


# -- random interleavings ------------------------------------------------------------------------------------
KEYS = [f"u{i}" for i in range(7)]
State = Literal["waiting", "granted", "loading", "running", "evicting"]


class AdmissionMachine(RuleBasedStateMachine):
    """A model of each unit's worker around the real Admission: what it asks and what it may assume."""

    def __init__(self) -> None:
        super().__init__()
        self.admission = Admission(400)
        self.available = 10**6
        self.state: dict[str, State] = {}

    def _sync(self) -> None:
        """Units the queue admitted become 'granted' (their worker would be woken)."""
        for key in self.admission.take_new_grants():
            assert self.state.get(key) == "waiting"
            self.state[key] = "granted"

    def _after_request(self, key: str, outcome: Outcome) -> None:
        if outcome is Outcome.NEVER_FITS:
            self.state.pop(key, None)
        else:
            self.state[key] = "loading" if outcome is Outcome.ADMITTED else "waiting"
        self._sync()

    @rule(
        key=st.sampled_from(KEYS),
        need=st.integers(1, 500),
        priority=st.sampled_from(PRIORITIES),
        protected=st.booleans(),
    )
    def arrive(self, key: str, need: int, priority: str, protected: bool) -> None:
        if key in self.state:
            return
        used_before = self.admission.ledger.used
        decision = self.admission.request(key, need, priority, protected, self.available)
        if decision.outcome is Outcome.ADMITTED:
            assert used_before + need <= self.admission.ledger.capacity  # admission never over-commits
        self._after_request(key, decision.outcome)

    @rule(key=st.sampled_from(KEYS), grow=st.integers(-50, 50))
    def worker_comes_back(self, key: str, grow: int) -> None:
        """A granted unit's worker asks again just before launch (its estimate may have changed)."""
        if self.state.get(key) != "granted":
            return
        need = max(1, self.admission.holders[key].need + grow)
        decision = self.admission.request(key, need, "normal", False, self.available)
        self._after_request(key, decision.outcome)

    @rule(key=st.sampled_from(KEYS), share=st.floats(0.1, 1.0))
    def loaded(self, key: str, share: float) -> None:
        if self.state.get(key) != "loading":
            return
        claim = self.admission.holders[key]
        self.admission.settle(key, max(1, int(claim.need * share)))
        self.state[key] = "running"
        self.admission.grant(self.available)
        self._sync()

    @rule(key=st.sampled_from(KEYS))
    def deleted(self, key: str) -> None:
        if key not in self.state:
            return
        self.admission.forget(key)
        del self.state[key]
        self.admission.grant(self.available)
        self._sync()

    @rule(capacity=st.integers(50, 1000))
    def budget_changes(self, capacity: int) -> None:
        for victim in self.admission.set_capacity(capacity):
            self.state[victim.key] = "evicting"
        self.admission.grant(self.available)
        self._sync()

    @rule(key=st.sampled_from(KEYS))
    def eviction_done(self, key: str) -> None:
        if self.state.get(key) != "evicting":
            return
        claim = self.admission.holders[key]
        self.admission.forget(key)
        self.admission.requeue(claim, EVICTED, "evicted")
        self.state[key] = "waiting"
        self.admission.grant(self.available)
        self._sync()

    @rule(available=st.integers(0, 2000))
    def os_memory_changes(self, available: int) -> None:
        self.available = available
        self.admission.grant(available)
        self._sync()

    @rule(blocked=st.booleans())
    def pressure(self, blocked: bool) -> None:
        if blocked:
            self.admission.block("memory pressure is warning")
        else:
            self.admission.unblock()
        self.admission.grant(self.available)
        self._sync()

    @precondition(lambda self: not self.admission.evicting)
    @invariant()
    def within_budget(self) -> None:
        assert self.admission.ledger.used <= self.admission.ledger.capacity

    @invariant()
    def within_budget_once_evictions_finish(self) -> None:
        ledger = self.admission.ledger
        leaving = sum(ledger.held[k] for k in self.admission.evicting)
        assert ledger.used - leaving <= ledger.capacity

    @invariant()
    def only_live_holders_hold_memory(self) -> None:
        held = set(self.admission.ledger.held)
        assert held == set(self.admission.holders)
        assert held == {k for k, s in self.state.items() if s in ("granted", "loading", "running", "evicting")}
        assert set(self.admission.waiting) == {k for k, s in self.state.items() if s == "waiting"}
        ranks = Counter(c.rank for c in self.admission.waiting.values())
        assert +self.admission._ranks == ranks  # the per-rank count the queue keeps instead of scanning

    @invariant()
    def nobody_left_waiting_who_could_start(self) -> None:
        """What the queue decided step by step is what weighing it afresh decides: nobody admissible waits."""
        afresh = copy.deepcopy(self.admission)
        afresh._settled = None
        assert afresh.grant(self.available) == []

    def teardown(self) -> None:
        for key in list(self.state):
            self.admission.forget(key)
        assert self.admission.ledger.used == 0 and not self.admission.ledger.held
        assert not self.admission.waiting and not self.admission.holders and not self.admission.loading


AdmissionMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
test_admission_state_machine = AdmissionMachine.TestCase


@pytest.mark.parametrize("priority", PRIORITIES)
def test_every_priority_is_ranked(priority: str) -> None:
    admission = Admission(10)
    assert admission.request("a", 5, priority, False, PLENTY).outcome is Outcome.ADMITTED


def test_an_adopted_server_is_held_whatever_the_queue_or_pressure() -> None:
    admission = Admission(100)
    admission.block("memory pressure is warning")
    admission.hold("adopted", 80, "low", False)  # it runs already: its memory is in use
    assert admission.ledger.used == 80 and "adopted" in admission.loading
    assert admission.settle("adopted", 70) == 80 and admission.ledger.used == 70
    admission.unblock()
    assert admission.request("next", 40, "critical", False, PLENTY).outcome is Outcome.WAITING
