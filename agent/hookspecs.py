"""The plugin API: the hooks a plugin may implement, and the executor interface.

A plugin is a plain module (or object) with functions marked ``@hookimpl``, registered through the
``metal_agent.executors`` entry-point group. Hooks may be ``async def``: the agent calls them itself in pluggy's
order and awaits what they return (pluggy has no async support of its own).

Pipeline, per serving unit: ``resolve_budget`` → ``preflight`` → the chosen executor's ``command`` (spawn) →
``report``. The first two are ``firstresult``: the first plugin that returns something other than None wins,
and the agent's own implementations come last. Every ``report`` implementation is called; one that raises is
logged and the others still run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pluggy

if TYPE_CHECKING:
    from agent.budget import Budget
    from agent.hostmem import HostMemory
    from agent.preflight import Verdict
    from agent.settings import Setting
    from agent.units import ServingUnit

PROJECT = "metal_agent"
ENTRY_POINT_GROUP = "metal_agent.executors"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@dataclass(frozen=True)
class Launch:
    """How to start one inference server: an argument list (never a shell) and where it says it is ready."""

    argv: list[str]
    health_path: str = "/health"
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None


class Executor(Protocol):
    """Runs models of some kind. ``accepts`` says why not (a reason) or None when it can serve the unit.

    An executor may also define ``measure(pid, log_path) -> agent.footprint.Footprint``: what its server really
    uses, per kind of memory (host, device per GPU), each figure with its source. Without it the agent measures
    the process's host memory (RSS on Linux, the physical footprint on macOS) and llama.cpp's log.
    """

    name: str

    def accepts(self, unit: ServingUnit) -> str | None: ...

    def command(self, unit: ServingUnit, model_path: Path, port: int) -> Launch: ...


@hookspec
def agent_settings() -> list[Setting]:
    """The settings this plugin takes, each in its own TOML table (``[executors.NAME]``).

    They are checked like the agent's own (type, range, unknown keys) and can also come from ``METAL_AGENT_*``
    variables; their values reach ``register_executors`` as ``settings[name]``.
    """
    return []


@hookspec
def register_executors(register: Callable[[Executor], None], settings: Mapping[str, Any]) -> None:
    """Call ``register(executor)`` for each executor this plugin provides; the first that accepts a unit wins.

    ``settings`` holds the effective configuration by setting name (empty where none was loaded: use defaults).
    """


@hookspec(firstresult=True)
def resolve_budget(unit: ServingUnit, host: HostMemory, agent_fraction: float | None) -> Budget | None:
    """Return the unit's budget, or None to leave it to the next plugin (default: Model > agent > adaptive)."""


@hookspec(firstresult=True)
def preflight(unit: ServingUnit, model_path: Path, budget: Budget, host: HostMemory, mode: str) -> Verdict | None:
    """Return the verdict for starting the unit, or None to leave it to the next plugin (default: the estimator)."""


@hookspec
def report(unit: ServingUnit, status: dict[str, Any]) -> None:
    """Called whenever a unit's status changes (phase, reason, memory); a raising reporter never stops the agent."""
