"""Which API objects this agent serves, and the events that keep the pipeline's view equal to that set.

Several agents may share one cluster (a Mac on metal, a GPU box on cuda, several Macs split by an allowlist). An
agent must neither run nor report on another agent's objects, or two agents would fight over one status. So the
source keeps every object the server sent (``raw``), and the pipeline sees only the owned ones (``visible``):

- a Model is owned when its ``hardware.accelerator`` is one this agent serves;
- an InferenceService is owned when its Model is owned and, with an allowlist, it is on it (the label selector
  has already been applied by the server). One whose Model does not exist (yet) is shown only when the
  allowlist names it: it is then this agent's to report ``ModelNotFound``.

Events are the difference between the visible set before and after each change, so a Model moved to another
accelerator produces DELETED events for it and its services, a re-list after 410 Gone reconciles everything
(DELETED for what vanished while disconnected), and a status-only change produces nothing (``standalone.diff``
compares specs only).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from agent.sources.manifest import API_VERSION, GROUP, VERSION, ManifestError, ModelSpec, ServiceSpec, parse_object
from agent.sources.standalone import Event, EventType, Obj, diff

log = structlog.get_logger("metal_agent.kube")
Key = tuple[str, str, str]
PLURALS = {"Model": "models", "InferenceService": "inferenceservices"}
SPEC_TYPES = {"Model": "ModelSpec", "InferenceService": "ServiceSpec"}


@dataclass(frozen=True)
class Ownership:
    accelerators: frozenset[str]
    only: frozenset[str] = frozenset()

    def owns_model(self, model: ModelSpec) -> bool:
        return model.accelerator in self.accelerators

    def allowlisted(self, service: ServiceSpec) -> bool:
        return not self.only or f"{service.namespace}/{service.name}" in self.only


def api_path(kind: str, namespace: str, name: str) -> str:
    """Where an object lives on the API server; it is the object's ``origin`` and the key of its errors."""
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURALS[kind]}/{name}"


@dataclass
class Visibility:
    ownership: Ownership
    raw: dict[Key, Obj] = field(default_factory=dict)
    visible: dict[Key, Obj] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # API path -> why the object is invalid

    # -- input ----------------------------------------------------------------------------------------------
    def listed(self, kind: str, items: Iterable[Mapping[str, Any]]) -> list[Event]:
        """A complete listing of one kind replaces everything known of it."""
        spec_type = SPEC_TYPES[kind]
        before = {k for k in self.raw if k[0] == spec_type}
        seen: set[Key] = set()
        for item in items:
            key = self._store(kind, item)
            if key is not None:
                seen.add(key)
        for key in before - seen:
            del self.raw[key]
        listed_paths = {api_path(kind, *key[1:]) for key in seen}
        for path in [p for p in self.errors if f"/{PLURALS[kind]}/" in p and p not in listed_paths]:
            del self.errors[path]  # gone from the server: no longer an error
        affected = before | seen
        if kind == "Model":
            affected |= {k for k in (*self.raw, *self.visible) if k[0] == "ServiceSpec"}
        return self._refresh(affected)

    def changed(self, kind: str, event_type: str, item: Mapping[str, Any]) -> list[Event]:
        """One watch event (ADDED, MODIFIED, DELETED)."""
        meta = _meta(item)
        if meta is None:
            log.warning("object without a name ignored", kind=kind)
            return []
        namespace, name = meta
        key = (SPEC_TYPES[kind], namespace, name)
        if event_type == "DELETED":
            self.raw.pop(key, None)
            self.errors.pop(api_path(kind, namespace, name), None)
        else:
            self._store(kind, item)
        affected = {key}
        if kind == "Model":
            affected |= {k for k, o in (*self.raw.items(), *self.visible.items())
                         if isinstance(o, ServiceSpec) and (o.namespace, o.model_ref) == (namespace, name)}  # fmt: skip
        return self._refresh(affected)

    def _store(self, kind: str, item: Mapping[str, Any]) -> Key | None:
        meta = _meta(item)
        if meta is None:
            return None
        namespace, name = meta
        where = api_path(kind, namespace, name)
        key = (SPEC_TYPES[kind], namespace, name)
        if (item.get("metadata") or {}).get("deletionTimestamp"):
            self.raw.pop(key, None)  # being deleted: stop serving it now, not when its finalizers are done
            return key
        try:
            obj = parse_object(_with_defaults(kind, item), where)
        except ManifestError as exc:
            if self.errors.get(where) != str(exc):
                log.error("invalid object", object=where, error=str(exc))
            self.errors[where] = str(exc)
            return key  # a previously valid version keeps running, as a broken manifest file does
        self.errors.pop(where, None)
        self.raw[key] = obj
        return key

    # -- output ---------------------------------------------------------------------------------------------
    def snapshot(self) -> list[Event]:
        """Everything served, as ADDED events, Models first: the pipeline's first view."""
        keys = sorted(self.visible, key=lambda k: (k[0] != "ModelSpec", k))
        return [Event(EventType.ADDED, self.visible[key]) for key in keys]

    def _refresh(self, affected: Iterable[Key]) -> list[Event]:
        old: dict[Key, Obj] = {}
        new: dict[Key, Obj] = {}
        for key in sorted(affected, key=lambda k: (k[0] != "ModelSpec", k)):  # Models first, then by name
            if key in self.visible:
                old[key] = self.visible[key]
            obj = self.raw.get(key)
            if obj is not None and self._shown(obj):
                new[key] = obj
        for key in old.keys() - new.keys():
            del self.visible[key]
        self.visible.update(new)
        return diff(old, new)

    def _shown(self, obj: Obj) -> bool:
        if isinstance(obj, ModelSpec):
            return self.ownership.owns_model(obj)
        if not self.ownership.allowlisted(obj):
            return False
        model = self.raw.get(("ModelSpec", obj.namespace, obj.model_ref))
        if not isinstance(model, ModelSpec):
            return bool(self.ownership.only)  # named explicitly: this agent reports ModelNotFound
        return self.ownership.owns_model(model)


def _meta(item: Mapping[str, Any]) -> tuple[str, str] | None:
    meta = item.get("metadata") or {}
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        return None
    return str(meta.get("namespace") or "default"), name


def _with_defaults(kind: str, item: Mapping[str, Any]) -> Mapping[str, Any]:
    """Watch events of custom objects carry apiVersion and kind; a listing's items may not (older servers)."""
    if item.get("apiVersion") and item.get("kind"):
        return item
    return {**item, "apiVersion": item.get("apiVersion") or API_VERSION, "kind": item.get("kind") or kind}
