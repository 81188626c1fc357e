"""The fake Kubernetes API's object store: resources, resourceVersions, history, label selectors, patches.

Kept apart from the HTTP side (tests/kubeapi.py) so the semantics a real API server has (one global monotonic
resourceVersion, generation bumped on spec changes only, a bounded event history that watches replay from, label
selectors) can be read and tested on their own.
"""

from __future__ import annotations

import copy
import datetime
import re
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

JSON = dict[str, Any]


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    status_subresource: bool = False

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def custom(self) -> bool:
        """Custom resources (CRDs) refuse strategic-merge-patch, as a real API server does."""
        return self.group == "inference.llmkube.dev"


RESOURCES = [
    Resource("inference.llmkube.dev", "v1alpha1", "models", "Model", status_subresource=True),
    Resource("inference.llmkube.dev", "v1alpha1", "inferenceservices", "InferenceService", status_subresource=True),
    Resource("", "v1", "services", "Service", status_subresource=True),
    Resource("", "v1", "events", "Event"),
    Resource("events.k8s.io", "v1", "events", "Event"),
    Resource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice"),
]
BY_PATH = {(r.group, r.version, r.plural): r for r in RESOURCES}
BY_KIND = {(r.api_version, r.kind): r for r in RESOURCES}


class ApiError(Exception):
    """A failure answered as a Kubernetes Status object."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> JSON:
        return {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
                "code": self.code, "reason": self.reason, "message": self.message}  # fmt: skip


# ---------------------------------------------------------------- label selectors

_REQUIREMENT = re.compile(
    r"^\s*(?:(?P<not>!)\s*(?P<nkey>[\w./-]+)"
    r"|(?P<key>[\w./-]+)\s*(?:(?P<op>==|!=|=)\s*(?P<value>[\w.-]*)"
    r"|\s+(?P<setop>in|notin)\s*\((?P<values>[^)]*)\))?)\s*$"
)

Selector = Callable[[dict[str, str]], bool]
Filter = Callable[[JSON], bool]


def parse_label_selector(text: str) -> Selector:
    """Kubernetes label selector syntax: `a=b`, `a==b`, `a!=b`, `a in (x,y)`, `a notin (x)`, `a`, `!a`."""
    checks: list[Selector] = []
    for part in _split_requirements(text):
        match = _REQUIREMENT.match(part)
        if match is None:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {part!r}")
        if match["not"]:
            checks.append(lambda labels, key=match["nkey"]: key not in labels)
        elif match["setop"]:
            values = {v.strip() for v in match["values"].split(",") if v.strip()}
            if match["setop"] == "in":
                checks.append(lambda labels, key=match["key"], vs=values: labels.get(key) in vs)
            else:
                checks.append(lambda labels, key=match["key"], vs=values: labels.get(key) not in vs)
        elif match["op"] in ("=", "=="):
            checks.append(lambda labels, key=match["key"], v=match["value"]: labels.get(key) == v)
        elif match["op"] == "!=":
            checks.append(lambda labels, key=match["key"], v=match["value"]: labels.get(key) != v)
        else:
            checks.append(lambda labels, key=match["key"]: key in labels)
    return lambda labels: all(check(labels) for check in checks)


def _split_requirements(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        depth += (char == "(") - (char == ")")
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p for p in parts if p.strip()]


# ---------------------------------------------------------------- patches


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge recursively, null removes a key, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def json_patch(target: JSON, operations: Any) -> JSON:
    """RFC 6902 JSON patch (add, remove, replace, test); a body that is not a list is a 400, as on a real server."""
    if not isinstance(operations, list):
        kind = "object" if isinstance(operations, dict) else type(operations).__name__
        raise ApiError(400, "BadRequest", f"json: cannot unmarshal {kind} into Go value of type jsonpatch.Patch")
    doc = copy.deepcopy(target)
    for op in operations:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise ApiError(400, "BadRequest", f"invalid JSON patch operation: {op!r}")
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        kind = op["op"]
        if kind == "test":
            current = node[int(last)] if isinstance(node, list) else node.get(last)
            if current != op.get("value"):
                raise ApiError(422, "Invalid", f"testing value {op['path']} failed")
        elif kind == "remove":
            if isinstance(node, list):
                del node[int(last)]
            elif node.pop(last, None) is None:
                raise ApiError(422, "Invalid", f"unable to remove nonexistent key: {last}")
        elif kind in ("add", "replace"):
            if isinstance(node, list):
                index = len(node) if last == "-" else int(last)
                if kind == "add":
                    node.insert(index, op.get("value"))
                else:
                    node[index] = op.get("value")
            else:
                node[last] = copy.deepcopy(op.get("value"))
        else:
            raise ApiError(422, "Invalid", f"unsupported JSON patch operation: {kind}")
    return doc


# ---------------------------------------------------------------- the store


@dataclass
class Change:
    """One entry of the event history that watches replay: the object after the change and before it."""

    rv: int
    resource: Resource
    type: str
    obj: JSON
    previous: JSON | None


Key = tuple[Resource, str, str]
SERVER_SET_METADATA = ("name", "namespace", "uid", "creationTimestamp", "generation", "resourceVersion",
                       "deletionTimestamp", "deletionGracePeriodSeconds")  # fmt: skip
INITIAL_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")


@dataclass
class Store:
    """Objects keyed by (resource, namespace, name), one global resourceVersion counter and a bounded history."""

    history_limit: int = 10_000
    objects: dict[Key, JSON] = field(default_factory=dict)
    history: list[Change] = field(default_factory=list)
    rv: int = 1000
    oldest_rv: int = 1000  # a watch from a resourceVersion below this answers 410 Gone
    listeners: list[Callable[[Change], None]] = field(default_factory=list)
    lock: threading.RLock = field(default_factory=threading.RLock)
    namespaces: set[str] = field(default_factory=lambda: set(INITIAL_NAMESPACES))
    admission: bool = True  # validate, default and prune writes as a real server (tests/kubeapi_rules.py)

    def _commit(self, resource: Resource, kind: str, obj: JSON, previous: JSON | None) -> Change:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        change = Change(self.rv, resource, kind, copy.deepcopy(obj), previous)
        self.history.append(change)
        if len(self.history) > self.history_limit:
            dropped = self.history[: len(self.history) - self.history_limit]
            del self.history[: len(dropped)]
            self.oldest_rv = dropped[-1].rv
        for listener in list(self.listeners):
            listener(change)
        return change

    def compact(self) -> None:
        """Forget the history: a watch from any resourceVersion older than the current one answers 410 Gone."""
        with self.lock:
            self.history.clear()
            self.oldest_rv = self.rv

    def get(self, resource: Resource, namespace: str, name: str) -> JSON:
        with self.lock:
            obj = self.objects.get((resource, namespace, name))
            if obj is None:
                raise not_found(resource, name)
            return copy.deepcopy(obj)

    def list(self, resource: Resource, namespace: str | None, selector: Filter | None) -> tuple[list[JSON], int]:
        with self.lock:
            items = [
                copy.deepcopy(obj)
                for (res, ns, _), obj in self.objects.items()
                if res == resource and namespace in (None, ns) and (selector is None or selector(obj))
            ]
            return items, self.rv

    def create(self, resource: Resource, namespace: str, body: JSON, warnings: list[str] | None = None) -> JSON:
        meta = body.get("metadata") or {}
        if resource.namespaced and self.admission and namespace not in self.namespaces:
            raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found')
        name = meta.get("name") or (meta.get("generateName") and meta["generateName"] + uuid.uuid4().hex[:5])
        if not name:
            raise ApiError(422, "Invalid", f"{resource.kind} is invalid: metadata.name: Required value: name or "
                                           "generateName is required")  # fmt: skip
        obj = copy.deepcopy(body)
        obj["apiVersion"], obj["kind"] = resource.api_version, resource.kind
        obj["metadata"] = {**meta, "name": name, "uid": str(uuid.uuid4()), "generation": 1,
                           "creationTimestamp": now()}  # fmt: skip
        obj["metadata"].pop("generateName", None)
        obj["metadata"].pop("resourceVersion", None)
        for server_set in ("deletionTimestamp", "deletionGracePeriodSeconds"):
            obj["metadata"].pop(server_set, None)
        if resource.namespaced:
            obj["metadata"]["namespace"] = namespace
        with self.lock:
            key = (resource, namespace if resource.namespaced else "", name)
            if key in self.objects:
                raise ApiError(409, "AlreadyExists", f'{resource.plural} "{name}" already exists')
            self._admit(resource, obj, None, warnings)
            self.objects[key] = obj
            self._commit(resource, "ADDED", obj, None)
            return copy.deepcopy(obj)

    def _admit(self, resource: Resource, obj: JSON, previous: JSON | None, warnings: list[str] | None) -> None:
        if self.admission:
            from kubeapi_rules import admit  # the rules import this module's ApiError

            found = admit(resource, obj, previous)
            if warnings is not None:
                warnings.extend(found)

    def update(
        self,
        resource: Resource,
        namespace: str,
        name: str,
        change: Callable[[JSON], JSON],
        *,
        status: bool = False,
        warnings: list[str] | None = None,
    ) -> JSON:
        """Apply `change` to a copy; on the status subresource only status changes, elsewhere status is kept."""
        with self.lock:
            key = (resource, namespace if resource.namespaced else "", name)
            current = self.objects.get(key)
            if current is None:
                raise not_found(resource, name)
            wanted = change(copy.deepcopy(current))
            sent_rv = (wanted.get("metadata") or {}).get("resourceVersion")
            if sent_rv and sent_rv != current["metadata"]["resourceVersion"]:
                raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {resource.plural} "{name}": the '
                                                "object has been modified; please apply your changes to the latest "
                                                "version and try again")  # fmt: skip
            new = copy.deepcopy(current)
            if status:
                if "status" in wanted:
                    new["status"] = wanted["status"]
                else:
                    new.pop("status", None)
            else:
                fixed = {k: v for k, v in current["metadata"].items() if k in SERVER_SET_METADATA}
                asked = {k: v for k, v in (wanted.get("metadata") or {}).items() if k not in SERVER_SET_METADATA}
                new = {k: v for k, v in wanted.items() if k != "status" or not resource.status_subresource}
                new["metadata"] = {**asked, **fixed}
                new["apiVersion"], new["kind"] = resource.api_version, resource.kind
                if resource.status_subresource and "status" in current:
                    new["status"] = current["status"]
                if _spec_part(new) != _spec_part(current):
                    new["metadata"]["generation"] = current["metadata"]["generation"] + 1
            self._admit(resource, new, current, warnings)
            if new == current:
                return copy.deepcopy(current)  # a no-op write does not bump the resourceVersion
            if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
                del self.objects[key]  # the last finalizer is gone: the held delete completes
                change = self._commit(resource, "DELETED", new, current)
                return copy.deepcopy(change.obj)
            self.objects[key] = new
            self._commit(resource, "MODIFIED", new, current)
            return copy.deepcopy(new)

    def delete(self, resource: Resource, namespace: str, name: str, preconditions: JSON | None = None) -> JSON:
        """Delete, or only mark (``deletionTimestamp``) an object whose finalizers hold it; a uid or
        resourceVersion precondition that does not match is a 409, as on a real server."""
        with self.lock:
            key = (resource, namespace if resource.namespaced else "", name)
            obj = self.objects.get(key)
            if obj is None:
                raise not_found(resource, name)
            meta = obj["metadata"]
            for field_name, label in (("uid", "UID"), ("resourceVersion", "ResourceVersion")):
                wanted = (preconditions or {}).get(field_name)
                if wanted is not None and wanted != meta.get(field_name):
                    raise ApiError(409, "Conflict", f"Operation cannot be fulfilled on {resource.plural} \"{name}\": "
                                                    f"Precondition failed: the {label} in the precondition ({wanted}) "
                                                    f"does not match the {label} in record ({meta.get(field_name)}). "
                                                    "The object might have been deleted and recreated")  # fmt: skip
            if meta.get("finalizers"):
                if meta.get("deletionTimestamp"):
                    return copy.deepcopy(obj)
                marked = copy.deepcopy(obj)
                marked["metadata"].update(deletionTimestamp=now(), deletionGracePeriodSeconds=0)
                self.objects[key] = marked
                self._commit(resource, "MODIFIED", marked, obj)
                return copy.deepcopy(marked)
            del self.objects[key]
            change = self._commit(resource, "DELETED", obj, obj)
            return copy.deepcopy(change.obj)

    def since(self, rv: int) -> Iterable[Change]:
        """The changes after `rv`; 410 Gone when `rv` is older than the retained history."""
        with self.lock:
            if rv < self.oldest_rv:
                raise ApiError(410, "Expired", f"too old resource version: {rv} ({self.oldest_rv})")
            return [c for c in self.history if c.rv > rv]


def _spec_part(obj: JSON) -> JSON:
    """What generation tracks: everything but metadata and status."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}


def not_found(resource: Resource, name: str) -> ApiError:
    qualified = f"{resource.plural}.{resource.group}" if resource.group else resource.plural
    return ApiError(404, "NotFound", f'{qualified} "{name}" not found')


def labels_of(obj: JSON) -> dict[str, str]:
    labels: dict[str, str] = (obj.get("metadata") or {}).get("labels") or {}
    return labels


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
