"""The hand-over between agents: this agent's children on record, and the ones a previous agent left running.

The agent keeps a record of its children (``children.json`` in the state directory), so that the next agent,
after a restart or an upgrade, can take over servers that still run instead of loading every model again. The
record is written at every change of the set of children; a disk that refuses it degrades the state (retried in
the background, reported on /status and /metrics) and never stops a server.

At start the previous agent's children are recovered, from the record and from the marks in the process table
(agent/processes/adoption.py), and nothing is touched before it is proven ours (pid, create time, mark):

- a unit's second server (a *stray*) is stopped as soon as the agent runs;
- the others are *adoptable*: when their unit's worker first starts the unit with the same spec, the child is
  adopted instead of spawning a new one. Its reservation is held at once (its memory is in use already, so it
  does not queue), and it is Ready once healthy, then supervised as any child this agent started;
- a child whose unit has another spec now is stopped by the worker before the unit starts afresh; one whose unit
  does not want a server (suspended, failed, or gone once the first full listing is in) is stopped in the
  background, since no worker owns it.

Until claimed, adoptable children stay on record, so a second restart does not lose them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio

from agent.engine.unit_state import UnitRuntime
from agent.processes import marker, supervisor
from agent.processes.adoption import recover
from agent.processes.state_keeper import StateKeeper
from agent.processes.statefile import ChildRecord
from agent.sources.units import ServingUnit

if TYPE_CHECKING:
    from agent.engine.pipeline import Agent


class Handover:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        state_dir = agent.config.state_dir
        self.path = state_dir / "children.json"
        self.state_id = marker.state_id(state_dir)  # marks this agent's children (agent/processes/marker.py)
        recovered = recover(self.path, self.state_id, agent.log_path)
        self.adoptable: dict[str, ChildRecord] = recovered.adoptable  # by unit, until claimed or stopped
        self.strays = recovered.strays
        self.state = StateKeeper(self.path, agent.metrics.state_save_failed)  # a failed save never stops us
        self._tasks: anyio.abc.TaskGroup | None = None

    def start(self, tasks: anyio.abc.TaskGroup) -> None:
        """When the agent runs: strays are stopped, and failed saves of the record are retried in the background."""
        self._tasks = tasks
        for record in self.strays:
            self._stop(record)
        tasks.start_soon(self.state.retry_loop, self.save, name="state file retries")

    def save(self) -> None:
        """Write the record: every unit's child, and the previous agent's children not claimed yet."""
        records = [
            ChildRecord(
                r.key, r.spec_hash or "", c.pid, c.create_time, c.argv, c.port, str(c.log_path), c.health_path, c.marker
            )
            for r in self.agent.runtimes.values()
            if (c := r.child) is not None
        ]
        records += list(self.adoptable.values())  # not yet claimed: keep them on record
        self.state.save(records)

    async def adopt(self, runtime: UnitRuntime, unit: ServingUnit, need: int) -> bool:
        """Take over the child a previous agent started for this unit if it runs this spec (healthy or loading).

        True when adopted (``need`` is held in the ledger); False when there was none, or one with another spec,
        which is stopped first: memory is shared, and the unit starts afresh.
        """
        record = self.adoptable.pop(runtime.key, None)
        if record is None:
            return False
        agent, child = self.agent, record.child()
        if record.spec_hash == unit.spec_hash() and record.is_ours():
            agent.admission.hold(runtime.key, need, unit.service.priority, unit.service.eviction_protection)
            runtime.child = child
            adopting, _ = agent.executor_for(unit)
            runtime.executor = adopting.name if adopting else None  # it measures the server
            await agent.set_status(runtime, "Starting", "Adopted", f"adopting pid {child.pid} on port {child.port}")
            if await agent.until_ready(runtime, unit, record.health_path):
                await agent.set_status(runtime, "Ready", "Adopted", f"adopted pid {child.pid} on port {child.port}")
            return True
        if record.is_ours():
            await supervisor.stop(child, agent.config.grace_period)
        return False

    def stop_leftover(self, key: str) -> None:
        """The unit ``key`` will not take over the server a previous agent left for it (if any): stop it."""
        record = self.adoptable.pop(key, None)
        if record is not None:
            self._stop(record)

    def reap_unclaimed(self) -> None:
        """After the first full listing: children whose unit no longer exists, has no Model or is suspended are
        stopped (if still ours)."""
        for key in [k for k in self.adoptable if not self._wants_a_server(k)]:
            self._stop(self.adoptable.pop(key))
        self.save()

    def take_leftovers(self) -> list[supervisor.Child]:
        """At shutdown: the previous agent's children no unit took over, still ours, for the agent to stop."""
        leftovers = [r.child() for r in [*self.adoptable.values(), *self.strays] if r.is_ours()]
        self.adoptable.clear()
        return leftovers

    def _wants_a_server(self, key: str) -> bool:
        unit, _ = self.agent.current_unit(key)
        return unit is not None and unit.wanted

    def _stop(self, record: ChildRecord) -> None:
        """Stop a previous agent's server that no unit takes over, if it is still provably ours."""
        if record.is_ours():
            assert self._tasks is not None
            self._tasks.start_soon(supervisor.stop, record.child(), self.agent.config.grace_period)
