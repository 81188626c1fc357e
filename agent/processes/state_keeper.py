"""Saving the state file without ever making it a single point of failure.

The state file only helps a restarted agent find its servers; a save that fails (a read-only or full disk, a
directory removed under the agent) must never stop the servers it describes. So a failed save is logged once per
distinct error, counted (``metal_agent_state_save_failures_total``), shown in ``/status`` (``state: degraded`` with
the error) and retried every ``retry_interval`` seconds with the records of that moment, until one succeeds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import structlog

from agent.processes import statefile
from agent.processes.statefile import ChildRecord

log = structlog.get_logger("metal_agent.statefile")
RETRY_SECONDS = 5.0


class StateKeeper:
    def __init__(self, path: Path, on_failure: Callable[[], None] | None = None) -> None:
        self.path = path
        self.on_failure = on_failure  # the metric's increment
        self.error: str | None = None  # the last save's error while degraded
        self.failures = 0
        self.degraded_since: float | None = None
        self._retry: anyio.Event | None = None  # made by the retry loop, inside the event loop

    def save(self, records: list[ChildRecord]) -> bool:
        """Write the records; False (logged, counted, retried later) when the disk refuses."""
        try:
            statefile.save(self.path, records)
        except OSError as exc:
            error = f"cannot save {self.path}: {exc.strerror or exc}"
            self.failures += 1
            if self.on_failure is not None:
                self.on_failure()
            if error != self.error:
                log.error("state not saved; servers keep running, the save is retried", error=error)
            if self.degraded_since is None:
                self.degraded_since = time.time()
            self.error = error
            if self._retry is not None:
                self._retry.set()
            return False
        if self.error is not None:
            log.info("state saved again", path=str(self.path), failed_saves=self.failures)
        self.error, self.degraded_since = None, None
        return True

    async def retry_loop(self, save: Callable[[], object], interval: float | None = None) -> None:
        """While degraded: call ``save`` (which gathers the current records) every ``interval`` seconds."""
        while True:
            while self.error is not None:
                await anyio.sleep(RETRY_SECONDS if interval is None else interval)
                save()
            self._retry = anyio.Event()
            await self._retry.wait()

    def status(self) -> dict[str, Any]:
        return {
            "state": "degraded" if self.error else "ok",
            "state_error": self.error,
            "state_save_failures": self.failures,
        }
