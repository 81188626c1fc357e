"""The agent's own ``resolve_budget`` and ``preflight``: registered first, so any plugin can replace them."""

from __future__ import annotations

from pathlib import Path

from agent.estimate.budget import Budget
from agent.estimate.hostmem import HostMemory
from agent.estimate.preflight import Mode, Verdict
from agent.estimate.preflight import preflight as check
from agent.hookspecs import hookimpl
from agent.sources.units import ServingUnit


@hookimpl
def resolve_budget(unit: ServingUnit, host: HostMemory, agent_fraction: float | None) -> Budget:
    return unit.model.budget(host.total_bytes, agent_fraction)


@hookimpl
def preflight(unit: ServingUnit, model_path: Path, budget: Budget, host: HostMemory, mode: str) -> Verdict:
    return check(model_path, unit.settings, budget, host, Mode(mode))
