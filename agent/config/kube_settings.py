"""Kubernetes mode settings: which cluster, which namespace, and which objects this agent owns.

Every value is checked here, before the agent starts, with the flag and the value in the message: a typo in a
label selector or an allowlist entry must not turn into an agent that silently serves nothing.
"""

from __future__ import annotations

import platform
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from agent.sources.manifest import ACCELERATORS
from agent.util.quantity import InvalidValue

# DNS-1123 labels (namespaces) and subdomains (object names), as the API server checks them.
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_LABEL_KEY = r"(?:[a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
_LABEL_VALUE = r"(?:[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?"
_REQUIREMENT = re.compile(
    rf"\s*(?:!\s*{_LABEL_KEY}|{_LABEL_KEY}\s*(?:(?:==|!=|=)\s*{_LABEL_VALUE}"
    rf"|\s+(?:in|notin)\s*\(\s*{_LABEL_VALUE}(?:\s*,\s*{_LABEL_VALUE})*\s*\))?)\s*"
)


@dataclass(frozen=True)
class KubeSettings:
    kubeconfig: Path | None = None  # None: $KUBECONFIG or ~/.kube/config, else the in-cluster service account
    context: str | None = None  # None: the kubeconfig's current context
    namespace: str | None = None  # None: the context's namespace (in-cluster: the pod's), else "default"
    all_namespaces: bool = False
    label_selector: str | None = None  # InferenceServices to serve; sent to the server with their list and watch
    accelerators: tuple[str, ...] = ()  # empty: default_accelerators() of this machine
    only: frozenset[str] = frozenset()  # "namespace/name" of the InferenceServices to serve; empty: all owned
    watch_timeout: float = 300.0  # timeoutSeconds of each watch request; the watch then resumes where it was
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    request_timeout: float = 60.0  # lists and the connection phase of watches


def default_accelerators(system: str | None = None, has_nvidia_gpu: bool | None = None) -> tuple[str, ...]:
    """What this machine serves by default: metal and cpu on macOS, cuda where nvidia-smi sees a GPU, else cpu."""
    if (system or platform.system()) == "Darwin":
        return ("metal", "cpu")
    if has_nvidia_gpu is None:
        from agent.memory.gpus import NoGPU, list_gpus

        try:
            has_nvidia_gpu = bool(list_gpus())
        except NoGPU:
            has_nvidia_gpu = False
    return ("cuda",) if has_nvidia_gpu else ("cpu",)


def parse_accelerators(values: Iterable[str], flag: str = "--accelerators") -> tuple[str, ...]:
    found: list[str] = []
    for item in _items(values):
        if item not in ACCELERATORS:
            raise InvalidValue(f"{flag}: {item!r} is not one of {', '.join(ACCELERATORS)}")
        if item not in found:
            found.append(item)
    if not found:
        raise InvalidValue(f"{flag}: at least one accelerator is required")
    return tuple(found)


def parse_only(values: Iterable[str], flag: str = "--only") -> frozenset[str]:
    """`namespace/name` entries, repeatable or comma separated."""
    entries = set()
    for item in _items(values):
        namespace, slash, name = item.partition("/")
        if not slash or not _NAMESPACE.fullmatch(namespace) or not _NAME.fullmatch(name):
            raise InvalidValue(f"{flag}: {item!r} is not namespace/name (lower-case DNS names, e.g. default/qwen)")
        entries.add(item)
    return frozenset(entries)


def check_namespace(value: str, flag: str = "--namespace") -> str:
    if not _NAMESPACE.fullmatch(value):
        raise InvalidValue(f"{flag}: {value!r} is not a namespace name (lower-case letters, digits and '-')")
    return value


def check_label_selector(value: str, flag: str = "--label-selector") -> str:
    """The Kubernetes selector grammar: `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a)`, `k`, `!k`."""
    for part in _split_top_level(value):
        if not _REQUIREMENT.fullmatch(part):
            raise InvalidValue(f"{flag}: {part.strip()!r} in {value!r} is not a label selector requirement")
    return value


def _items(values: Iterable[str]) -> list[str]:
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside parentheses: `a in (x,y),b` is two requirements."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(text):
        depth += (char == "(") - (char == ")")
        if char == "," and depth == 0:
            parts.append(text[start:index])
            start = index + 1
    parts.append(text[start:])
    return parts
