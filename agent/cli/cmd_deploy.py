"""``metal-agent deploy``: a Model and an InferenceService for one model file, checked by the agent's own rules.

The objects are built from the flags, then parsed by ``agent.sources.manifest`` exactly as the agent will parse them, so
a bad budget is refused here with the message the agent would give, not discovered later on a Mac. They are
printed (``--dry-run``), written as one manifest file for standalone mode (``--manifests DIR``), or created with
the user's kubeconfig; nothing is created unless both can be: existing objects (or an existing file) are an
error, or are updated (replaced) with ``--update``.

Exit status: 0 done, 1 the API failed or refused, 2 invalid input.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import aiohttp
import anyio
import yaml

from agent.estimate.kvcache import validate_settings
from agent.estimate.shape import KV_CACHE_TYPES
from agent.kube.calls import MERGE_PATCH, api_message
from agent.sources.manifest import (
    ACCELERATORS,
    API_VERSION,
    FORMATS,
    GROUP,
    PRIORITIES,
    VERSION,
    ManifestError,
    ServiceSpec,
    parse_object,
)
from agent.util.quantity import InvalidValue, parse_fraction

EXIT_OK, EXIT_API, EXIT_INVALID = 0, 1, 2
DEADLINE = 60.0  # seconds for all (at most four) API calls
PLURALS = {"Model": "models", "InferenceService": "inferenceservices"}
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


class InvalidInput(Exception):
    """Printed as one ``error:`` line; exit status 2."""


class ApiFailure(Exception):
    """Printed as one ``error:`` line; exit status 1."""


def add_parser(subparsers: Any, help_line: str) -> None:
    p = subparsers.add_parser(
        "deploy",
        help=help_line,
        description=(
            "Create the Model NAME and the InferenceService NAME that serves it, after checking them with the "
            "agent's own rules (quantities such as 24Gi, fractions 0 < F <= 1, context 128..2097152). With "
            "--dry-run, print them instead. Exit status: 0 done, 1 the API failed or refused, 2 invalid input."
        ),
    )
    p.add_argument("name", metavar="NAME", help="name of the Model and of the InferenceService")
    p.add_argument("--source", required=True, metavar="URL|PATH", help="model URL (https://, hf://, ...) or path")
    p.add_argument("--format", choices=FORMATS, help="model format (default gguf)")
    p.add_argument("--memory-budget", metavar="Q", help="memory the model may use, e.g. 24Gi")
    p.add_argument("--memory-fraction", metavar="F", help="share of the host's memory, 0 < F <= 1")
    p.add_argument(
        "--context-size",
        type=context_size,
        metavar="N|auto",
        help="context size in tokens, or auto: the largest that fits the budget and the free host budget at start",
    )
    p.add_argument("--min-context-size", type=int, metavar="N", help="with --context-size auto: the least (4096)")
    p.add_argument("--parallel-slots", type=int, metavar="N", help="requests served at once (the context is split)")
    p.add_argument("--cache-type-k", choices=KV_CACHE_TYPES, help="KV cache type for K (default f16)")
    p.add_argument("--cache-type-v", choices=KV_CACHE_TYPES, help="KV cache type for V (quantized: --flash-attn)")
    p.add_argument("--flash-attn", action=argparse.BooleanOptionalAction, help="flash attention on (or off)")
    p.add_argument("--priority", choices=PRIORITIES, help="admission and eviction priority (default normal)")
    p.add_argument(
        "--on-demand", action="store_true", help="no server until a request to the agent's /v1 endpoint names it"
    )
    p.add_argument("--idle-timeout", metavar="DURATION", help="on demand: stop after this long unused (default 10m)")
    p.add_argument("--alias", metavar="NAME", help="another model name /v1 requests may use")
    p.add_argument("--accelerator", choices=ACCELERATORS, help="metal, cuda, cpu, ... (default cpu)")
    p.add_argument(
        "--namespace", "-n", metavar="NS", help="namespace (default: the kubeconfig context's, else default)"
    )
    p.add_argument(
        "--kubeconfig", type=Path, metavar="PATH", help="kubeconfig file (default $KUBECONFIG or ~/.kube/config)"
    )
    p.add_argument("--context", metavar="CTX", help="kubeconfig context (default: the current one)")
    p.add_argument("--dry-run", action="store_true", help="print the objects, create nothing")
    p.add_argument(
        "--manifests",
        type=Path,
        metavar="DIR",
        help="write the objects to DIR/NAME.yaml for a standalone agent (run --manifests DIR) instead of a cluster",
    )
    p.add_argument("-o", "--output", choices=("yaml", "json"), default="yaml", help="--dry-run format")
    p.add_argument(
        "--update", action="store_true", help="update the objects if they exist (merge patch of spec; a file: replace)"
    )
    p.set_defaults(handler=run)


def context_size(text: str) -> int | str:
    """``auto`` or a whole number (its range is checked as the agent checks it)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of tokens or auto") from None


SERVICE_FLAGS = (  # flag attribute -> InferenceService spec field, copied when given
    ("context_size", "contextSize"),
    ("min_context_size", "minContextSize"),
    ("parallel_slots", "parallelSlots"),
    ("cache_type_k", "cacheTypeK"),
    ("cache_type_v", "cacheTypeV"),
    ("flash_attn", "flashAttention"),
    ("priority", "priority"),
    ("idle_timeout", "idleTimeout"),
    ("alias", "alias"),
)


def source_of(text: str) -> str:
    """URLs as given; a local path made absolute (the agent runs elsewhere, with no manifest to be relative to)."""
    scheme = urlparse(text).scheme
    if scheme and len(scheme) > 1:
        return text
    return os.path.abspath(os.path.expanduser(text))


def build(args: argparse.Namespace, namespace: str) -> list[dict[str, Any]]:
    """The Model and InferenceService, validated as the agent will validate them."""
    if not _SUBDOMAIN.fullmatch(args.name) or len(args.name) > 253:
        raise InvalidInput(f"NAME: {args.name!r} is not a valid name (lowercase letters, digits, '-' and '.')")
    if not _LABEL.fullmatch(namespace):
        raise InvalidInput(f"--namespace: {namespace!r} is not a valid namespace name")
    if not args.source:
        raise InvalidInput("--source: must not be empty")
    hardware: dict[str, Any] = {}
    if args.accelerator:
        hardware["accelerator"] = args.accelerator
    if args.memory_budget is not None:
        hardware["memoryBudget"] = args.memory_budget
    if args.memory_fraction is not None:
        hardware["memoryFraction"] = _number(args.memory_fraction)
    model_spec: dict[str, Any] = {"source": source_of(args.source)}
    if args.format:
        model_spec["format"] = args.format
    if hardware:
        model_spec["hardware"] = hardware
    service_spec: dict[str, Any] = {"modelRef": args.name}
    if args.on_demand:
        service_spec["onDemand"] = True
    for flag, field in SERVICE_FLAGS:
        if getattr(args, flag, None) is not None:
            service_spec[field] = getattr(args, flag)
    objects = [
        {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": args.name, "namespace": namespace}, "spec": spec}
        for kind, spec in (("Model", model_spec), ("InferenceService", service_spec))
    ]
    for obj in objects:
        try:
            parsed = parse_object(obj, f"{obj['kind']} {namespace}/{args.name}")
            if isinstance(parsed, ServiceSpec):
                validate_settings(parsed.settings())  # what llama.cpp would refuse (a quantized V without FA)
        except (ManifestError, ValueError) as exc:
            raise InvalidInput(str(exc)) from None
    return objects


def _number(text: str) -> int | float:
    """The flag's text as the number the manifest holds; its range is then checked as the agent checks it."""
    try:
        return int(text) if text.strip().isdigit() else float(text)
    except ValueError:
        try:
            parse_fraction(text, "spec.hardware.memoryFraction")  # raises the agent's "is not a number"
        except InvalidValue as exc:
            raise InvalidInput(str(exc)) from None
        raise InvalidInput(f"spec.hardware.memoryFraction: {text!r} is not a number") from None


def render(objects: list[dict[str, Any]], output: str) -> str:
    if output == "json":
        return json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}, indent=2) + "\n"
    return yaml.safe_dump_all(objects, sort_keys=False)


def _kubeconfig_path(args: argparse.Namespace) -> str | None:
    """--kubeconfig, else $KUBECONFIG (paths joined by ':'), else ~/.kube/config; None when none exists."""
    if args.kubeconfig is not None:
        if not args.kubeconfig.is_file():
            raise InvalidInput(f"--kubeconfig: {args.kubeconfig} is not a file")
        return str(args.kubeconfig)
    paths = os.environ.get("KUBECONFIG") or "~/.kube/config"
    exists = any(os.path.exists(os.path.expanduser(p)) for p in paths.split(os.pathsep) if p)
    return paths if exists else None


def context_namespace(args: argparse.Namespace) -> str | None:
    """The namespace of the chosen kubeconfig context, if it has one (and a kubeconfig exists)."""
    from kubernetes_asyncio.config import ConfigException, list_kube_config_contexts

    path = _kubeconfig_path(args)
    if path is None:
        return None
    try:
        contexts, current = list_kube_config_contexts(path)
    except (ConfigException, OSError):
        return None
    chosen = next((c for c in contexts if c.get("name") == args.context), None) if args.context else current
    namespace: str | None = ((chosen or {}).get("context") or {}).get("namespace")
    return namespace


async def apply(args: argparse.Namespace, objects: list[dict[str, Any]]) -> list[str]:
    """Create (or with ``--update`` patch) both objects; nothing is created when either exists without it."""
    from kubernetes_asyncio import client, config
    from kubernetes_asyncio.client.exceptions import ApiException
    from kubernetes_asyncio.config import ConfigException

    configuration = client.Configuration()
    path = _kubeconfig_path(args)
    if path is None:
        raise InvalidInput("no kubeconfig: pass --kubeconfig PATH or set KUBECONFIG (or use --dry-run)")
    try:
        await config.load_kube_config(config_file=path, context=args.context, client_configuration=configuration)
    except (ConfigException, OSError, ValueError) as exc:
        raise InvalidInput(f"kubeconfig: {exc}") from None
    done = []
    async with client.ApiClient(configuration) as api_client:
        api: Any = client.CustomObjectsApi(api_client)  # Any: the bundled stubs omit _content_type
        try:
            with anyio.fail_after(DEADLINE):
                existing = {obj["kind"]: await _exists(api, obj) for obj in objects}
                taken = [
                    f"{kind} {objects[0]['metadata']['namespace']}/{args.name}" for kind, e in existing.items() if e
                ]
                if taken and not args.update:
                    verb, them = ("exists", "it") if len(taken) == 1 else ("exist", "them")
                    raise ApiFailure(f"{' and '.join(taken)} already {verb}; use --update to change {them}")
                for obj in objects:
                    namespace, plural = obj["metadata"]["namespace"], PLURALS[obj["kind"]]
                    noun = f"{plural[:-1]}.{GROUP}/{args.name}"
                    if existing[obj["kind"]]:
                        patch = {"spec": obj["spec"]}  # the fields given replace theirs; the others are kept
                        await api.patch_namespaced_custom_object(
                            GROUP, VERSION, namespace, plural, args.name, patch, _content_type=MERGE_PATCH
                        )
                        done.append(f"{noun} updated")
                    else:
                        await api.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, obj)
                        done.append(f"{noun} created")
        except ApiException as exc:
            raise ApiFailure(f"the API refused: {api_message(exc)}") from None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise ApiFailure(f"cannot reach the API server {configuration.host}: {exc!r}") from None
    return done


async def _exists(api: Any, obj: dict[str, Any]) -> bool:
    from kubernetes_asyncio.client.exceptions import ApiException

    meta = obj["metadata"]
    try:
        await api.get_namespaced_custom_object(GROUP, VERSION, meta["namespace"], PLURALS[obj["kind"]], meta["name"])
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


def write_manifest(args: argparse.Namespace, objects: list[dict[str, Any]]) -> str:
    """Both objects in DIR/NAME.yaml (the agent's standalone mode reads every file of DIR)."""
    folder: Path = args.manifests
    if not folder.is_dir():
        raise InvalidInput(f"--manifests: {folder} is not a directory")
    path = folder / f"{args.name}.yaml"
    if path.exists() and not args.update:
        raise ApiFailure(f"{path} already exists; use --update to replace it")
    temporary = path.with_name(f".{path.name}.tmp")  # the agent polls DIR: it must never read half a file
    try:
        temporary.write_text(render(objects, "yaml"), encoding="utf-8")
        temporary.replace(path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise ApiFailure(f"cannot write {path}: {exc.strerror}") from None
    return f"{path} written"


def run(args: argparse.Namespace) -> int:
    try:
        # A standalone agent has no kubeconfig context: its objects are in "default" unless told otherwise.
        namespace = args.namespace or (None if args.manifests else context_namespace(args)) or "default"
        objects = build(args, namespace)
        if args.dry_run:
            sys.stdout.write(render(objects, args.output))
            return EXIT_OK
        if args.manifests is not None:
            print(write_manifest(args, objects))
            return EXIT_OK
        for line in anyio.run(apply, args, objects):
            print(line)
    except InvalidInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except ApiFailure as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_API
    return EXIT_OK
