"""What the agent knows about one serving unit while it runs it: phase, reason, process, memory.

Its ``status()`` is the shape reported by the local API, ``metal-agent status`` and the ``report`` hook.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import anyio

from agent.estimate.estimator import Estimate
from agent.estimate.preflight import Verdict
from agent.memory.footprint import Footprint
from agent.processes import supervisor


def _split(est: Estimate) -> dict[str, int]:
    """A GPU estimate's device and host parts."""
    if est.device_bytes is None or est.host_bytes is None:
        return {}
    return {"device": est.device_bytes, "host": est.host_bytes}


@dataclass
class UnitRuntime:
    key: str
    wake: anyio.Event = field(default_factory=anyio.Event)
    phase: str = "Pending"
    reason: str = ""
    message: str = ""
    spec_hash: str | None = None
    verdict: Verdict | None = None
    child: supervisor.Child | None = None
    restarts: int = 0
    failures: int = 0  # consecutive, reset by a healthy start
    unhealthy: int = 0
    retry_at: float | None = None
    actual: dict[str, int] = field(default_factory=dict)
    footprint: Footprint | None = None  # the last measurement, each figure with its source
    executor: str | None = None
    event_at: float | None = None  # monotonic time of the first event not yet reconciled (pipeline latency)
    download: dict[str, Any] | None = None  # bytes done / total while a remote model downloads
    warning: dict[str, str] | None = None  # {reason, message}: e.g. the measured footprint exceeds the reservation
    exceeded: str | None = None  # enforce mode: why the server is over its own budget (it is stopped)
    evict_message: str | None = None  # set by the memory guard: the worker stops the server and says why
    launch_scope: anyio.CancelScope | None = None  # the start in progress, cancelled by an eviction

    def poke(self) -> None:
        self.wake.set()

    def notify(self) -> None:
        """An event changed the unit: wake its worker, remembering when the first such event arrived."""
        if self.event_at is None:
            self.event_at = time.monotonic()
        self.poke()

    def log_context(self) -> dict[str, object]:
        """What every log line of the unit's worker carries besides the unit: the process serving it now."""
        return {"executor": self.executor, "pid": self.child.pid if self.child else None}

    def status(self) -> dict[str, Any]:
        verdict, child = self.verdict, self.child
        est = verdict.estimate if verdict else None
        budget = verdict.budget if verdict else None
        return {
            "unit": self.key,
            "phase": self.phase,
            "reason": self.reason,
            "message": self.message,
            "budget": {"bytes": budget.bytes, "source": budget.source} if budget else None,
            "estimate": {**est.components(), "total": est.total_bytes, **_split(est)} if est else None,
            "actual": self.actual or None,
            "measured": self.footprint.status() if self.footprint else None,
            "pid": child.pid if child else None,
            "port": child.port if child else None,
            "endpoint": f"http://127.0.0.1:{child.port}" if child and self.phase == "Ready" else None,
            "restarts": self.restarts,
            "executor": self.executor,
            "download": self.download,
            "warning": self.warning,
        }
