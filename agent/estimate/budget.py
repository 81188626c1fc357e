"""A model's memory budget and where it came from.

Precedence: the Model's ``memoryBudget`` > the Model's ``memoryFraction`` > the agent's fraction (flag, env or
TOML) > the adaptive default. Every value that is present is validated, even when a higher one wins: a typo in
a lower layer must fail loudly now, not silently later when the higher value is removed. A fraction so small
that it leaves no whole byte is an error too, not a budget that nothing can ever fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from agent.util.quantity import InvalidValue, format_bytes, parse_fraction, parse_quantity

ADAPTIVE_THRESHOLD = 36 * 2**30  # hosts up to and including 36 GiB get the smaller fraction
ADAPTIVE_SMALL_FRACTION = 0.67
ADAPTIVE_LARGE_FRACTION = 0.75

MODEL_BUDGET, MODEL_FRACTION, AGENT, ADAPTIVE = "model-budget", "model-fraction", "agent", "adaptive"
MODEL_BUDGET_FIELD = "spec.hardware.memoryBudget"
MODEL_FRACTION_FIELD = "spec.hardware.memoryFraction"
AGENT_FRACTION_FIELD = "agent memory fraction"


@dataclass(frozen=True)
class Budget:
    bytes: int
    source: str  # model-budget, model-fraction, agent or adaptive
    fraction: float | None  # None for an absolute budget
    host_total_bytes: int


def adaptive_fraction(host_total_bytes: int) -> float:
    return ADAPTIVE_SMALL_FRACTION if host_total_bytes <= ADAPTIVE_THRESHOLD else ADAPTIVE_LARGE_FRACTION


def fraction_of(total: int, fraction: float) -> int:
    """``floor(total × fraction)`` exactly, taking the fraction as the decimal a person wrote."""
    return int(total * Fraction(str(fraction)))


def _share(total: int, fraction: float, field: str) -> int:
    share = fraction_of(total, fraction)
    if share <= 0:
        raise InvalidValue(f"{field}: {fraction!r} of {format_bytes(total)} is less than one byte")
    return share


def resolve_budget(
    host_total_bytes: int,
    model_budget: str | int | None = None,
    model_fraction: object = None,
    agent_fraction: object = None,
) -> Budget:
    """The budget the highest-precedence present value gives; InvalidValue if any present value is invalid."""
    if isinstance(host_total_bytes, bool) or not isinstance(host_total_bytes, int) or host_total_bytes <= 0:
        raise ValueError(f"host memory total must be a positive number of bytes, got {host_total_bytes!r}")
    absolute = None if model_budget is None else parse_quantity(model_budget, MODEL_BUDGET_FIELD)
    model_f = None if model_fraction is None else parse_fraction(model_fraction, MODEL_FRACTION_FIELD)
    agent_f = None if agent_fraction is None else parse_fraction(agent_fraction, AGENT_FRACTION_FIELD)
    if absolute is not None:
        return Budget(absolute, MODEL_BUDGET, None, host_total_bytes)
    choices = ((model_f, MODEL_FRACTION, MODEL_FRACTION_FIELD), (agent_f, AGENT, AGENT_FRACTION_FIELD))
    for fraction, source, field in choices:
        if fraction is not None:
            return Budget(_share(host_total_bytes, fraction, field), source, fraction, host_total_bytes)
    fraction = adaptive_fraction(host_total_bytes)
    return Budget(_share(host_total_bytes, fraction, "adaptive fraction"), ADAPTIVE, fraction, host_total_bytes)


def describe(budget: Budget) -> str:
    """One line a person can act on: how much, and which setting decided it."""
    if budget.source == MODEL_BUDGET:
        return f"{format_bytes(budget.bytes)} from the Model's memoryBudget"
    share = f"{budget.fraction} of {format_bytes(budget.host_total_bytes)}"
    if budget.source == MODEL_FRACTION:
        return f"{share} from the Model's memoryFraction"
    if budget.source == AGENT:
        return f"{share} from the agent's memory fraction"
    limit = "<=" if budget.host_total_bytes <= ADAPTIVE_THRESHOLD else ">"
    return f"{share} (adaptive default for hosts {limit} 36 GiB)"
