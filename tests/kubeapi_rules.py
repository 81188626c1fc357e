"""The fake Kubernetes API's admission: what a real kube-apiserver (v1.36) refuses, defaults or prunes on a write.

A fake that accepts what the real server refuses lets bugs through (a loopback EndpointSlice address was retried
forever against a real server while every test passed). The rules here follow
/work/shared/reference/kube-apiserver-answers.md, measured against kube-apiserver v1.36.2:

- custom resources: the CRD's own ``default:`` values are applied, fields the schema does not declare are pruned
  (a ``Warning: 299`` header says so), then the object is validated against the openAPIV3Schema and its CEL
  rules (tests/crdschema.py) → 422 Invalid;
- Services get the server's defaults (clusterIP, targetPort, ipFamilies, sessionAffinity, internalTrafficPolicy);
- EndpointSlice addresses must be routable (no loopback, unspecified or link-local address) → 422;
- events.k8s.io/v1 Events: required fields (422), ``eventTime`` with microseconds (400), a note of at most 1024
  characters, ``series.count`` of at least 2, and only ``series`` may change afterwards (422 immutable);
- ``Accept: ...;as=Table`` answers a ``Table`` built from the CRD's printer columns (what kubectl shows).
"""

from __future__ import annotations

import copy
import datetime
import ipaddress
import itertools
import re
from typing import Any

import crdschema
from kubeapi_store import JSON, ApiError, Resource

MICRO_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(Z|[+-]\d\d:\d\d)")
MAX_NOTE = 1024
EVENT_IMMUTABLE = ("regarding", "related", "reason", "note", "action", "type", "eventTime", "reportingController",
                   "reportingInstance")  # fmt: skip
EVENT_FIELD_NAMES = {"note": "message"}  # the server reports the internal (core) field name


def invalid(resource: Resource, name: str, causes: list[str]) -> ApiError:
    qualified = f"{resource.kind}.{resource.group}" if resource.group else resource.kind
    return ApiError(422, "Invalid", f'{qualified} "{name}" is invalid: [{", ".join(causes)}]' if len(causes) > 1
                    else f'{qualified} "{name}" is invalid: {causes[0]}')  # fmt: skip


def admit(resource: Resource, obj: JSON, previous: JSON | None) -> list[str]:
    """Default, prune and validate ``obj`` in place as the real server would; the warnings to send back.

    Raises ApiError (422, or 400 for an unparsable time) for what the real server refuses."""
    name = obj["metadata"].get("name", "")
    if resource.custom:
        return _custom(resource, obj, name)
    if resource.kind == "Service":
        _service_defaults(obj, previous)
    elif resource.kind == "EndpointSlice":
        _endpoint_slice(resource, obj, name)
    elif resource.api_version == "events.k8s.io/v1":
        _event(resource, obj, previous, name)
    return []


# ---------------------------------------------------------------- custom resources


def _custom(resource: Resource, obj: JSON, name: str) -> list[str]:
    schema = crdschema.schema_of(resource.kind)
    _defaults(obj, schema)
    warnings: list[str] = []
    _prune(obj, schema, "", warnings)
    causes = crdschema.errors(obj)
    if causes:
        raise invalid(resource, name, causes)
    return [f'unknown field "{path}"' for path in warnings]


def _defaults(value: Any, schema: JSON) -> None:
    """The CRD's ``default:`` values for absent fields, recursively (as the server applies them on every write)."""
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                _defaults(value[key], sub)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            _defaults(item, schema["items"])


def _prune(value: Any, schema: JSON, path: str, pruned: list[str]) -> None:
    """Drop fields the structural schema does not declare (metadata is the server's, left alone)."""
    if isinstance(value, dict):
        properties = schema.get("properties")
        keep_unknown = schema.get("x-kubernetes-preserve-unknown-fields") or "additionalProperties" in schema
        for key in list(value):
            where = f"{path}.{key}" if path else key
            if path == "" and key == "metadata":
                continue
            if properties is not None and key in properties:
                _prune(value[key], properties[key], where, pruned)
            elif isinstance(schema.get("additionalProperties"), dict):
                _prune(value[key], schema["additionalProperties"], where, pruned)
            elif not keep_unknown:
                del value[key]
                pruned.append(where)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            _prune(item, schema["items"], f"{path}[{index}]", pruned)


# ---------------------------------------------------------------- core and discovery

_cluster_ips = itertools.count(10)


def _allocate_cluster_ip() -> str:
    number = next(_cluster_ips)
    return f"10.96.{number // 250 % 250}.{number % 250 + 1}"


def _service_defaults(obj: JSON, previous: JSON | None) -> None:
    spec = obj.setdefault("spec", {})
    before = (previous or {}).get("spec") or {}
    spec.setdefault("type", "ClusterIP")
    if spec["type"] != "ExternalName":
        spec.setdefault("clusterIP", before.get("clusterIP") or _allocate_cluster_ip())
        spec.setdefault("clusterIPs", [spec["clusterIP"]])
        spec.setdefault("ipFamilies", ["IPv4"])
        spec.setdefault("ipFamilyPolicy", "SingleStack")
        spec.setdefault("internalTrafficPolicy", "Cluster")
    spec.setdefault("sessionAffinity", "None")
    for port in spec.get("ports") or []:
        port.setdefault("protocol", "TCP")
        port.setdefault("targetPort", port.get("port"))


def _endpoint_slice(resource: Resource, obj: JSON, name: str) -> None:
    causes = []
    family = obj.get("addressType")
    if family not in ("IPv4", "IPv6", "FQDN"):
        causes.append(f'addressType: Unsupported value: "{family}": supported values: "FQDN", "IPv4", "IPv6"')
    for i, endpoint in enumerate(obj.get("endpoints") or []):
        addresses = endpoint.get("addresses") or []
        if not addresses:
            causes.append(f"endpoints[{i}].addresses: Required value: must contain at least 1 address")
        for j, address in enumerate(addresses):
            where = f'endpoints[{i}].addresses[{j}]: Invalid value: "{address}"'
            if family == "FQDN":
                continue
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                causes.append(f"{where}: must be a valid {family} address")
                continue
            if (ip.version == 4) != (family == "IPv4"):
                causes.append(f"{where}: must be a valid {family} address")
            elif ip.is_unspecified:
                causes.append(f"{where}: may not be unspecified (0.0.0.0, ::)")
            elif ip.is_loopback:
                causes.append(f"{where}: may not be in the loopback range (127.0.0.0/8, ::1/128)")
            elif ip.is_link_local:
                causes.append(f"{where}: may not be in the link-local range (169.254.0.0/16, fe80::/10)")
            elif ip.is_multicast:
                causes.append(f"{where}: may not be in the link-local multicast range (224.0.0.0/24, ff02::/10)")
    if causes:
        raise invalid(resource, name, causes)


def _event(resource: Resource, obj: JSON, previous: JSON | None, name: str) -> None:
    causes = []
    if previous is not None:
        for field in EVENT_IMMUTABLE:
            if obj.get(field) != previous.get(field):
                shown = obj.get(field) if isinstance(obj.get(field), str) else ""
                causes.append(f'{EVENT_FIELD_NAMES.get(field, field)}: Invalid value: "{shown}": field is immutable')
    for field in ("reportingController", "reportingInstance", "action", "reason", "eventTime"):
        if not obj.get(field):
            causes.append(f"{field}: Required value")
    stamp = obj.get("eventTime")
    if stamp and (not isinstance(stamp, str) or not MICRO_TIME.fullmatch(stamp)):
        raise ApiError(400, "BadRequest", f'parsing time "{stamp}" as "2006-01-02T15:04:05.000000Z07:00": '
                                          'cannot parse "Z" as ".000000"')  # fmt: skip
    if obj.get("type") not in ("Normal", "Warning"):
        causes.append(f'type: Unsupported value: "{obj.get("type")}": supported values: "Normal", "Warning"')
    if len(str(obj.get("note") or "")) > MAX_NOTE:
        causes.append(f'message: Invalid value: "": can have at most {MAX_NOTE} characters')
    series = obj.get("series")
    if series is not None:
        if not isinstance(series.get("count"), int) or series["count"] < 2:
            causes.append('series.count: Invalid value: "": should be at least 2')
        last = series.get("lastObservedTime")
        if not last:
            causes.append("series.lastObservedTime: Required value")
        elif not MICRO_TIME.fullmatch(str(last)):
            raise ApiError(400, "BadRequest", f'parsing time "{last}" as "2006-01-02T15:04:05.000000Z07:00": '
                                              'cannot parse "Z" as ".000000"')  # fmt: skip
    if causes:
        raise invalid(resource, name, causes)


# ---------------------------------------------------------------- Table output (kubectl get)


def wants_table(accept: str | None) -> bool:
    """`Accept: application/json;as=Table;v=v1;g=meta.k8s.io`, as kubectl sends it."""
    return bool(accept) and "as=Table" in str(accept)


def table(resource: Resource, items: list[JSON], resource_version: str | None = None) -> JSON:
    """A meta.k8s.io/v1 Table: Name, then the CRD's printer columns (Age only for built-in kinds)."""
    columns: list[JSON] = [{"name": "Name", "type": "string", "format": "name", "priority": 0,
                            "description": "Name must be unique within a namespace."}]  # fmt: skip
    printer = [{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]
    if resource.custom:
        printer = crdschema.crds()[resource.kind]["spec"]["versions"][0].get("additionalPrinterColumns", [])
    for column in printer:
        defaults = {"format": "", "description": "", "priority": 0}
        columns.append({**defaults, **{k: v for k, v in column.items() if k != "jsonPath"}})
    rows = []
    for obj in items:
        cells: list[Any] = [obj["metadata"]["name"]]
        for column in printer:
            value = _json_path(obj, column["jsonPath"])
            cells.append(_age(value) if column["type"] == "date" else value)
        meta = {k: obj["metadata"][k] for k in ("name", "namespace", "uid", "resourceVersion") if k in obj["metadata"]}
        rows.append({"cells": cells, "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                                                "metadata": meta}})  # fmt: skip
    meta_out = {"resourceVersion": resource_version} if resource_version else {}
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": meta_out, "columnDefinitions": columns,
            "rows": rows}  # fmt: skip


def _json_path(obj: JSON, path: str) -> Any:
    value: Any = obj
    for part in path.strip(".").split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _age(stamp: Any) -> str:
    """A timestamp as kubectl's age (`42s`, `5m`, `3h`, `2d`); `<unknown>` without one."""
    try:
        then = datetime.datetime.strptime(str(stamp), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    except ValueError:
        return "<unknown>"
    seconds = int((datetime.datetime.now(datetime.UTC) - then).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"
