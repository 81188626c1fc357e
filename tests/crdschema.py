"""Validate objects against the checked-in CRDs the way the API server does, without an API server.

The CRD's openAPIV3Schema is Kubernetes' dialect of JSON Schema draft 4: the same keywords (boolean
``exclusiveMinimum``, ``anyOf``...) plus ``x-kubernetes-*`` extensions. ``jsonschema``'s Draft4Validator runs the
standard keywords once the extensions are translated (``nullable`` → a null type, Go's end-of-text ``$`` as
Python's ``\\Z``, the rest dropped); the ``x-kubernetes-validations`` rules are CEL, evaluated with ``cel-python``
at the node they are attached to.
A small hand-written validator would have to re-implement ``pattern``/``anyOf``/ranges and could agree with our
own mistakes; a maintained JSON Schema implementation is an independent check.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml

ROOT = Path(__file__).resolve().parent.parent
CRD_DIR = ROOT / "config" / "crd"


@cache
def crds() -> dict[str, dict[str, Any]]:
    """Each CRD by kind."""
    found = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        if doc.get("kind") == "CustomResourceDefinition":
            found[doc["spec"]["names"]["kind"]] = doc
    return found


def schema_of(kind: str) -> dict[str, Any]:
    version = crds()[kind]["spec"]["versions"][0]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def to_json_schema(node: Any) -> Any:
    """The draft-4 JSON Schema that the OpenAPI node means (extensions dropped, ``nullable`` as a null type)."""
    if isinstance(node, list):
        return [to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: to_json_schema(value) for key, value in node.items() if not key.startswith("x-kubernetes-")}
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    out.pop("nullable", None)
    if isinstance(out.get("pattern"), str) and out["pattern"].endswith("$"):
        out["pattern"] = out["pattern"][:-1] + r"\Z"  # Go's "$" is the end of text; Python's allows a final "\n"
    return out


@cache
def _validator(kind: str) -> jsonschema.Draft4Validator:
    schema = to_json_schema(copy.deepcopy(schema_of(kind)))
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def _cel_rules(node: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], dict[str, str]]]:
    if not isinstance(node, dict):
        return
    for rule in node.get("x-kubernetes-validations", []):
        yield path, rule
    for name, child in node.get("properties", {}).items():
        yield from _cel_rules(child, (*path, name))


def cel_rules(kind: str) -> list[tuple[tuple[str, ...], dict[str, str]]]:
    return list(_cel_rules(schema_of(kind)))


@cache
def _program(rule: str) -> Any:
    env = celpy.Environment()
    return env.program(env.compile(rule))


def errors(obj: dict[str, Any]) -> list[str]:
    """What the API server would reject in ``obj`` (schema keywords, then CEL rules); empty when it is valid."""
    kind = obj.get("kind", "")
    if kind not in crds():
        return [f"kind {kind!r} has no CRD"]
    found = [
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in _validator(kind).iter_errors(obj)
    ]
    if found:
        return found  # like the API server: CEL rules run only on values that passed the schema
    for path, rule in cel_rules(kind):
        value: Any = obj
        for name in path:
            value = value.get(name) if isinstance(value, dict) else None
        if value is None:
            continue
        if not _program(rule["rule"]).evaluate({"self": celpy.json_to_cel(value)}):
            found.append(f"{'.'.join(path)}: {rule['message']}")
    return found
