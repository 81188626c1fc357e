"""One worker per object that converges it to its latest desired state: the reporter's retry discipline.

A retry loop per change multiplies: each status change of a unit whose write failed added another loop for the
same object (96 requests a minute after one deploy against a real API server, nothing changing). Here a change
only records that the object is wanted again (``request``); one worker per object runs ``sync`` until it
reports an outcome that needs nothing more, then sleeps until the next change:

- ``DONE``: the object matches its desired state; wait for a change.
- ``RETRY``: a transient failure (5xx, 429, timeouts, connection errors): back off (capped exponential, with
  jitter), then converge to whatever is desired by then. A change does not cut a backoff short: a sick server
  gets no more requests because the agent is busy.
- ``REFUSED``: a permanent failure (400, 403, 404 where the object should exist, 409 of a foreign owner, 422):
  the same request would be refused again, so nothing is retried until the desired state changes.
- ``GONE``: the object is forgotten; the worker ends (a later change starts a new one).

Latest wins: a burst of changes during a sync costs one more sync, not one per change.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
import structlog
from anyio.abc import TaskGroup

from agent.kube.watch_loop import backoff_delay

log = structlog.get_logger("metal_agent.kube.reconcile")


class Outcome(enum.Enum):
    DONE = "done"
    RETRY = "retry"
    REFUSED = "refused"
    GONE = "gone"


class _State(enum.Enum):
    BUSY = "busy"  # syncing, or a change is waiting for the worker to pick it up
    WAITING = "waiting"  # converged (or refused for good): waits for a change
    BACKOFF = "backoff"  # a transient failure: sleeps before the next try


@dataclass
class _Worker:
    version: int = 0  # bumped by each change
    state: _State = _State.BUSY
    changed: anyio.Event | None = None
    failures: int = 0  # transient failures in a row


class Reconciler:
    """``request(key)`` from anywhere (sync code included); ``run()`` in a task group starts the workers."""

    def __init__(
        self,
        sync: Callable[[str], Awaitable[Outcome]],
        *,
        concurrency: int = 8,
        backoff_base: float = 1.0,
        backoff_cap: float = 60.0,
    ) -> None:
        self.sync, self.backoff_base, self.backoff_cap = sync, backoff_base, backoff_cap
        self.limiter = anyio.CapacityLimiter(concurrency)
        self.workers: dict[str, _Worker] = {}
        self._to_start: list[str] = []
        self._wake = anyio.Event()
        self._idle = anyio.Event()
        self._idle.set()
        self.syncs = 0

    def request(self, key: str) -> None:
        """The desired state of ``key`` changed: its worker converges to it (started if there is none)."""
        worker = self.workers.get(key)
        if worker is None:
            self.workers[key] = worker = _Worker()
            self._to_start.append(key)
            self._wake.set()
        worker.version += 1
        if worker.state is _State.WAITING:
            worker.state = _State.BUSY
        if worker.changed is not None:
            worker.changed.set()
        self._update_idle()

    @property
    def backing_off(self) -> list[str]:
        return sorted(k for k, w in self.workers.items() if w.state is _State.BACKOFF)

    @property
    def busy(self) -> int:
        return sum(w.state is _State.BUSY for w in self.workers.values())

    async def wait_idle(self) -> None:
        """Until every worker has converged, been refused for good, or is backing off after a failure."""
        await self._idle.wait()

    def _update_idle(self) -> None:
        if any(w.state is _State.BUSY for w in self.workers.values()):
            if self._idle.is_set():
                self._idle = anyio.Event()
        else:
            self._idle.set()

    async def run(self, tasks: TaskGroup) -> None:
        """Start a worker for each object that needs one, in ``tasks``, until cancelled."""
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            starting, self._to_start = self._to_start, []
            for key in starting:
                tasks.start_soon(self._work, key, name=f"reconcile {key}")

    async def _work(self, key: str) -> None:
        worker = self.workers[key]
        try:
            while True:
                version = worker.version
                worker.state = _State.BUSY
                self._update_idle()
                async with self.limiter:
                    try:
                        outcome = await self.sync(key)
                    except Exception:  # a bug must cost one object's status, not the reporter
                        log.exception("reconcile failed", object=key)
                        outcome = Outcome.RETRY
                self.syncs += 1
                if outcome is Outcome.GONE and worker.version == version:
                    return
                if outcome is Outcome.RETRY:
                    worker.failures += 1
                    worker.state = _State.BACKOFF
                    self._update_idle()
                    await anyio.sleep(backoff_delay(worker.failures, self.backoff_base, self.backoff_cap))
                    continue
                worker.failures = 0
                if worker.version != version:
                    continue  # changed while syncing: the latest wins
                worker.state, worker.changed = _State.WAITING, anyio.Event()
                self._update_idle()
                await worker.changed.wait()
                worker.changed = None
        finally:
            if self.workers.get(key) is worker:
                del self.workers[key]
            self._update_idle()
