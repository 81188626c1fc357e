"""The `metal-agent run` flags of Kubernetes mode, and the settings they make."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from agent.kube.settings import (
    KubeSettings,
    check_label_selector,
    check_namespace,
    parse_accelerators,
    parse_only,
)
from agent.quantity import InvalidValue

KUBE_ONLY = ("kubeconfig", "context", "namespace", "all_namespaces", "label_selector", "accelerators", "only")


def add_arguments(parser: Any) -> None:
    group = parser.add_argument_group(
        "Kubernetes mode", "watch Models and InferenceServices on a cluster instead of a manifest directory"
    )
    group.add_argument("--kube", action="store_true", help="take objects from the Kubernetes API (list, then watch)")
    group.add_argument("--kubeconfig", type=Path, metavar="PATH",
                       help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, else in-cluster)")  # fmt: skip
    group.add_argument("--context", metavar="NAME", help="kubeconfig context (default: its current context)")
    scope = group.add_mutually_exclusive_group()
    scope.add_argument("--namespace", metavar="NS", help="namespace to watch (default: the context's namespace)")
    scope.add_argument("--all-namespaces", action="store_true", help="watch every namespace")
    group.add_argument("--label-selector", metavar="SEL",
                       help="serve only InferenceServices matching it, e.g. node=mac-1")  # fmt: skip
    group.add_argument("--accelerators", metavar="LIST", action="append",
                       help="accelerators this agent serves, e.g. metal,cpu (default: metal,cpu on macOS; cuda "
                            "where nvidia-smi sees a GPU; cpu otherwise)")  # fmt: skip
    group.add_argument("--only", metavar="NS/NAME", action="append",
                       help="serve only these InferenceServices (repeatable or comma separated)")  # fmt: skip


def settings_from(args: argparse.Namespace) -> KubeSettings | None:
    """None in standalone mode; Kubernetes flags without --kube are an error rather than silently ignored."""
    if not args.kube:
        given = [name for name in KUBE_ONLY if getattr(args, name, None)]
        if given:
            raise InvalidValue(f"--{given[0].replace('_', '-')} needs --kube")
        return None
    return KubeSettings(
        kubeconfig=args.kubeconfig,
        context=args.context,
        namespace=check_namespace(args.namespace) if args.namespace else None,
        all_namespaces=args.all_namespaces,
        label_selector=check_label_selector(args.label_selector) if args.label_selector else None,
        accelerators=parse_accelerators(args.accelerators) if args.accelerators else (),
        only=parse_only(args.only) if args.only else frozenset(),
    )
