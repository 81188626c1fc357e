"""Where the cluster reaches a unit: its Service (registered here), and the text the cluster reads about it.

The address put in EndpointSlices is ``--advertise-address``, else this host's address on its route to the API
server. That route is loopback when the API server is reached through a tunnel or a local container (kind, k3d,
minikube with Docker, Docker Desktop, ``kubectl port-forward``, an SSH tunnel): the cluster cannot reach such an
address and the API server refuses it in an EndpointSlice (422 ``may not be in the loopback range``). Then no
endpoint is registered at all: each served unit gets an ``EndpointRegistered=False`` condition (reason
``NoRoutableAddress``) and one Warning Event saying what to set, and keeps being served on this host.

An on-demand unit (``onDemand: true``) is different: its EndpointSlice points at the agent's cluster-facing
``/v1`` listener (``--proxy-port``), whether its server runs or not, and is ready while the unit can be asked
for. A request through its Service then reaches the agent, which starts the unit (routing by the Service name
in ``Host``, agent/service/proxy.py), and every request counts for its idle timer: a client sent straight to
the server would be invisible to it, and cut off when the unit idles out.

Conditions and Events name the cluster-facing URL (the Service's), never the server's own loopback URL, which
stays in the agent's local /status.
"""

from __future__ import annotations

from typing import Any

import anyio
import structlog

from agent.kube.endpoints import CONFLICT, OK, REFUSED, Endpoints, Target, detect_host_ip, routable
from agent.kube.events import Event, EventRecorder
from agent.kube.reconcile import Outcome
from agent.kube.status import ON_DEMAND_SERVING

log = structlog.get_logger("metal_agent.kube.report")
NO_ROUTE = (
    "this host's address on its route to the API server is {address}, which the cluster cannot reach (the API "
    "server refuses it in an EndpointSlice): no Service endpoint is registered. Set --advertise-address to this "
    "host's address on the cluster's network, or --no-endpoints"
)
Condition = tuple[str, str, str]  # status, reason, message of EndpointRegistered


class Registration:
    def __init__(
        self,
        endpoints: Endpoints,
        events: EventRecorder,
        host: str,
        host_ip: str | None,
        enabled: bool,
        send: bool,
        proxy_port: int | None = None,
    ) -> None:
        self.endpoints, self.events, self.host, self.host_ip = endpoints, events, host, host_ip
        self.enabled, self.send_events, self.proxy_port = enabled, send, proxy_port
        self.no_route = False  # no address the cluster can reach: nothing is registered
        self.swept: set[str] = set()  # units whose leftover endpoints (from a killed agent) were removed
        self.warned: set[str] = set()  # units told (by an Event) that they get no endpoint

    async def resolve_address(self, api_url: str) -> None:
        """The address to advertise (the route to the API server unless given) and whether the cluster can use it."""
        if self.host_ip is None:
            self.host_ip = await anyio.to_thread.run_sync(detect_host_ip, api_url)
            log.info("advertising this host's address", address=self.host_ip, host=self.host)
        if self.enabled and not routable(self.host_ip):
            self.no_route = True
            log.warning(NO_ROUTE.format(address=self.host_ip))

    @property
    def mode(self) -> str:
        return "disabled" if not self.enabled else "no routable address" if self.no_route else "registered"

    def forget(self, key: str) -> None:
        self.swept.discard(key)
        self.warned.discard(key)

    def through_proxy(self, status: dict[str, Any]) -> bool:
        """Whether the cluster reaches this unit through the agent's /v1 listener (an on-demand unit)."""
        return bool(self.proxy_port and status.get("on_demand"))

    def endpoint_port(self, status: dict[str, Any]) -> int | None:
        """The port the unit's EndpointSlice lists: the proxy's for an on-demand unit, else its server's (None
        while no server runs)."""
        if self.through_proxy(status):
            return self.proxy_port
        port = status.get("port")
        return int(port) if port else None

    def host_url(self, port: int) -> str | None:
        """The server's URL at the advertised address; None when the cluster cannot reach that address."""
        ip = self.host_ip
        if ip is None or not routable(ip):
            return None
        return f"http://[{ip}]:{port}" if ":" in ip else f"http://{ip}:{port}"

    def cluster_url(self, key: str, port: int) -> str:
        """The URL the cluster reaches the unit at (the Service's), or where it runs when there is none."""
        namespace, name = key.split("/", 1)
        if self.enabled and not self.no_route:
            return self.endpoints.url(namespace, name)
        return self.host_url(port) or f"port {port} on {self.host} (no address the cluster can reach)"

    def cluster_text(self, key: str, status: dict[str, Any]) -> str:
        """The status message with the server's local URL replaced by the one the cluster uses."""
        message, port = str(status.get("message") or ""), status.get("port")
        if not port:
            return message
        outside = self.cluster_url(key, int(port))
        for local in (status.get("endpoint"), f"http://127.0.0.1:{port}", f"http://localhost:{port}"):
            if local and local in message:
                message = message.replace(local, outside)
        return message

    async def sync(
        self, key: str, status: dict[str, Any], owner_uid: str | None
    ) -> tuple[str | None, Outcome, Condition | None]:
        """Register (or unregister) the unit's endpoint: the URL to report, how it went, and the
        ``EndpointRegistered`` condition (None while no server runs, or with --no-endpoints)."""
        namespace, name = key.split("/", 1)
        phase, port, proxied = status.get("phase"), self.endpoint_port(status), self.through_proxy(status)
        if not self.enabled:
            return (self.host_url(port) if port else None), Outcome.DONE, None
        if phase == "Stopped":
            await self.endpoints.remove(namespace, name)
            return None, Outcome.DONE, None
        if self.no_route or (not port and (namespace, name) not in self.endpoints.applied):
            if key not in self.swept:  # a previous agent, killed, may have left this unit's endpoint marked ready
                self.swept.add(key)
                await self.endpoints.remove(namespace, name)
            if not port:
                return None, Outcome.DONE, None
            message = NO_ROUTE.format(address=self.host_ip)
            if key not in self.warned and self.send_events:
                self.warned.add(key)
                self.events.emit(Event(namespace, name, "Warning", "NoRoutableAddress", "Register", message))
            return None, Outcome.DONE, ("False", "NoRoutableAddress", message)
        # No server now (a restart, a budget too small): the Service and its ClusterIP stay, the address goes.
        ready = phase in ON_DEMAND_SERVING if proxied else phase == "Ready" and bool(port)
        ip = self.host_ip or "127.0.0.1"
        target = Target(namespace, name, ip, port, ready, owner_uid)
        conflicted = (namespace, name) in self.endpoints.conflicts
        result = await self.endpoints.ensure(target)
        url = self.endpoints.url(namespace, name)
        if result == OK:
            if proxied:
                where = f"{url} points at the agent's /v1 endpoint, {ip}:{port}: a request starts the unit"
                return url, Outcome.DONE, ("True", "Registered", where)
            return url, Outcome.DONE, (("True", "Registered", f"{url} points at {ip}:{port}") if port else None)
        if result == CONFLICT:
            note = f"a Service or EndpointSlice named for {name} exists and is not metal-agent's on {self.host}"
            if not conflicted and self.send_events:
                self.events.emit(Event(namespace, name, "Warning", "EndpointConflict", "Register", note))
            return None, Outcome.REFUSED, ("False", "EndpointConflict", note)
        if result == REFUSED:
            why = self.endpoints.refused[(namespace, name)][1]
            return None, Outcome.REFUSED, ("False", "RegistrationRefused", f"the API server refused {url}: {why}")
        return None, Outcome.RETRY, ("Unknown", "Registering", f"registering {url}: the API server did not answer")
