"""Budget precedence and validation (the seed feature's cases, ported)."""

from __future__ import annotations

import math

import pytest

from agent.estimate.budget import ADAPTIVE_THRESHOLD, Budget, describe, fraction_of, resolve_budget
from agent.util.quantity import InvalidValue

GiB = 2**30


def test_model_budget_beats_fraction() -> None:
    budget = resolve_budget(64 * GiB, "24Gi", 0.9, 0.5)
    assert budget == Budget(24 * GiB, "model-budget", None, 64 * GiB)


def test_model_fraction_beats_agent_fraction() -> None:
    assert resolve_budget(64 * GiB, None, 0.5, 0.9) == Budget(32 * GiB, "model-fraction", 0.5, 64 * GiB)


def test_agent_fraction_beats_adaptive() -> None:
    assert resolve_budget(64 * GiB, agent_fraction="0.25") == Budget(16 * GiB, "agent", 0.25, 64 * GiB)


@pytest.mark.parametrize(
    ("total", "fraction", "percent"),
    [
        (16 * GiB, 0.67, 67),
        (ADAPTIVE_THRESHOLD, 0.67, 67),
        (ADAPTIVE_THRESHOLD + 1, 0.75, 75),
        (128 * GiB, 0.75, 75),
    ],
)
def test_adaptive_default_and_the_36_gib_boundary(total: int, fraction: float, percent: int) -> None:
    budget = resolve_budget(total)
    assert (budget.source, budget.fraction) == ("adaptive", fraction)
    assert budget.bytes == total * percent // 100


def test_fraction_maths_is_exact() -> None:
    assert fraction_of(36 * GiB, 0.67) == 36 * GiB * 67 // 100
    assert fraction_of(3, 0.1) == 0  # floor, never rounded up
    # float maths would round 0.7 × 10**17 to a neighbour; the decimal as written gives it exactly
    assert fraction_of(10**17 + 1, 0.7) == 7 * (10**17 + 1) // 10


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, -0.1, 0, 0.0, 1.01, "abc", True, "nan"])
@pytest.mark.parametrize("level", ["model_fraction", "agent_fraction"])
def test_bad_fractions_rejected_at_every_level(bad: object, level: str) -> None:
    with pytest.raises(InvalidValue, match=r"(?i)fraction"):
        resolve_budget(64 * GiB, **{level: bad})  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["-1Gi", "0", "24GB", "", "nan"])
def test_bad_budgets_rejected(bad: str) -> None:
    with pytest.raises(InvalidValue, match="memoryBudget"):
        resolve_budget(64 * GiB, bad)


def test_an_invalid_lower_value_is_an_error_even_when_a_higher_one_wins() -> None:
    with pytest.raises(InvalidValue, match="agent memory fraction"):
        resolve_budget(64 * GiB, "24Gi", None, 1.5)
    with pytest.raises(InvalidValue, match="memoryFraction"):
        resolve_budget(64 * GiB, "24Gi", math.nan)
    with pytest.raises(InvalidValue, match="agent memory fraction"):
        resolve_budget(64 * GiB, None, 0.5, "0,5")


def test_a_fraction_that_leaves_no_whole_byte_is_rejected() -> None:
    with pytest.raises(InvalidValue, match=r"memoryFraction.*less than one byte"):
        resolve_budget(1000, None, 1e-4)
    assert resolve_budget(10_000, None, 1e-4).bytes == 1


@pytest.mark.parametrize("bad", [0, -GiB, True])
def test_host_total_must_be_positive(bad: int) -> None:
    with pytest.raises(ValueError, match="host memory total"):
        resolve_budget(bad)


def test_describe_names_the_source() -> None:
    assert describe(resolve_budget(64 * GiB, "24Gi")) == "24.0 GiB from the Model's memoryBudget"
    assert describe(resolve_budget(64 * GiB, None, 0.5)) == "0.5 of 64.0 GiB from the Model's memoryFraction"
    assert describe(resolve_budget(64 * GiB, None, None, 0.5)) == "0.5 of 64.0 GiB from the agent's memory fraction"
    assert describe(resolve_budget(32 * GiB)) == "0.67 of 32.0 GiB (adaptive default for hosts <= 36 GiB)"
    assert describe(resolve_budget(64 * GiB)) == "0.75 of 64.0 GiB (adaptive default for hosts > 36 GiB)"
