"""The ledger: reservations never exceed the capacity, whatever the order of arrivals and departures."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.memory.ledger import Ledger


def test_reserve_replace_release() -> None:
    ledger = Ledger(capacity=100)
    assert ledger.reserve("a", 60) and not ledger.reserve("b", 50) and ledger.reserve("b", 40)
    assert ledger.used == 100 and ledger.free_for("a") == 60
    assert ledger.reserve("a", 50)  # a unit's new reservation replaces its old one
    assert ledger.release("a") == 50 and ledger.release("a") == 0 and ledger.used == 40


operations = st.lists(
    st.tuples(st.sampled_from(["reserve", "release"]), st.sampled_from("abcdef"), st.integers(0, 60)), max_size=60
)


@given(st.integers(0, 200), operations)
def test_random_interleavings_never_over_commit_and_release_everything(
    capacity: int, ops: list[tuple[str, str, int]]
) -> None:
    ledger = Ledger(capacity=capacity)
    for op, key, amount in ops:
        if op == "reserve":
            before = dict(ledger.held)
            if not ledger.reserve(key, amount):
                assert ledger.held == before  # a refusal changes nothing
        else:
            ledger.release(key)
        assert ledger.used <= capacity
    for key in list(ledger.held):
        ledger.release(key)
    assert ledger.used == 0
