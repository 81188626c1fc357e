"""The hook specifications and the executor interface: what a plugin may implement, stage by stage.

Plugins import these names from ``agent.plugin`` (the public API); this module is where they are specified, and
docs/plugins.md shows them (scripts/plugin_docs.py writes its reference part from the docstrings below).

A plugin is a module (or object) whose functions are marked ``@hookimpl``, registered through the
``metal_agent.executors`` entry-point group. The hooks follow the pipeline:

- loading, once when the agent starts: ``agent_settings``, then ``register_executors``;
- per serving unit, each time it is (re)started: ``resolve_budget`` → ``preflight`` → admission (the agent's
  own) → spawn (the first executor whose ``accepts`` says yes builds the ``Launch``) → health probes on its
  ``health_path`` → ``report`` at every status change.

Hooks are called through pluggy: the last registered plugin first (third-party plugins before the built-in
ones, and the agent's own defaults last), ``tryfirst``/``trylast`` and wrappers work, and a hook name no
specification has makes its plugin fail (a typo is not ignored). ``resolve_budget`` and ``preflight`` are
``firstresult``: the first answer that is not None wins. Any hook may be ``async def``; the agent awaits it (a
wrapper sees an async answer before it is awaited). A plugin that raises in a loading hook fails alone and is
listed by ``metal-agent plugins``; a raising ``report`` is logged and the others still run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pluggy

if TYPE_CHECKING:
    from agent.config.settings import Setting
    from agent.estimate.budget import Budget
    from agent.estimate.hostmem import HostMemory
    from agent.estimate.preflight import Verdict
    from agent.sources.units import ServingUnit

PROJECT = "metal_agent"
ENTRY_POINT_GROUP = "metal_agent.executors"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --- spawn: what an executor builds ------------------------------------------------------------------------


@dataclass(frozen=True)
class Launch:
    """How to start one inference server.

    ``argv``: the command as an argument list, never run through a shell; ``health_path``: the HTTP path that
    answers 200 once the server is ready and while it is healthy, probed on 127.0.0.1 at start and every
    ``servers.probe_interval`` after (``servers.unhealthy_after`` failures in a row restart it); ``env``:
    variables added to the agent's environment; ``cwd``: the working directory (default: the agent's).
    """

    argv: list[str]
    health_path: str = "/health"
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None


class Executor(Protocol):
    """Runs models of some kind; registered by ``register_executors``, asked in order, the first that accepts a
    unit serves it. ``name`` shows in ``metal-agent plugins``, the status and the metrics.

    An executor may also define ``check_spec(unit) -> str | None``: why the unit's spec cannot be served as
    written (an ``extraArgs`` flag it does not allow, say), or None. The agent asks it before the unit is admitted;
    a message makes the unit ``Failed`` with reason ``InvalidSpec`` and nothing is started.

    An executor may also define ``measure(pid, log_path) -> agent.memory.footprint.Footprint``: what its server really
    uses, per kind of memory (host, device per GPU), each figure with its source. Without it the agent measures
    the process's host memory (RSS on Linux, the physical footprint on macOS) and llama.cpp's log.
    """

    name: str

    def accepts(self, unit: ServingUnit) -> str | None:
        """None when this executor serves ``unit``, else why not in a few words (the ``NoExecutor`` message
        lists every executor's reason)."""
        ...

    def command(self, unit: ServingUnit, model_path: Path, port: int) -> Launch:
        """The server for ``unit``: ``model_path`` is the local model file (or directory), downloaded already;
        ``port`` is free, and the server must listen on it. ``unit.settings`` holds the context size, slots
        and cache types the budget was checked against: pass them on, or the check was for another server. An
        exception fails the unit (reason ``SpawnFailed``, its message shown)."""
        ...


# --- loading: once, when the agent starts ---------------------------------------------------------------------


def spec_problem(executor: Executor, unit: ServingUnit) -> str | None:
    """The executor's ``check_spec`` answer (None where it has none: the method is optional)."""
    check = getattr(executor, "check_spec", None)
    return check(unit) if callable(check) else None


@hookspec
def agent_settings() -> list[Setting]:
    """Return the settings this plugin takes (a list of ``Setting``), in its own TOML table
    (``[executors.NAME]``).

    They are checked like the agent's own (type, range, unknown keys, with a suggestion for a typo) and can also
    come from ``METAL_AGENT_*`` variables; ``config show`` and ``config sample`` include them. Their values reach
    ``register_executors`` as ``settings[name]``. A setting name, TOML key or variable the agent or an earlier
    plugin has already makes this plugin fail (listed by ``metal-agent plugins``); the others load.
    """
    return []


@hookspec
def register_executors(register: Callable[[Executor], None], settings: Mapping[str, Any]) -> None:
    """Call ``register(executor)`` for each ``Executor`` this plugin provides; return nothing.

    ``register``: adds one executor; executors are asked in plugin order, then in the order registered, and
    the first that accepts a unit serves it. ``settings``: the effective configuration by setting name (the
    agent's and every plugin's; empty where none was loaded, such as ``metal-agent plugins``: use defaults).
    """


# --- per unit, stage 1: the budget ------------------------------------------------------------------------------


@hookspec(firstresult=True)
def resolve_budget(unit: ServingUnit, host: HostMemory, agent_fraction: float | None) -> Budget | None:
    """Return the memory ``Budget`` the unit must stay within, or None to leave it to the next plugin.

    ``unit``: the InferenceService and its Model; ``host``: the memory the models share (total, available,
    where it was read; a GPU plugin may answer from its own memory instead); ``agent_fraction``: the agent's
    ``memory.fraction``, None for the adaptive default. The default is the Model's ``memoryBudget``, else its
    ``memoryFraction``, else the agent's fraction, else adaptive. Raise ``ValueError`` for an invalid spec: the
    unit fails with reason ``InvalidSpec`` and the message.
    """


# --- per unit, stage 2: pre-flight ------------------------------------------------------------------------------


@hookspec(firstresult=True)
def preflight(unit: ServingUnit, model_path: Path, budget: Budget, host: HostMemory, mode: str) -> Verdict | None:
    """Return the ``Verdict`` on starting the unit, or None to leave it to the next plugin.

    ``model_path``: the model file (or directory); a remote model is checked before it is downloaded, from its
    header. ``budget``: the answer of ``resolve_budget``; ``host``: as there; ``mode``: ``enforce`` (a model
    that does not fit is not started) or ``warn`` (it starts, with a warning). The default reads the GGUF header
    and estimates weights, KV cache, compute buffers and overhead (``check_gguf``); a plugin for another format
    reads its own shape and calls ``judge``, or answers ``failed(...)`` when it cannot check (fail closed). The
    estimate of an allowed verdict is what the unit reserves until its server is measured.
    """


# --- per unit, stage 4: reporting (stage 3, spawn, is the executor's ``command``) --------------------------------


@hookspec
def report(unit: ServingUnit | None, status: dict[str, Any]) -> None:
    """Take note of a unit's new status; return nothing. Called at every change of phase, reason or memory.

    ``unit``: the unit, or None once its InferenceService or Model is gone; ``status``: what ``/status`` shows
    for it (``unit``, ``phase``, ``reason``, ``message``, ``budget``, ``estimate``, ``actual``, ``pid``,
    ``port``, ``endpoint``, ``restarts``, ``executor``, ``download``, ``warning``). Phase ``Deleted`` is the
    last call for a unit. A reporter that raises is logged; the others and the agent go on.
    """
