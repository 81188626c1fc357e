"""Endpoint registration: a selector-less Service and an EndpointSlice that point the cluster at a local server.

The agent's servers run on a Mac (or GPU box) outside the cluster's pod network, so there is no pod for a
Service to select. A Service without a selector plus an EndpointSlice the agent writes itself (the host IP and
the server's port, ``ready`` only while the unit is Ready; no address while no server runs) makes
``http://NAME.NAMESPACE.svc`` reach it.

RBAC cannot restrict by label, so the agent grants itself the restriction: it patches or deletes an object only
after reading it and finding ``app.kubernetes.io/managed-by=metal-agent`` *and* its own host label (a create
never overwrites: a taken name answers 409). A Service of the same name that someone else owns is a conflict
that is reported, never overwritten.
Both objects also carry an ownerReference to the InferenceService, so Kubernetes' garbage collector removes them
when it is deleted while the agent is down.

Nothing is written twice: an object already as wanted (this agent's Service after a restart, with the server's
defaults added) is left alone, and a request the API server refused for good (``REFUSED``) is not sent again
until the target changes. An address the cluster cannot use (loopback, link-local: ``routable``) is never sent;
the API server refuses it in an EndpointSlice.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import structlog
from kubernetes_asyncio.client import CoreV1Api, DiscoveryV1Api

from agent.kube.calls import DEFAULT_RETRY, MERGE_PATCH, Conflict, NotFound, Refused, Retry, call
from agent.util.kube_names import label_value, service_name

log = structlog.get_logger("metal_agent.kube.endpoints")
JSON = dict[str, Any]

MANAGED_BY = "app.kubernetes.io/managed-by"
AGENT_NAME = "metal-agent"
HOST_LABEL = "metal-agent.llmkube.dev/host"
SERVICE_LABEL = "metal-agent.llmkube.dev/inferenceservice"
SLICE_SERVICE = "kubernetes.io/service-name"
SLICE_MANAGED_BY = "endpointslice.kubernetes.io/managed-by"
SLICE_CONTROLLER = "metal-agent.llmkube.dev"
PORT_NAME = "http"
OK, FAILED, CONFLICT, REFUSED = "ok", "failed", "conflict", "refused"


def owned_by(labels: dict[str, str] | None, host: str) -> bool:
    """True only for objects this agent (this host) created."""
    labels = labels or {}
    return labels.get(MANAGED_BY) == AGENT_NAME and labels.get(HOST_LABEL) == host


def routable(address: str) -> bool:
    """Whether the cluster can reach ``address``: an API server refuses loopback, unspecified, link-local and
    multicast addresses in an EndpointSlice (``may not be in the loopback range``)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return not (ip.is_loopback or ip.is_unspecified or ip.is_link_local or ip.is_multicast)


def contains(current: Any, wanted: Any) -> bool:
    """Whether ``current`` (as the server has it, with its defaults) already holds everything ``wanted`` sets."""
    if isinstance(wanted, dict):
        return isinstance(current, dict) and all(contains(current.get(k), v) for k, v in wanted.items())
    if isinstance(wanted, list):
        return isinstance(current, list) and len(current) == len(wanted) and all(map(contains, current, wanted))
    return bool(current == wanted)


def detect_host_ip(api_url: str) -> str:
    """The local address this host uses to reach the API server (a UDP connect sends no packet)."""
    parsed = urlparse(api_url)
    target, port = parsed.hostname or "127.0.0.1", parsed.port or 443
    try:
        family = socket.AF_INET6 if ":" in target else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((target, port))
            address: str = probe.getsockname()[0]
            return address
    except OSError:
        try:
            return socket.gethostbyname(socket.gethostname())
        except OSError:
            return "127.0.0.1"


@dataclass(frozen=True)
class Target:
    """Where one InferenceService is served."""

    namespace: str
    name: str  # the InferenceService's
    ip: str
    port: int | None  # None: no server runs now (the Service stays, the slice lists no address)
    ready: bool
    owner_uid: str | None = None

    @property
    def service(self) -> str:
        return service_name(self.name)


class Endpoints:
    """Creates, updates and removes the Service and EndpointSlice of each served unit; writes only on change."""

    def __init__(
        self,
        api_client: Any,
        host: str,
        service_port: int = 8080,
        retry: Retry = DEFAULT_RETRY,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        # Any: the bundled stubs omit the generated methods' keyword arguments (_content_type) and dict bodies.
        self.core: Any = CoreV1Api(api_client)
        self.discovery: Any = DiscoveryV1Api(api_client)
        self.api_client = api_client
        self.host, self.service_port, self.retry = label_value(host), service_port, retry
        self.on_refused = on_refused or (lambda reason: None)
        self.applied: dict[tuple[str, str], Target] = {}
        self.services: dict[tuple[str, str], JSON] = {}  # the Service body known to be on the server
        self.conflicts: dict[tuple[str, str], Target] = {}  # names taken by others, for the target tried
        self.refused: dict[tuple[str, str], tuple[Target, str]] = {}  # the target refused for good, and why

    def labels(self, target_name: str) -> dict[str, str]:
        return {MANAGED_BY: AGENT_NAME, HOST_LABEL: self.host, SERVICE_LABEL: label_value(target_name)}

    def slice_name(self, service: str) -> str:
        return f"{service}-{AGENT_NAME}"

    def url(self, namespace: str, name: str) -> str:
        return f"http://{service_name(name)}.{namespace}.svc:{self.service_port}"

    def _meta(self, name: str, target: Target, extra: dict[str, str] | None = None) -> JSON:
        meta: JSON = {
            "name": name,
            "namespace": target.namespace,
            "labels": {**self.labels(target.name), **(extra or {})},
        }
        if target.owner_uid:
            meta["ownerReferences"] = [
                {
                    "apiVersion": "inference.llmkube.dev/v1alpha1",
                    "kind": "InferenceService",
                    "name": target.name,
                    "uid": target.owner_uid,
                    "controller": True,
                }
            ]
        return meta

    def service_body(self, target: Target) -> JSON:
        port = {"name": PORT_NAME, "port": self.service_port, "protocol": "TCP", "appProtocol": "http"}
        return {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": self._meta(target.service, target),
            "spec": {"type": "ClusterIP", "ports": [port]},  # no selector: the EndpointSlice is ours
        }

    def slice_body(self, target: Target) -> JSON:
        extra = {SLICE_SERVICE: target.service, SLICE_MANAGED_BY: SLICE_CONTROLLER}
        endpoints, ports = [], []
        if target.port is not None:
            conditions = {"ready": target.ready, "serving": target.ready, "terminating": False}
            endpoints.append({"addresses": [target.ip], "conditions": conditions})
            ports.append({"name": PORT_NAME, "port": target.port, "protocol": "TCP", "appProtocol": "http"})
        return {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": self._meta(self.slice_name(target.service), target, extra),
            "addressType": "IPv6" if ":" in target.ip else "IPv4",
            "endpoints": endpoints,
            "ports": ports,
        }

    async def ensure(self, target: Target) -> str:
        """Make the Service and EndpointSlice match ``target``: OK, FAILED (transient, logged: try again later),
        CONFLICT (a name taken by an object that is not this agent's: left alone, in ``conflicts``) or REFUSED
        (the API server refused it for good, in ``refused``: not sent again for the same target)."""
        key = (target.namespace, target.name)
        if self.applied.get(key) == target:
            return OK
        refused = self.refused.get(key)
        if refused is not None and refused[0] == target:
            return REFUSED
        if self.conflicts.get(key) == target:
            return CONFLICT
        self.refused.pop(key, None)
        try:
            result = await self._ensure(key, target)
        except Refused as exc:
            self.applied.pop(key, None)
            self.refused[key] = (target, exc.message)
            self.on_refused(exc.reason)
            return REFUSED
        if result == OK:
            self.applied[key] = target
            self.conflicts.pop(key, None)
            return OK
        self.applied.pop(key, None)
        if result == CONFLICT:
            if key not in self.conflicts:
                self.on_refused("Conflict")
            self.conflicts[key] = target
        return result

    async def _ensure(self, key: tuple[str, str], target: Target) -> str:
        service, body = target.service, self.service_body(target)
        if self.services.get(key) != body:  # the Service does not depend on the port or readiness
            result = await self._upsert(
                "Service",
                target.namespace,
                service,
                body,
                known=key in self.services,
                read=self.core.read_namespaced_service,
                create=self.core.create_namespaced_service,
                patch=self.core.patch_namespaced_service,
            )
            if result != OK:
                self.services.pop(key, None)
                return result
            self.services[key] = body
        return await self._upsert(
            "EndpointSlice",
            target.namespace,
            self.slice_name(service),
            self.slice_body(target),
            known=key in self.applied,  # this agent wrote it before: patch it
            read=self.discovery.read_namespaced_endpoint_slice,
            create=self.discovery.create_namespaced_endpoint_slice,
            patch=self.discovery.patch_namespaced_endpoint_slice,
        )

    async def _upsert(
        self, kind: str, namespace: str, name: str, body: JSON, *, known: bool, read: Any, create: Any, patch: Any
    ) -> str:
        """Create, or patch what exists if it is this agent's and differs. A create can never overwrite: an object
        that was not ``known`` is created first (one request), and a taken name is then read and checked.
        Raises Refused."""
        what = f"{kind} {namespace}/{name}"
        if not known:
            try:
                created = await call(
                    f"create {what}", lambda: create(namespace, body), self.retry, conflict_is_answer=True
                )
                return OK if created is not None else FAILED
            except NotFound as exc:  # the namespace does not exist: creating again cannot help
                raise Refused(404, "NotFound", str(exc)) from None
            except Conflict:
                pass  # the name is taken: whose is it?
        try:
            current = await call(f"read {what}", lambda: read(name, namespace), self.retry)
        except NotFound:
            return FAILED  # deleted since: the next try creates it
        if current is None:
            return FAILED  # the read failed (logged): never write blind
        labels = current.metadata.labels if current.metadata else None
        if not owned_by(labels, self.host):
            log.warning(
                f"{kind} exists and is not this agent's: left alone",
                object=what,
                labels=labels or {},
                want={MANAGED_BY: AGENT_NAME, HOST_LABEL: self.host},
            )
            return CONFLICT
        if contains(self.api_client.sanitize_for_serialization(current), body):
            return OK  # already as wanted (this agent's, from before a restart): nothing to write
        try:
            patched = await call(
                f"patch {what}", lambda: patch(name, namespace, body, _content_type=MERGE_PATCH), self.retry
            )
        except NotFound:  # deleted between the read and the patch: the next try creates it
            return FAILED
        return OK if patched is not None else FAILED

    async def remove(self, namespace: str, name: str) -> None:
        """Delete the unit's EndpointSlice and Service, if (and only if) they are this agent's."""
        for table in (self.applied, self.services, self.refused):
            table.pop((namespace, name), None)
        service = service_name(name)
        await self._delete(
            "EndpointSlice",
            namespace,
            self.slice_name(service),
            read=self.discovery.read_namespaced_endpoint_slice,
            delete=self.discovery.delete_namespaced_endpoint_slice,
        )
        await self._delete(
            "Service",
            namespace,
            service,
            read=self.core.read_namespaced_service,
            delete=self.core.delete_namespaced_service,
        )

    async def _delete(self, kind: str, namespace: str, name: str, *, read: Any, delete: Any) -> None:
        what = f"{kind} {namespace}/{name}"
        try:
            current = await call(f"read {what}", lambda: read(name, namespace), self.retry)
            if current is None:
                return
            if not owned_by(current.metadata.labels, self.host):
                log.info(f"{kind} is not this agent's: not deleted", object=what)
                return
            # The uid precondition: never delete a same-named object that replaced ours since the read.
            options = {"preconditions": {"uid": current.metadata.uid}}
            await call(
                f"delete {what}", lambda: delete(name, namespace, body=options), self.retry, conflict_is_answer=True
            )
        except (NotFound, Conflict):  # gone already, or replaced by another object since the read
            return
        except Refused as exc:  # logged; the garbage collector removes it with its InferenceService
            self.on_refused(exc.reason)
