"""Prometheus metrics of one Agent: counters the pipeline (and other parts) increment, gauges read at scrape time.

Every Agent has its own registry, so several agents in one process (tests, benchmarks) never share a series.
Gauges are not kept in step by hand: a collector reads ``Agent.status()`` at each scrape, so ``/metrics`` and
``/status`` always agree. Counters and histograms count what happened between scrapes; code outside the
pipeline reaches them through ``agent.metrics``, e.g. ``agent.metrics.evicted("MemoryPressure")`` or
``agent.metrics.watch_reconnected("Model")``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from agent import __version__

PHASES = (
    "Pending",
    "Downloading",
    "Starting",
    "Ready",
    "Restarting",
    "CrashLoop",
    "Failed",
    "Stopping",
    "Stopped",
    "Idle",
)
# From a Model edit that only re-checks a budget (milliseconds) to a large model loading from disk (minutes).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
STARTUP_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)


class Metrics:
    """The metrics of one Agent, in their own registry; ``registry`` is what ``/metrics`` serves."""

    def __init__(self, status: Callable[[], Mapping[str, Any]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.admissions = Counter(
            "metal_agent_admissions",
            "Units admitted by the ledger: memory reserved, server about to start.",
            [],
            registry=reg,
        )
        self.rejections = Counter(
            "metal_agent_rejections",
            "Units refused a start, by reason (InsufficientMemory: does not fit its own budget; WaitingForMemory: "
            "waits for the host budget or the OS to free memory; MemoryCheckFailed, InvalidSpec, UnsupportedSource, "
            "NoExecutor, ExceedsBudget: stopped after load for exceeding its budget). Counted once each time a "
            "unit enters the state, not on every retry while it waits.",
            ["reason"],
            registry=reg,
        )
        self.restarts = Counter(
            "metal_agent_unit_restarts",
            "Restarts of a unit's server after a crash or failed health checks.",
            ["unit"],
            registry=reg,
        )
        self.evictions = Counter(
            "metal_agent_evictions",
            "Servers stopped by the agent to relieve memory pressure, by reason.",
            ["reason"],
            registry=reg,
        )
        self.watch_reconnects = Counter(
            "metal_agent_watch_reconnects",
            "Reconnects of a watch source to its event stream, by resource.",
            ["resource"],
            registry=reg,
        )
        self.state_save_failures = Counter(
            "metal_agent_state_save_failures",
            "Saves of the state file that failed (read-only or full disk); servers keep running, the save is "
            "retried and /status shows state: degraded until one succeeds.",
            [],
            registry=reg,
        )
        self.kube_refusals = Counter(
            "metal_agent_kube_api_refusals",
            "Requests of the Kubernetes reporter the API server refused for good, by the API's reason (Invalid, "
            "Forbidden, BadRequest, NotFound, Conflict: a name another owner holds). Not retried until the "
            "object's desired state changes.",
            ["reason"],
            registry=reg,
        )
        self.pipeline_latency = Histogram(
            "metal_agent_pipeline_latency_seconds",
            "From the first event that changed a unit to the end of the reconcile that applied it (a started "
            "server counts once it is healthy).",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.server_startup = Histogram(
            "metal_agent_server_startup_seconds",
            "From spawning a unit's server to its first healthy answer.",
            ["executor"],
            buckets=STARTUP_BUCKETS,
            registry=reg,
        )
        reg.register(StateCollector(status))
        ProcessCollector(registry=reg)
        PlatformCollector(registry=reg)
        GCCollector(registry=reg)

    # Named increments: the only calls other modules need.
    def admitted(self) -> None:
        self.admissions.inc()

    def rejected(self, reason: str) -> None:
        self.rejections.labels(reason).inc()

    def restarted(self, unit: str) -> None:
        self.restarts.labels(unit).inc()

    def evicted(self, reason: str) -> None:
        """A server was stopped to free memory; the caller logs which one and why."""
        self.evictions.labels(reason).inc()

    def watch_reconnected(self, resource: str) -> None:
        self.watch_reconnects.labels(resource).inc()

    def state_save_failed(self) -> None:
        self.state_save_failures.inc()

    def kube_refused(self, reason: str) -> None:
        self.kube_refusals.labels(reason).inc()

    def reconciled(self, seconds: float) -> None:
        self.pipeline_latency.observe(seconds)

    def server_started(self, executor: str, seconds: float) -> None:
        self.server_startup.labels(executor).observe(seconds)

    def forget_unit(self, unit: str) -> None:
        """The unit is gone: drop its series so a long-running agent does not keep every unit it ever saw."""
        with contextlib.suppress(KeyError):  # it never restarted
            self.restarts.remove(unit)


class StateCollector(Collector):
    """Gauges from ``Agent.status()``, computed at scrape time."""

    def __init__(self, status: Callable[[], Mapping[str, Any]]) -> None:
        self.status = status

    def describe(self) -> Iterable[Metric]:
        return []  # computed at scrape time: registering must not call the agent before it is built

    def collect(self) -> Iterable[Metric]:
        status = self.status()
        host, units = status["host"], status["units"]
        info = GaugeMetricFamily("metal_agent_build_info", "The running metal-agent version.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        for name, key, text in (
            ("metal_agent_host_total_bytes", "total_bytes", "Host memory the agent plans with (after any limits)."),
            ("metal_agent_host_available_bytes", "available_bytes", "Memory the OS reports available."),
            ("metal_agent_host_budget_bytes", "budget_bytes", "Memory the agent may give to all units together."),
            ("metal_agent_reserved_bytes", "reserved_bytes", "Memory reserved by starting and running units."),
        ):
            yield GaugeMetricFamily(name, text, value=host[key])
        yield GaugeMetricFamily(
            "metal_agent_manifest_errors", "Manifests the source could not read.", value=len(status["manifest_errors"])
        )
        labels = ["unit", "executor"]
        reserved = GaugeMetricFamily(
            "metal_agent_unit_reserved_bytes", "Memory the ledger holds for a unit.", labels=labels
        )
        estimated = GaugeMetricFamily("metal_agent_unit_estimated_bytes", "Estimated memory of a unit.", labels=labels)
        budget = GaugeMetricFamily("metal_agent_unit_budget_bytes", "A unit's own memory budget.", labels=labels)
        actual = GaugeMetricFamily(
            "metal_agent_unit_actual_bytes",
            "Memory of a unit's server once ready: rss of the process, the measured host (and GPU: device) memory "
            "and what llama.cpp reports it allocated (model, kv, output, compute, total).",
            labels=[*labels, "component"],
        )
        phase = GaugeMetricFamily(
            "metal_agent_unit_phase", "Current phase of a unit (1 for the phase it is in).", labels=["unit", "phase"]
        )
        for unit in units:
            ids = [unit["unit"], unit["executor"] or ""]
            reserved.add_metric(ids, unit.get("reserved_bytes", 0))
            if unit["estimate"]:
                estimated.add_metric(ids, unit["estimate"]["total"])
            if unit["budget"]:
                budget.add_metric(ids, unit["budget"]["bytes"])
            for component, value in (unit["actual"] or {}).items():
                actual.add_metric([*ids, component], value)
            for name in PHASES:
                phase.add_metric([unit["unit"], name], int(unit["phase"] == name))
        yield from (reserved, estimated, budget, actual, phase)
        gpu_budget = GaugeMetricFamily(
            "metal_agent_gpu_budget_bytes", "Device memory the agent may give to units on a GPU.", labels=["gpu"]
        )
        gpu_reserved = GaugeMetricFamily(
            "metal_agent_gpu_reserved_bytes", "Device memory starting and running units hold on a GPU.", labels=["gpu"]
        )
        gpu_free = GaugeMetricFamily(
            "metal_agent_gpu_free_bytes", "Device memory a GPU has free, other processes' use counted.", labels=["gpu"]
        )
        for index, gpu in ((status.get("admission") or {}).get("gpus") or {}).items():
            gpu_budget.add_metric([index], gpu["budget_bytes"])
            gpu_reserved.add_metric([index], gpu["reserved_bytes"])
            if gpu.get("device_free_bytes") is not None:
                gpu_free.add_metric([index], gpu["device_free_bytes"])
        yield from (gpu_budget, gpu_reserved, gpu_free)
