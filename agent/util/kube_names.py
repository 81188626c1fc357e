"""Kubernetes names the agent derives: a unit's Service name and label values, and the reverse — which Service
an HTTP ``Host`` names.

The Service name is derived here, once, because two layers need it: the reporter writes the Service
(agent/kube/endpoints.py) and the cluster-facing ``/v1`` listener routes a request by the Service its ``Host``
names (agent/service/proxy.py).
"""

from __future__ import annotations

import hashlib
import re

_DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # a namespace, a DNS domain's part
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def label_value(text: str) -> str:
    """``text`` as a valid label value (63 characters, alphanumeric ends); long or odd ones end in a hash."""
    if _LABEL_VALUE.fullmatch(text):
        return text
    cleaned = re.sub(r"[^-A-Za-z0-9_.]", "-", text)[:52].strip("-_.")
    return f"{cleaned}-{_short_hash(text)}" if cleaned else _short_hash(text)


def service_name(name: str) -> str:
    """A Service name (DNS-1035 label) for an InferenceService name (a DNS subdomain: dots, up to 253)."""
    if _DNS_LABEL.fullmatch(name):
        return name
    cleaned = re.sub(r"[^a-z0-9-]", "-", name.lower()).strip("-")[:51].strip("-")
    if not cleaned or not cleaned[0].isalpha():
        cleaned = f"is-{cleaned}".rstrip("-")[:51]
    return f"{cleaned}-{_short_hash(name)}"


def service_in_host(host: str | None) -> tuple[str, str | None] | None:
    """The (Service, namespace or None) an HTTP ``Host`` names through cluster DNS, else None.

    Cluster clients reach a Service as ``NAME`` (from its own namespace), ``NAME.NAMESPACE``, or
    ``NAME.NAMESPACE.svc[.CLUSTER-DOMAIN]``, each with an optional port. An IP address (a client of the
    ClusterIP), ``localhost`` or any other name is not a Service."""
    if not host:
        return None
    name = host.strip().lower()
    if name.startswith("["):  # an IPv6 literal, with or without a port
        return None
    name = name.rsplit(":", 1)[0] if name.count(":") == 1 else name
    labels = name.rstrip(".").split(".")
    if not _DNS_LABEL.fullmatch(labels[0]) or not all(map(_DNS_1123_LABEL.fullmatch, labels[1:])):
        return None  # not a Service name (an IPv4 address starts with a digit)
    if len(labels) == 1:
        return (labels[0], None) if labels[0] != "localhost" else None
    if len(labels) == 2 or labels[2] == "svc":
        return labels[0], labels[1]
    return None
