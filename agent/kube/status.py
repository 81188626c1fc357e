"""An InferenceService's ``status`` as LLMKube tools read it, built from the agent's own unit status.

Pure functions, so the mapping and the merge patch are tested without a server. The agent's phases are mapped
onto LLMKube's (``Starting`` → ``Creating``, ``Restarting`` → ``Progressing``, ``CrashLoop`` → ``Failed``...),
and the agent's own phase stays visible in ``status.agent.phase``. Conditions keep their ``lastTransitionTime``
unless their status changes, so a new message (a retry countdown) is not a transition.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from agent.estimate.shape import ModelShape
from agent.util.duration import format_duration
from agent.util.quantity import format_bytes

JSON = dict[str, Any]

LLMKUBE_PHASE = {
    "Pending": "Pending",
    "Downloading": "Progressing",
    "Starting": "Creating",
    "Ready": "Ready",
    "Restarting": "Progressing",
    "CrashLoop": "Failed",
    "Failed": "Failed",
    "Stopped": "Stopped",
    "Stopping": "Progressing",  # its server is being stopped (deleted, suspended, its Model gone)
    "Terminating": "Terminating",  # deletionTimestamp set, finalizers pending: the server is already stopped
}
TERMINATING = "Terminating"
ENDPOINT_CONDITION = "EndpointRegistered"
OWN_CONDITIONS = frozenset({"Admitted", "Ready", ENDPOINT_CONDITION})  # the rest are other writers', kept
# Reasons that say why the service is not scheduled at all (LLMKube's schedulingStatus).
SCHEDULING_REASONS = frozenset(
    {
        "InsufficientMemory",
        "MemoryCheckFailed",
        "InvalidSpec",
        "ModelNotFound",
        "UnsupportedSource",
        "SourceNotAllowed",
        "NoExecutor",
    }
)
# An on-demand unit in these phases answers a request through the agent's /v1 listener (after a cold start, or a
# 503 with Retry-After while memory is made); Failed, CrashLoop, Stopping and Stopped ones do not.
ON_DEMAND_SERVING = frozenset({"Idle", "Pending", "Downloading", "Starting", "Ready", "Restarting"})
RUNNING_PHASES = frozenset({"Downloading", "Starting", "Ready", "Restarting", "CrashLoop"})  # admitted
ESTIMATE_KEYS = {"weights": "weights", "kv_cache": "kvCache", "compute": "compute", "overhead": "overhead"}
MAX_MESSAGE = 4096
MANAGED_FIELDS = frozenset(
    {
        "phase",
        "readyReplicas",
        "schedulingStatus",
        "schedulingMessage",
        "endpoint",
        "observedGeneration",
        "agent",
        "memory",
        "conditions",
    }
)


def now() -> str:
    """RFC 3339 with second precision, as Kubernetes writes ``metav1.Time``."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def llmkube_phase(phase: str, reason: str, suspended: bool) -> str:
    if phase == "Stopped":
        return "Suspended" if suspended else "Stopped"
    return LLMKUBE_PHASE.get(phase, phase)


def conditions(phase: str, reason: str, message: str) -> list[tuple[str, str, str, str]]:
    """(type, status, reason, message) of the ``Admitted`` and ``Ready`` conditions."""
    if phase == TERMINATING:
        return [("Admitted", "False", TERMINATING, message), ("Ready", "False", TERMINATING, message)]
    if reason in SCHEDULING_REASONS:
        admitted = ("False", reason)
    elif phase in RUNNING_PHASES or phase == "Failed":  # it passed the memory check; a later step failed
        admitted = ("True", "Adopted" if reason == "Adopted" else "Admitted")
    elif phase == "Stopped":
        admitted = ("False", reason or "Stopped")
    else:
        admitted = ("Unknown", reason or phase)
    if phase == "Ready":
        ready = ("True", "Ready")
    elif phase in ("Starting", "Restarting", "CrashLoop", "Stopped", "Stopping"):
        ready = ("False", "Suspended" if reason == "Suspended" else phase)
    else:
        ready = ("False", reason or phase)
    return [("Admitted", *admitted, message), ("Ready", *ready, message)]


def build_status(
    status: Mapping[str, Any],
    previous: Mapping[str, Any] | None,
    *,
    generation: int | None,
    suspended: bool,
    host: str,
    endpoint: str | None,
    host_endpoint: str | None,
    endpoint_condition: tuple[str, str, str] | None = None,
    timestamp: str | None = None,
    through_proxy: bool = False,
) -> JSON:
    """The full ``status`` to hold on the InferenceService; ``previous`` (what is there) keeps transition times.

    ``endpoint_condition`` (status, reason, message) is the ``EndpointRegistered`` condition; None removes it.
    The endpoints are shown while the unit is Ready, or ``through_proxy`` (they lead to the agent's /v1
    listener, which starts an on-demand unit) in every phase that answers a request."""
    stamp = timestamp or now()
    phase, reason = str(status.get("phase") or "Pending"), str(status.get("reason") or "")
    message = str(status.get("message") or "")[:MAX_MESSAGE]
    old = {c.get("type"): c for c in (previous or {}).get("conditions") or [] if isinstance(c, Mapping)}
    built_conditions = []
    own = conditions(phase, reason, message)
    if endpoint_condition is not None:
        own.append((ENDPOINT_CONDITION, *endpoint_condition))
    for kind, state, why, text in own:
        before = old.get(kind) or {}
        condition: JSON = {
            "type": kind,
            "status": state,
            "reason": why,
            "message": text,
            "lastTransitionTime": before.get("lastTransitionTime") if before.get("status") == state else None,
        }
        condition["lastTransitionTime"] = condition["lastTransitionTime"] or stamp
        if generation is not None:
            condition["observedGeneration"] = generation
        elif "observedGeneration" in before:
            condition["observedGeneration"] = before["observedGeneration"]
        built_conditions.append(condition)
    built_conditions += [dict(c) for t, c in old.items() if t not in OWN_CONDITIONS]  # other writers' are kept
    scheduling = reason in SCHEDULING_REASONS
    reachable = phase == "Ready" or (through_proxy and phase in ON_DEMAND_SERVING)
    result: JSON = {
        "phase": llmkube_phase(phase, reason, suspended),
        "readyReplicas": 1 if phase == "Ready" else 0,
        "schedulingStatus": reason if scheduling else None,
        "schedulingMessage": message if scheduling else None,
        "endpoint": endpoint if reachable else None,
        "observedGeneration": generation if generation is not None else (previous or {}).get("observedGeneration"),
        "agent": {
            "host": host,
            "phase": phase,
            "executor": status.get("executor"),
            "restarts": status.get("restarts") or 0,
            "endpoint": host_endpoint if reachable else None,
            "contextSize": status.get("context_size"),
            "onDemand": on_demand(status.get("on_demand")),
        },
        "memory": memory(status),
        "conditions": built_conditions,
    }
    return result


def managed(status: Mapping[str, Any]) -> JSON:
    """The part of a status this agent writes: other writers' fields are never patched away."""
    return {key: value for key, value in status.items() if key in MANAGED_FIELDS}


def on_demand(fields: Mapping[str, Any] | None) -> JSON | None:
    """An on-demand unit's state (agent/engine/ondemand.py) as the status holds it; None for an always-on unit."""
    if not fields:
        return None
    last = fields.get("last_request")
    return {
        "state": fields.get("state"),
        "idleTimeout": format_duration(float(fields.get("idle_timeout_s") or 0)),
        "lastRequest": datetime.fromtimestamp(last, UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if last else None,
    }


def memory(status: Mapping[str, Any]) -> JSON | None:
    budget, estimate, actual = status.get("budget"), status.get("estimate"), status.get("actual")
    if not (budget or estimate or actual):
        return None
    out: JSON = {}
    if budget:
        out.update(budget=format_bytes(budget["bytes"]), budgetBytes=budget["bytes"], budgetSource=budget["source"])
    if estimate:
        out.update(
            estimate=format_bytes(estimate["total"]),
            estimateBytes=estimate["total"],
            estimateBreakdown={ESTIMATE_KEYS.get(k, k): v for k, v in estimate.items() if k != "total"},
        )
    if actual:
        measured = status.get("measured") or {}
        figure = measured.get("total_bytes") or actual.get("total") or actual.get("rss")
        out.update(actualBytes=figure, actual=dict(actual))
    return out


def merge_patch(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> JSON:
    """The RFC 7386 merge patch that turns ``old`` into ``new`` (``None`` values in ``new`` mean absent).

    Lists are replaced whole, as merge patch does; keys that ``new`` lacks or sets to None are deleted.
    """
    old = old or {}
    patch: JSON = {}
    for key in old.keys() | new.keys():
        before, after = old.get(key), new.get(key)
        if after is None:
            if before is not None:
                patch[key] = None
        elif isinstance(after, Mapping) and isinstance(before, Mapping):
            sub = merge_patch(before, after)
            if sub:
                patch[key] = sub
        elif after != before:
            patch[key] = strip_nulls(after)
    return patch


def strip_nulls(value: Any) -> Any:
    """A value as the server stores it after a merge patch: no null members."""
    if isinstance(value, Mapping):
        return {k: strip_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [strip_nulls(v) for v in value]
    return value


def model_facts(shape: ModelShape) -> JSON:
    """The Model status LLMKube keeps about the file (``size``, ``gguf``): the same on every host that reads it."""
    return {
        "size": format_bytes(shape.file_bytes),
        "sizeBytes": shape.file_bytes,
        "gguf": {
            "architecture": shape.architecture,
            "contextLength": shape.context_length,
            "embeddingSize": shape.n_embd,
            "layerCount": shape.n_layer,
            "headCount": shape.n_head,
            "headCountKV": max(shape.n_head_kv, default=0),
            "tensorCount": shape.tensor_count,
            "vocabSize": shape.n_vocab,
        },
    }
