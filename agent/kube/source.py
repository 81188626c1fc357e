"""The Kubernetes source: Models and InferenceServices from the API server, as the pipeline's Event stream.

It sends exactly what the standalone manifest source sends (``Event`` and, once both kinds have been listed
completely, ``SYNCED``), so ``Agent.run`` consumes either unchanged. Invalid objects are logged, kept visible
through ``on_errors`` (the status's ``manifest_errors``, keyed by API path) and skipped.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.abc import ObjectSendStream
from kubernetes_asyncio import client, config

from agent.config.kube_settings import KubeSettings, default_accelerators
from agent.kube.ownership import PLURALS, Ownership, Visibility
from agent.kube.watch_loop import Changed, KindCalls, Listed, WatchState, list_and_watch
from agent.sources.manifest import GROUP, VERSION
from agent.sources.standalone import SYNCED, Event, Synced

log = structlog.get_logger("metal_agent.kube")
IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class ConfigError(Exception):
    """The cluster cannot be configured (no kubeconfig, unknown context): the agent does not start."""


async def load_configuration(settings: KubeSettings) -> tuple[client.Configuration, str]:
    """The client configuration and the namespace to watch by default (the context's, the pod's or default)."""
    configuration = client.Configuration()
    # $KUBECONFIG may list several files (merged, as kubectl does); --kubeconfig names one.
    path = str(settings.kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config")
    files = [Path(p).expanduser() for p in path.split(os.pathsep) if p] if not settings.kubeconfig else [Path(path)]
    if settings.kubeconfig is not None or settings.context or any(f.exists() for f in files):
        where = f"--kubeconfig {path}" + (f" --context {settings.context}" if settings.context else "")
        if not any(f.is_file() for f in files):  # the client would only log it, then fail on an empty config
            raise ConfigError(f"{where}: no such file")
        try:
            loader = await config.load_kube_config(
                config_file=os.pathsep.join(str(f) for f in files), context=settings.context,
                client_configuration=configuration, persist_config=False,
            )  # fmt: skip
        except (config.ConfigException, OSError, KeyError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc}") from exc
        namespace = (loader.current_context or {}).get("context", {}).get("namespace") or "default"
        return configuration, namespace
    try:
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except config.ConfigException as exc:
        raise ConfigError(f"no kubeconfig at {path} and not running in a cluster ({exc})") from exc
    try:
        namespace = IN_CLUSTER_NAMESPACE.read_text().strip() or "default"
    except OSError:
        namespace = "default"
    return configuration, namespace


class KubeSource:
    def __init__(self, settings: KubeSettings, configuration: client.Configuration, default_namespace: str) -> None:
        self.settings, self.configuration = settings, configuration
        self.namespace = None if settings.all_namespaces else (settings.namespace or default_namespace)
        accelerators = settings.accelerators or default_accelerators()
        self.visibility = Visibility(Ownership(frozenset(accelerators), settings.only))
        self.states = {kind: WatchState(kind) for kind in PLURALS}
        self.synced = False

    def status(self) -> dict[str, Any]:
        """The watch state, for /status."""
        return {
            "mode": "kubernetes",
            "server": self.configuration.host,
            "namespace": self.namespace or "*",
            "label_selector": self.settings.label_selector,
            "accelerators": sorted(self.visibility.ownership.accelerators),
            "only": sorted(self.settings.only),
            "synced": self.synced,
            "objects": {"seen": len(self.visibility.raw), "served": len(self.visibility.visible)},
            "kinds": {PLURALS[kind]: state.as_dict() for kind, state in self.states.items()},
        }

    async def run(
        self,
        send: ObjectSendStream[Event | Synced],
        on_errors: Callable[[dict[str, str]], None] | None = None,
    ) -> None:
        """Feed `send` until cancelled; transient API trouble is retried inside, never raised."""
        status = self.status()
        log.info("watching the cluster", **{k: status[k] for k in ("server", "namespace", "label_selector",
                                                                     "accelerators", "only")})  # fmt: skip
        async with client.ApiClient(self.configuration) as api_client, anyio.create_task_group() as tasks:
            api = client.CustomObjectsApi(api_client)

            async def deliver(item: Listed | Changed) -> None:
                if isinstance(item, Listed):
                    events = self.visibility.listed(item.kind, item.items)
                else:
                    events = self.visibility.changed(item.kind, item.type, item.obj)
                if on_errors is not None:
                    on_errors(dict(self.visibility.errors))
                if self.synced:
                    for event in events:
                        await send.send(event)
                    return
                others = [s for k, s in self.states.items() if k != item.kind]
                if isinstance(item, Listed) and all(s.listed for s in others):
                    # Both kinds listed completely: the pipeline gets one consistent snapshot (Models first), so no
                    # InferenceService flashes ModelNotFound because its kind happened to be listed first.
                    self.synced = True
                    for event in self.visibility.snapshot():
                        await send.send(event)
                    await send.send(SYNCED)

            for kind, state in self.states.items():
                tasks.start_soon(self._loop, api, kind, state, deliver, name=f"watch {PLURALS[kind]}")

    async def _loop(
        self,
        api: client.CustomObjectsApi,
        kind: str,
        state: WatchState,
        deliver: Callable[[Listed | Changed], Awaitable[None]],
    ) -> None:
        # The selector picks InferenceServices (the units); Models are matched to them by modelRef and owned by
        # accelerator, so a selector on the services alone is enough and an unlabelled Model is not a trap.
        plural = PLURALS[kind]
        selector = self.settings.label_selector if kind == "InferenceService" else None
        if self.namespace is None:
            calls = KindCalls(kind, api.list_cluster_custom_object, (GROUP, VERSION, plural), selector)
        else:
            args = (GROUP, VERSION, self.namespace, plural)
            calls = KindCalls(kind, api.list_namespaced_custom_object, args, selector)
        await list_and_watch(
            calls, state, deliver, watch_timeout=self.settings.watch_timeout,
            request_timeout=self.settings.request_timeout, backoff_base=self.settings.backoff_base,
            backoff_cap=self.settings.backoff_cap,
        )  # fmt: skip
