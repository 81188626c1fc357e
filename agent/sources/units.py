"""A serving unit: one InferenceService together with the Model it serves.

The unit is what the agent runs, budgets and reports on. Its spec hash covers both objects' specs (not their
status or metadata), so a status-only change does nothing and a Model change re-runs every unit that uses it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from agent.estimate.shape import ServeSettings
from agent.sources.manifest import ModelSpec, ServiceSpec


@dataclass(frozen=True)
class ServingUnit:
    service: ServiceSpec
    model: ModelSpec

    @property
    def key(self) -> str:
        return f"{self.service.namespace}/{self.service.name}"

    @property
    def settings(self) -> ServeSettings:
        return self.service.settings()

    @property
    def wanted(self) -> bool:
        """False when the service asks to run nothing (replicas 0 or suspended)."""
        return self.service.replicas > 0 and not self.service.suspend

    def spec_hash(self) -> str:
        def spec(obj: ModelSpec | ServiceSpec) -> dict[str, object]:
            fields = dataclasses.asdict(obj)
            for volatile in ("generation", "origin"):
                fields.pop(volatile, None)
            return fields

        text = json.dumps([spec(self.service), spec(self.model)], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]
