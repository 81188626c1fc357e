"""Metrics of the OpenAI-compatible endpoint and of serving on demand, in the agent's own registry.

Kept apart from agent/engine/metrics.py (the pipeline's): cold starts, idle stops, how long requests waited for their
unit, and requests by unit and status code. Evictions to make room are the pipeline's eviction counter with
reason ``MakeRoom``.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Histogram

# From a warm server (no wait) to a large model's cold start (minutes).
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServingMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.cold_starts = Counter(
            "metal_agent_cold_starts",
            "On-demand units started because a request named them.",
            ["unit"],
            registry=registry,
        )
        self.idle_stops = Counter(
            "metal_agent_idle_stops",
            "On-demand units stopped after their idle timeout.",
            [],
            registry=registry,
        )
        self.request_wait = Histogram(
            "metal_agent_request_wait_seconds",
            "From a /v1 request's arrival to its forwarding: the wait for its unit to be Ready (cold starts).",
            buckets=WAIT_BUCKETS,
            registry=registry,
        )
        self.requests = Counter(
            "metal_agent_requests",
            "Requests to the /v1 endpoint by unit (empty: no such model) and HTTP status code.",
            ["unit", "code"],
            registry=registry,
        )

    def cold_started(self, unit: str) -> None:
        self.cold_starts.labels(unit).inc()

    def idle_stopped(self) -> None:
        self.idle_stops.inc()

    def waited(self, seconds: float) -> None:
        self.request_wait.observe(seconds)

    def answered(self, unit: str, code: int) -> None:
        self.requests.labels(unit, str(code)).inc()

    def forget_unit(self, unit: str) -> None:
        """The unit is gone: drop its series."""
        with contextlib.suppress(KeyError):
            self.cold_starts.remove(unit)
        for labels in [s.labels for m in self.requests.collect() for s in m.samples if s.labels.get("unit") == unit]:
            with contextlib.suppress(KeyError):
                self.requests.remove(unit, labels["code"])
