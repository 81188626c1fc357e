"""The settings of Kubernetes mode, from the effective `metal-agent run` settings (agent/config/settings.py)."""

from __future__ import annotations

import argparse

from agent.config.kube_settings import KubeSettings
from agent.kube.endpoints import routable
from agent.util.quantity import InvalidValue

KUBE_ONLY = ("kubeconfig", "context", "namespace", "all_namespaces", "label_selector", "accelerators", "only",
             "agent_name", "advertise_address")  # fmt: skip
DEFAULT_SERVICE_PORT = 8080
DEFAULT_PROXY_PORT = 9465


def settings_from(args: argparse.Namespace) -> KubeSettings | None:
    """None in standalone mode; Kubernetes settings without --kube are an error rather than silently ignored."""
    if not args.kube:
        given = [name for name in KUBE_ONLY if getattr(args, name, None)]
        given += ["no_endpoints"] if not args.endpoints else []
        given += ["service_port"] if args.service_port != DEFAULT_SERVICE_PORT else []
        given += ["proxy_port"] if args.proxy_port != DEFAULT_PROXY_PORT else []
        if given:
            raise InvalidValue(f"--{given[0].replace('_', '-')} needs --kube")
        return None
    if args.namespace and args.all_namespaces:
        raise InvalidValue("--namespace and --all-namespaces exclude each other")
    if args.advertise_address and not routable(args.advertise_address):
        raise InvalidValue(
            f"--advertise-address: {args.advertise_address} cannot be reached from the cluster (the API server "
            "refuses loopback, link-local and unspecified addresses in an EndpointSlice); give this host's address "
            "on the cluster's network, or --no-endpoints without it"
        )
    return KubeSettings(
        kubeconfig=args.kubeconfig,
        context=args.context,
        namespace=args.namespace,
        all_namespaces=args.all_namespaces,
        label_selector=args.label_selector,
        accelerators=tuple(args.accelerators or ()),
        only=frozenset(args.only or ()),
    )
